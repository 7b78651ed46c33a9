"""Acoustic degradations of clean synthetic speech (numpy only, seeded by the caller's generator): coloured noise,
babble, a synthetic room, mixing at an exact SNR."""

from __future__ import annotations

import numpy as np


def colored_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-power noise: white (flat), pink (power 1/f) or brown (1/f^2), shaped in the frequency domain."""
    white = rng.standard_normal(n)
    if kind != "white":
        spec = np.fft.rfft(white)
        f = np.fft.rfftfreq(n)
        f[0] = f[1] if n > 2 else 1.0
        spec /= f ** (0.5 if kind == "pink" else 1.0)
        white = np.fft.irfft(spec, n)
    return (white / (np.sqrt(np.mean(white**2)) + 1e-12)).astype(np.float32)


def babble(n: int, others: list[np.ndarray], talkers: int, rng: np.random.Generator) -> np.ndarray:
    """Other utterances summed, each looped to length n from a random offset."""
    picks = rng.choice(len(others), size=min(talkers, len(others)), replace=False)
    out = np.zeros(n, np.float32)
    for i in picks:
        src = others[int(i)]
        reps = int(np.ceil((n + len(src)) / len(src)))
        start = int(rng.integers(len(src)))
        out += np.tile(src, reps)[start : start + n]
    return out / (np.sqrt(np.mean(out**2)) + 1e-12)


def reverberate(audio: np.ndarray, rt60: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Convolve with a synthetic room: a direct path, then exponentially decaying noise (60 dB down at rt60)."""
    t = np.arange(int(rt60 * sample_rate)) / sample_rate
    rir = rng.standard_normal(t.shape[0]) * np.exp(-6.908 * t / rt60) * 0.3
    rir[0] = 1.0
    n = audio.shape[0] + rir.shape[0] - 1
    wet = np.fft.irfft(np.fft.rfft(audio, n) * np.fft.rfft(rir, n), n)[: audio.shape[0] + sample_rate // 10]
    return (wet * np.sqrt(np.mean(audio**2) / (np.mean(wet**2) + 1e-12))).astype(np.float32)


def mix_at_snr(audio: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """audio + noise scaled so that 10 log10(P_audio / P_noise) = snr_db, powers over the whole utterance.
    Scaled down together when the mix would clip, so the SNR holds."""
    p_sig = float(np.mean(audio**2)) + 1e-12
    mix = audio + noise * np.sqrt(p_sig / (float(np.mean(noise**2)) + 1e-12) / 10 ** (snr_db / 10))
    peak = float(np.max(np.abs(mix)))
    return mix * (0.99 / peak) if peak > 0.99 else mix
