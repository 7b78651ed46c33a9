"""Audio reading with clear errors and resampling to the recipe's rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from prune_cli.errors import DataError


def probe(path: Path) -> tuple[int, int]:
    """(sample_rate, frames) from the header, without decoding."""
    if not path.is_file():
        raise DataError(f"audio file not found: {path}")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise DataError(f"cannot read audio {path}: {e}") from None
    return int(info.samplerate), int(info.frames)


def wav_header_frames(path: Path) -> int | None:
    """Frames the RIFF header's data chunk declares (None for other formats): libsndfile reports the frames actually
    present, so a truncated WAV looks whole to it; the header still says how long the file should be."""
    if path.suffix.lower() != ".wav":
        return None
    try:
        with open(path, "rb") as f:
            riff = f.read(12)
            if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
                return None
            block_align = 0
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return None
                cid, size = head[:4], int.from_bytes(head[4:], "little")
                if cid == b"fmt ":
                    fmt = f.read(size)
                    block_align = int.from_bytes(fmt[12:14], "little")
                    if size % 2:
                        f.read(1)
                elif cid == b"data":
                    return size // block_align if block_align else None
                else:
                    f.seek(size + size % 2, 1)
    except OSError:
        return None


def load_audio(path: Path, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform at `sample_rate`. Raises DataError for missing, corrupt or empty files."""
    if not path.is_file():
        raise DataError(f"audio file not found: {path}")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise DataError(f"corrupt or unreadable audio {path}: {e}") from None
    if data.shape[0] == 0:
        raise DataError(f"empty audio {path}")
    bad = int(data.size - np.isfinite(data).sum())
    if bad:  # a float file can hold them; every feature and score downstream would be silently wrong
        raise DataError(f"{path}: {bad} of {data.size} samples are not finite (NaN or Inf); expected audio samples")
    if not data.any():
        raise DataError(f"{path}: every sample is zero (digital silence); expected speech")
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if sr != sample_rate:
        wav = AF.resample(wav, sr, sample_rate)
    return wav
