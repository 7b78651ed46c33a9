"""Sparsity accounting per scope (module count or FLOPs-weighted) and the sparsity loss.

loss = alpha * (|s - t| + (s - t)^2) per gated scope, with the target t warmed up linearly from 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Sequence

import torch

from prune_cli.gating.predictor import deterministic_gates
from prune_cli.model.gated import PrunableModule

SCOPES = ("encoder", "decoder")


@dataclass
class SparsitySpec:
    """Which modules are gated, their weights and the per-scope targets."""

    weights: torch.Tensor  # (M,) module weight: 1, or its FLOPs
    scope_mask: dict[str, torch.Tensor]  # scope -> (M,) bool
    gated: torch.Tensor  # (M,) bool: modules the predictor may skip
    targets: dict[str, float]  # only the gated scopes
    cross_attn: torch.Tensor  # (M,) bool: the decoder's cross-attentions, its only view of the audio
    min_cross_attention: int = 0  # a deployed mask keeps at least this many of them (gates.min_cross_attention)

    @classmethod
    def build(
        cls, modules: list[PrunableModule], scope: str, targets: dict[str, float], module_flops: dict[str, int] | None,
        min_cross_attention: int = 0, always_run: Sequence[str] = (),
    ) -> "SparsitySpec":
        """`always_run`: module names or fnmatch patterns (gates.always_run) that no learned mask skips; the scope's
        target is then met by its other modules."""
        if module_flops is not None:
            w = torch.tensor([float(module_flops[m.name]) for m in modules])
            w = w / w.mean()
        else:
            w = torch.ones(len(modules))
        masks = {s: torch.tensor([m.part == s for m in modules]) for s in SCOPES}
        scopes = SCOPES if scope == "both" else (scope,)
        gated = torch.zeros(len(modules), dtype=torch.bool)
        for s in scopes:
            gated |= masks[s]
        gated &= torch.tensor([not any(fnmatchcase(m.name, p) for p in always_run) for m in modules])
        cross = torch.tensor([m.kind == "src_attn" for m in modules])
        return cls(w, masks, gated, {s: targets[s] for s in scopes}, cross, min_cross_attention)

    @classmethod
    def for_targets(
        cls, modules: list[PrunableModule], targets: dict[str, float], module_flops: dict[str, int] | None,
        min_cross_attention: int = 0, always_run: Sequence[str] = (),
    ) -> "SparsitySpec":
        """Rebuild a trained spec from its gated targets alone (as stored in gate checkpoints and mask files)."""
        scope = "both" if len(targets) == 2 else next(iter(targets), "decoder")
        return cls.build(modules, scope, {"encoder": 0.0, "decoder": 0.0} | targets, module_flops, min_cross_attention,
                         always_run)

    def deployed_gates(self, logits: torch.Tensor, exact: bool) -> torch.Tensor:
        """(N, M) binary keep gates of the masks prune exports and the frozen phase trains under: cut at exactly the
        target (exact_sparsity_gates) or the argmax, with the cross-attention floor, and every ungated module kept."""
        keep = exact_sparsity_gates(logits, self) if exact else deterministic_gates(logits)
        return self.force_ungated(keep_cross_attention(keep, logits, self))

    def sparsity(self, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted skipped fraction per scope for gates (B, M) -> each a (B,) tensor. Differentiable."""
        out = {}
        for s in SCOPES:
            w = self.weights * self.scope_mask[s]
            out[s] = ((1.0 - keep) * w.to(keep.device)).sum(-1) / w.sum()
        w = self.weights
        out["total"] = ((1.0 - keep) * w.to(keep.device)).sum(-1) / w.sum()
        return out

    def loss(self, keep: torch.Tensor, alpha: float, warm: float, groups: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Sparsity loss; `warm` in [0, 1] scales the targets during warm-up.

        Without groups the loss is on the batch-mean sparsity, so contexts may trade sparsity among themselves.
        With groups (B,) of context ids it is the mean over the batch's contexts of each context's own loss: every
        context must meet the target, and context-awareness decides only which modules each one skips.
        """
        sp = self.sparsity(keep)
        loss = keep.new_zeros(())
        logs: dict[str, float] = {}
        for s, t in self.targets.items():
            if groups is None:
                d = sp[s].mean()[None] - t * warm
            else:
                ids, inverse = torch.unique(groups, return_inverse=True)
                sums = sp[s].new_zeros(len(ids)).index_add(0, inverse, sp[s])
                d = sums / torch.bincount(inverse, minlength=len(ids)) - t * warm
            loss = loss + alpha * (d.abs() + d**2).mean()
            logs[f"sparsity_{s}"] = float(sp[s].mean().detach())
        return loss, logs

    def force_ungated(self, keep: torch.Tensor) -> torch.Tensor:
        """Modules outside the gated scopes always run."""
        return torch.where(self.gated.to(keep.device), keep, torch.ones_like(keep))


def exact_sparsity_gates(logits: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Per gated scope and row, skip the modules with the largest skip-minus-keep margin, in order, while the skipped
    weight stays within half a module of the target.

    Used for the static baseline, whose single logit table trained with Gumbel noise meets the target only in
    expectation, and for context-aware masks with gates.sparsity_per: context (each row by its own ranking).
    Where the argmax meets the target this is the same mask. Vectorized over rows: it runs every training step.
    """
    margin = (logits[..., 0] - logits[..., 1]).detach().cpu()
    keep = torch.ones_like(margin)
    w = spec.weights.double()
    for scope, target in spec.targets.items():
        total = float(spec.weights[spec.scope_mask[scope]].sum())
        idx = torch.nonzero(spec.scope_mask[scope] & spec.gated).flatten()  # always-run modules are never cut
        order = idx[torch.argsort(margin[:, idx], dim=-1, descending=True, stable=True)]  # (N, S) module ids
        ws = w[order]
        skipped_before = torch.cat([ws.new_zeros(ws.shape[0], 1), ws.cumsum(-1)[:, :-1]], -1)
        # the first module that would overshoot stops the row: it and every later one are kept
        stop = ((skipped_before + 0.5 * ws) > target * total).cumsum(-1) > 0
        keep.scatter_(1, order, stop.to(keep.dtype))
    return keep.to(logits.device)


def calibration_shift(logits: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """(M,) amounts to add to the skip logits so that the mean sparsity over the rows of `logits` (N, M, 2), one per
    utterance, is as close to each scope's target as one decision threshold per scope allows.

    The context-aware predictor meets its target in the training batches' mean, through sampled gates; its argmax
    masks can end off target. Shifting a scope's threshold keeps each context's ranking of modules and moves all
    contexts together. Among equally close thresholds the one nearest the predictor's own (0) wins.
    """
    margin = (logits[..., 0] - logits[..., 1]).detach().float().cpu()  # skip iff margin + shift > 0
    shift = torch.zeros(margin.shape[-1])
    w = spec.weights
    for scope, target in spec.targets.items():
        idx = torch.nonzero(spec.scope_mask[scope] & spec.gated).flatten()
        scope_weight = w[spec.scope_mask[scope]].sum()
        m = margin[:, idx]
        values = torch.unique(m)
        # thresholds: the current one (0), and one between each pair of neighbouring margins and beyond both ends
        cands = torch.cat([torch.zeros(1), (values[1:] + values[:-1]) / 2, values[:1] - 1, values[-1:] + 1])
        skipped = ((m[None] > cands[:, None, None]).float() * w[idx]).sum(-1) / scope_weight  # (K, N)
        err = (skipped.mean(-1) - target).abs()
        best = min(range(len(cands)), key=lambda k: (round(float(err[k]), 9), abs(float(cands[k]))))
        shift[idx] = -cands[best]
    return shift


def keep_cross_attention(keep: torch.Tensor, logits: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """Rows of `keep` (N, M) that keep fewer than spec.min_cross_attention gated cross-attentions get back the ones
    with the smallest skip margin; for each, the kept gated decoder module of another kind with the largest skip
    margin is skipped instead, so the row's module count (its sparsity, by module count) is unchanged.

    A decoder without cross-attention never sees the audio: its output is a language model's. The batch-mean loss lets
    one context take such a mask (asr:de, 99.3 WER at 0.75 / 0.75 under gates.seed=1); no per-context ranking cures it.
    """
    cross = torch.nonzero(spec.cross_attn & spec.gated).flatten()
    n = min(spec.min_cross_attention, len(cross))
    if n == 0:
        return keep
    short = torch.nonzero(keep[:, cross].sum(-1) < n).flatten().tolist()
    if not short:
        return keep
    others = torch.nonzero(spec.gated & spec.scope_mask["decoder"] & ~spec.cross_attn).flatten()
    margin = (logits[..., 0] - logits[..., 1]).detach().cpu()
    out = keep.detach().cpu().clone()
    for row in short:
        while int(out[row, cross].sum()) < n:
            skipped = cross[out[row, cross] == 0]
            out[row, skipped[torch.argmin(margin[row, skipped])]] = 1
            kept = others[out[row, others] == 1]
            if len(kept):
                out[row, kept[torch.argmax(margin[row, kept])]] = 0
    return out.to(keep.device, keep.dtype)
