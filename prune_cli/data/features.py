"""Log-mel filterbanks (torchaudio kaldi-compliant fbank), global CMVN, seeded SpecAugment."""

from __future__ import annotations

import torch
import torchaudio.compliance.kaldi as kaldi

from prune_cli.data.config import SpecAugmentConfig


def fbank(wav: torch.Tensor, sample_rate: int, n_mels: int) -> torch.Tensor:
    """(T, n_mels) log-mel features, 25 ms windows every 10 ms."""
    return kaldi.fbank(
        wav.unsqueeze(0) * 32768.0, num_mel_bins=n_mels, sample_frequency=sample_rate, dither=0.0,
        energy_floor=0.0,
    )


def compute_cmvn(feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    total = sum(f.shape[0] for f in feats)
    s = torch.stack([f.float().sum(0) for f in feats]).sum(0)
    sq = torch.stack([(f.float() ** 2).sum(0) for f in feats]).sum(0)
    mean = s / total
    std = (sq / total - mean**2).clamp_min(1e-8).sqrt()
    return {"mean": mean, "std": std}


def apply_cmvn(x: torch.Tensor, cmvn: dict[str, torch.Tensor]) -> torch.Tensor:
    return (x - cmvn["mean"]) / cmvn["std"]


def spec_augment(x: torch.Tensor, lengths: torch.Tensor, cfg: SpecAugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Frequency and time masking on a padded batch (B, T, F), drawn from `gen` so resume replays it exactly."""
    x = x.clone()
    b, _, f = x.shape
    for i in range(b):
        t = int(lengths[i])
        for _ in range(cfg.freq_masks):
            w = int(torch.randint(0, cfg.freq_width + 1, (1,), generator=gen))
            f0 = int(torch.randint(0, max(1, f - w), (1,), generator=gen))
            x[i, :, f0 : f0 + w] = 0.0
        for _ in range(cfg.time_masks):
            w = min(int(torch.randint(0, cfg.time_width + 1, (1,), generator=gen)), max(1, t // 5))
            t0 = int(torch.randint(0, max(1, t - w), (1,), generator=gen))
            x[i, t0 : t0 + w, :] = 0.0
    return x
