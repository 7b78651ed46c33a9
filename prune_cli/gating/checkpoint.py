"""The gate checkpoint (checkpoints/<variant>.pt): a trained gate predictor and what it was trained for.

Written by the gate stage, read by prune (the masks) and by eval and profile (the predictor); one type for all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prune_cli.atomic import atomic_torch_save
from prune_cli.gating.predictor import LabelVocab
from prune_cli.model.checkpoint import read_checkpoint

KIND = "prune-cli/gates"
PRODUCER = "prune-cli train RECIPE --stage gates"


@dataclass
class GateCheckpoint:
    inputs: list[str]  # the predictor's inputs; [] for the static baseline's single table
    labels: LabelVocab  # the speakers and conditions it embeds
    n_modules: int
    state_dict: dict[str, torch.Tensor]
    scope: str  # gates.scope
    targets: dict[str, float]  # skipped share per scope
    module_flops: dict[str, int] | None  # per module, when gates.weighting is flops
    params: int  # the predictor's parameter count
    min_cross_attention: int = 0  # checkpoints from before the floor have none
    always_run: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        atomic_torch_save(path, {
            "kind": KIND, "inputs": self.inputs, **self.labels.to_blob(), "n_modules": self.n_modules,
            "state_dict": self.state_dict, "scope": self.scope, "targets": self.targets,
            "module_flops": self.module_flops, "params": self.params, "min_cross_attention": self.min_cross_attention,
            "always_run": self.always_run,
        })

    @classmethod
    def load(cls, path: Path) -> GateCheckpoint:
        blob: dict[str, Any] = read_checkpoint(path, KIND, PRODUCER)
        return cls(blob.get("inputs"), LabelVocab.from_blob(blob), blob.get("n_modules"), blob["state_dict"],
                   blob["scope"], blob["targets"], blob.get("module_flops"), blob.get("params", 0),
                   blob.get("min_cross_attention", 0), blob.get("always_run", []))
