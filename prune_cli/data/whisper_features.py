"""Whisper's log-mel front end: 25 ms Hann windows every 10 ms at 16 kHz, Slaney mel filters, log10, dynamic range
clamped to 8 (log10 units) below the maximum, then scaled as (x + 4) / 4 (openai-whisper's audio.py)."""

from __future__ import annotations

from functools import lru_cache

import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
CHUNK_SAMPLES = 30 * SAMPLE_RATE  # Whisper's fixed 30-second window
CHUNK_FRAMES = CHUNK_SAMPLES // HOP  # 3000


@lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> torch.Tensor:
    """(n_freqs, n_mels) Slaney-scale, Slaney-normalized filters, as librosa.filters.mel's defaults."""
    return AF.melscale_fbanks(N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE, norm="slaney", mel_scale="slaney")


def log_mel(wav: torch.Tensor, n_mels: int = 80, pad_to_30s: bool = False) -> torch.Tensor:
    """(T, n_mels) features of a mono 16 kHz waveform; T = len / 160 (3000 with pad_to_30s, the audio zero-padded
    or cut to 30 s as Whisper's training input)."""
    wav = wav.float()
    if pad_to_30s:
        wav = torch.nn.functional.pad(wav[:CHUNK_SAMPLES], (0, max(0, CHUNK_SAMPLES - wav.shape[-1])))
    stft = torch.stft(wav, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    power = stft[..., :-1].abs() ** 2  # (n_freqs, T): the last frame is dropped, as Whisper does
    mel = mel_filters(n_mels).T @ power
    log_spec = mel.clamp(min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).T.contiguous()


def whisper_frames(wav: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Whisper's 30-s padded features, stored short: the frames that see the utterance, then one frame of the
    padding (all later frames equal it). Padding with that last frame restores the 3000 frames exactly."""
    if wav.shape[-1] > CHUNK_SAMPLES:
        return log_mel(wav, n_mels)  # longer than Whisper takes: the caller's max_frames check rejects it
    feats = log_mel(wav, n_mels, pad_to_30s=True)
    n = min(CHUNK_FRAMES, -(-(wav.shape[-1] + N_FFT // 2) // HOP) + 1)  # the first frame whose window is all padding
    return feats[:n].clone()
