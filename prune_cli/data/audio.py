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
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if sr != sample_rate:
        wav = AF.resample(wav, sr, sample_rate)
    return wav
