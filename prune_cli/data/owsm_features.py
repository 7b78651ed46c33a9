"""OWSM's front end, as ESPnet's DefaultFrontend computes it: the waveform zero-padded or cut to 30 s (Speech2Text's
fixed input), a centred STFT (512-point, 25 ms Hann window, 10 ms hop, reflect padding), power spectrum, Slaney mel
filters (librosa's defaults), natural log floored at 1e-10. Global mean/variance normalization is the model's
(model/owsm.py), with the statistics it was trained with."""

from __future__ import annotations

import math
from functools import lru_cache

import torch

SAMPLE_RATE = 16000
N_FFT = 512
WIN_LENGTH = 400
HOP = 160
SPEECH_SECONDS = 30  # OWSM's preprocessor speech_length
SPEECH_SAMPLES = SPEECH_SECONDS * SAMPLE_RATE
OWSM_FRAMES = SPEECH_SAMPLES // HOP + 1  # 3001: a centred STFT has one frame more than hops


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: linear to 1 kHz, logarithmic above."""
    logstep = math.log(6.4) / 27.0
    return torch.where(f >= 1000.0, 15.0 + torch.log(f.clamp(min=1e-10) / 1000.0) / logstep, 3.0 * f / 200.0)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    logstep = math.log(6.4) / 27.0
    return torch.where(m >= 15.0, 1000.0 * torch.exp(logstep * (m - 15.0)), 200.0 * m / 3.0)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> torch.Tensor:
    """(n_freqs, n_mels): librosa.filters.mel(sr=16000, n_fft=512, n_mels), computed as librosa does, in float64,
    then rounded to float32. torchaudio's float32 filters put up to 8e-5 into the log-mel."""
    freqs = torch.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1, dtype=torch.float64)
    mel_f = _mel_to_hz(torch.linspace(float(_hz_to_mel(torch.tensor(0.0, dtype=torch.float64))),
                                      float(_hz_to_mel(torch.tensor(SAMPLE_RATE / 2, dtype=torch.float64))), n_mels + 2,
                                      dtype=torch.float64))
    fdiff = mel_f.diff()
    ramps = mel_f[:, None] - freqs[None, :]
    lower = -ramps[:n_mels] / fdiff[:n_mels, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0.0)
    weights = weights * (2.0 / (mel_f[2:] - mel_f[:n_mels]))[:, None]  # Slaney's area normalization
    return weights.T.float().contiguous()


def owsm_log_mel(wav: torch.Tensor, n_mels: int = 80, pad_to_30s: bool = True) -> torch.Tensor:
    """(T, n_mels) log-mel features of a mono 16 kHz waveform (T = 3001 with pad_to_30s)."""
    wav = wav.float()
    if pad_to_30s:
        wav = torch.nn.functional.pad(wav[:SPEECH_SAMPLES], (0, max(0, SPEECH_SAMPLES - wav.shape[-1])))
    spec = torch.stft(wav, N_FFT, HOP, WIN_LENGTH, window=torch.hann_window(WIN_LENGTH), center=True,
                      return_complex=True)
    power = spec.real**2 + spec.imag**2  # (n_freqs, T)
    return (power.T @ mel_filters(n_mels)).clamp(min=1e-10).log().contiguous()


def owsm_frames(wav: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """OWSM's 30-s input, stored short: the frames up to the first one that is all padding. Every later frame equals
    that one, so padding with the last stored frame restores the 3001 frames exactly."""
    if wav.shape[-1] > SPEECH_SAMPLES:
        return owsm_log_mel(wav, n_mels, pad_to_30s=False)  # longer than OWSM takes: the caller's max_frames check rejects it
    feats = owsm_log_mel(wav, n_mels)
    same = (feats == feats[-1]).all(dim=1)
    run = int(same.flip(0).int().cumprod(0).sum())  # the trailing frames equal to the last
    return feats[: feats.shape[0] - run + 1].clone()
