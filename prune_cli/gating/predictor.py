"""Gate predictor: context embeddings (+ pooled features, speaker) -> keep/skip logits per prunable module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prune_cli.contexts import ContextVocab

SKIP, KEEP = 0, 1


@dataclass(frozen=True)
class LabelVocab:
    """Per-utterance labels a predictor can read, as the training split has them; id 0 is a label training never saw."""

    speakers: tuple[str, ...] = ()
    conditions: tuple[str, ...] = ()  # acoustic conditions named by the manifest (`condition`: clean, snr10, ...)

    @classmethod
    def of(cls, utts: Iterable[Any]) -> "LabelVocab":
        utts = list(utts)
        return cls(tuple(sorted({u.speaker for u in utts})), tuple(sorted({u.condition for u in utts if u.condition})))

    @classmethod
    def from_blob(cls, blob: dict[str, Any]) -> "LabelVocab":
        """From a gate checkpoint or masks.json's meta (those from before conditions have none)."""
        return cls(tuple(blob.get("speakers", [])), tuple(blob.get("conditions", [])))

    def to_blob(self) -> dict[str, list[str]]:
        return {"speakers": list(self.speakers), "conditions": list(self.conditions)}

    @staticmethod
    def ids(labels: Sequence[str], known: Sequence[str], device: torch.device) -> torch.Tensor:
        index = {x: i + 1 for i, x in enumerate(known)}
        return torch.tensor([index.get(x, 0) for x in labels], device=device)


@dataclass
class ContextInputs:
    """Predictor inputs for a batch. Built from manifest fields and features, never from targets."""

    task: torch.Tensor  # (B,)
    source_lang: torch.Tensor
    target_lang: torch.Tensor
    speaker: torch.Tensor
    condition: torch.Tensor
    pooled: torch.Tensor  # (B, n_mels) time-pooled normalized features

    @classmethod
    def build(
        cls, tasks: Sequence[str], srcs: Sequence[str], tgts: Sequence[str], speakers: Sequence[str],
        conditions: Sequence[str], feats: torch.Tensor, lens: torch.Tensor, labels: LabelVocab, vocab: ContextVocab,
    ) -> "ContextInputs":
        valid = (torch.arange(feats.shape[1], device=feats.device)[None, :] < lens[:, None]).unsqueeze(-1)
        pooled = (feats * valid).sum(1) / lens.clamp_min(1)[:, None]
        dev = feats.device
        return cls(
            task=torch.tensor([vocab.task_id(t) for t in tasks], device=dev),
            source_lang=torch.tensor([vocab.lang_id(s) for s in srcs], device=dev),
            target_lang=torch.tensor([vocab.lang_id(t) for t in tgts], device=dev),
            speaker=LabelVocab.ids(speakers, labels.speakers, dev),
            condition=LabelVocab.ids(conditions, labels.conditions, dev),
            pooled=pooled,
        )


class GatePredictor(nn.Module):
    """A small MLP. With no inputs it is a single learned logit table: the `static` baseline."""

    def __init__(
        self, n_modules: int, inputs: Sequence[str], embed_dim: int, hidden: int, n_mels: int,
        labels: LabelVocab, init_keep_logit: float, n_tasks: int, n_langs: int,
    ):
        super().__init__()
        self.inputs = tuple(inputs)
        self.n_modules = n_modules
        self.embeds = nn.ModuleDict()
        sizes = {"task": n_tasks, "source_lang": n_langs, "target_lang": n_langs, "speaker": len(labels.speakers) + 1,
                 "condition": len(labels.conditions) + 1}
        for name in self.inputs:
            if name == "pooled_features":
                self.embeds[name] = nn.Sequential(nn.LayerNorm(n_mels), nn.Linear(n_mels, embed_dim))
            else:
                self.embeds[name] = nn.Embedding(sizes[name], embed_dim)
        if self.inputs:
            self.mlp = nn.Sequential(
                nn.Linear(embed_dim * len(self.inputs), hidden), nn.GELU(), nn.Linear(hidden, n_modules * 2)
            )
            nn.init.normal_(self.mlp[-1].weight, std=0.01)
            with torch.no_grad():
                self.mlp[-1].bias.view(n_modules, 2).copy_(torch.tensor([0.0, init_keep_logit]))
        else:
            self.table = nn.Parameter(torch.tensor([0.0, init_keep_logit]).repeat(n_modules, 1))

    def forward(self, ctx: ContextInputs) -> torch.Tensor:
        """Logits (B, M, 2); index 1 means keep."""
        b = ctx.task.shape[0]
        if not self.inputs:
            return self.table.unsqueeze(0).expand(b, -1, -1)
        parts = []
        for name in self.inputs:
            x = ctx.pooled if name == "pooled_features" else getattr(ctx, name)
            parts.append(self.embeds[name](x))
        return self.mlp(torch.cat(parts, -1)).view(b, self.n_modules, 2)

    @torch.no_grad()
    def shift_skip_logits(self, shift: torch.Tensor) -> None:
        """Add shift (M,) to every skip logit: moves each module's decision threshold, for every input alike."""
        logits = self.mlp[-1].bias.view(self.n_modules, 2) if self.inputs else self.table
        logits[:, SKIP] += shift.to(logits.device)

    @property
    def per_utterance(self) -> bool:
        """True when gates can differ inside one context (acoustic, condition or speaker inputs)."""
        return bool({"pooled_features", "speaker", "condition"} & set(self.inputs))


def gumbel_straight_through(logits: torch.Tensor, tau: float, gen: torch.Generator, noise_scale: float = 1.0) -> torch.Tensor:
    """Hard 0/1 keep gates in the forward pass, Gumbel-Softmax gradients in the backward pass.

    `noise_scale` anneals the Gumbel noise with the temperature. With full noise, the hard decisions only meet the
    sparsity target in expectation, and a gate whose keep probability settles at, say, 0.75 is always kept by the
    deterministic argmax at inference; annealed noise makes training decisions converge to the inference ones.
    """
    u = torch.rand(logits.shape, generator=gen).to(logits.device).clamp(1e-9, 1 - 1e-9)
    soft = F.softmax((logits - noise_scale * torch.log(-torch.log(u))) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
    return (hard - soft.detach() + soft)[..., KEEP]


def deterministic_gates(logits: torch.Tensor) -> torch.Tensor:
    return (logits[..., KEEP] > logits[..., SKIP]).float()


def tau_at(step: int, total: int, tau_start: float, tau_end: float) -> float:
    """Exponential anneal from tau_start to tau_end over training."""
    frac = min(1.0, step / max(1, total - 1))
    return tau_start * (tau_end / tau_start) ** frac
