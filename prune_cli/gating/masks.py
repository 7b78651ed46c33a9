"""Mask files (masks.json): module order, one 0/1 vector per context and variant, stats, and model identity.

Also the non-learned baselines at a given sparsity: `random` and LayerDrop-style whole layers.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from prune_cli.atomic import atomic_write_json
from prune_cli.errors import CheckpointError
from prune_cli.gating.sparsity import SCOPES
from prune_cli.model.gated import PrunableModule
from prune_cli.variants import CONTEXT

FORMAT = 1


@dataclass
class MaskFile:
    modules: list[str]
    arch_hash: str
    weights_hash: str
    variants: dict[str, dict[str, list[int]]]  # variant -> context key -> 0/1 keep vector
    stats: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # variant -> ctx -> sparsity/flops
    per_utterance: bool = False  # gates depend on acoustic/speaker inputs; the vectors are each context's mode
    meta: dict[str, Any] = field(default_factory=dict)
    # Variants that run on their own fine-tuned base (static) -> its weights hash; others use `weights_hash`.
    variant_weights: dict[str, str] = field(default_factory=dict)

    def keep(self, variant: str, context: str) -> tuple[bool, ...]:
        table = self.variants.get(variant)
        if table is None:
            raise CheckpointError(f"mask file has no variant {variant!r} (has: {', '.join(self.variants)})")
        if context not in table:
            raise CheckpointError(f"mask file has no mask for context {context!r} in variant {variant!r}")
        return tuple(bool(v) for v in table[context])

    def save(self, path: Path) -> None:
        atomic_write_json(path, {
            "format": FORMAT, "arch_hash": self.arch_hash, "weights_hash": self.weights_hash,
            "modules": self.modules, "per_utterance": self.per_utterance, "masks": self.variants.get(CONTEXT.name, {}),
            "variants": self.variants, "stats": self.stats, "meta": self.meta, "variant_weights": self.variant_weights,
        })

    @classmethod
    def load(cls, path: Path) -> "MaskFile":
        try:
            d = json.loads(path.read_text())
            mf = cls(d["modules"], d["arch_hash"], d["weights_hash"], d["variants"], d.get("stats", {}),
                     d.get("per_utterance", False), d.get("meta", {}), d.get("variant_weights", {}))
            if not isinstance(mf.variants, dict):
                raise TypeError("'variants' is not a mapping")
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a readable mask file ({type(e).__name__}: {e})") from None
        problems = []
        tables = {f"variants.{v}": t for v, t in mf.variants.items()} | ({"masks": d["masks"]} if "masks" in d else {})
        for name, table in tables.items():
            if not isinstance(table, dict):
                problems.append(f"{path}: {name}: expected a mapping of context keys to 0/1 vectors")
                continue
            for ctx, vec in table.items():
                if not isinstance(vec, list) or len(vec) != len(mf.modules) or any(v not in (0, 1) or isinstance(v, bool) for v in vec):
                    problems.append(f"{path}: {name}.{ctx}: expected {len(mf.modules)} values, each 0 or 1")
        # `masks` is the documented copy of the context-aware table: an edit to one and not the other is ambiguous.
        ctx_table = mf.variants.get(CONTEXT.name, {})
        if not problems and "masks" in d and d["masks"] != ctx_table:
            differ = sorted(c for c in set(d["masks"]) | set(ctx_table) if d["masks"].get(c) != ctx_table.get(c))
            problems.append(f"{path}: 'masks' and 'variants.{CONTEXT.name}' disagree for {', '.join(differ)}; they hold the same "
                            "table, so edit both (or remove 'masks')")
        if problems:
            raise CheckpointError(problems)
        return mf

    def check_model(self, modules: list[str], arch_hash: str, weights_hash: str, path: Path, variant: str = CONTEXT.name) -> None:
        if modules != self.modules or arch_hash != self.arch_hash:
            raise CheckpointError(
                f"{path}: mask file belongs to another architecture (arch {self.arch_hash}, "
                f"{len(self.modules)} modules) than this model (arch {arch_hash}, {len(modules)} modules)"
            )
        want = self.variant_weights.get(variant, self.weights_hash)
        if weights_hash != want:
            raise CheckpointError(
                f"{path}: {variant} masks were made for base weights {want}, but the model has {weights_hash}; "
                "re-run `prune-cli prune` for this model"
            )


def random_mask(modules: list[PrunableModule], targets: dict[str, float], seed: int) -> list[int]:
    """Skip a random subset of each scope's modules matching the target count."""
    rng = random.Random(seed)
    keep = [1] * len(modules)
    for scope, t in targets.items():
        idx = [i for i, m in enumerate(modules) if m.part == scope]
        for i in rng.sample(idx, round(t * len(idx))):
            keep[i] = 0
    return keep


def layerdrop_mask(modules: list[PrunableModule], targets: dict[str, float]) -> list[int]:
    """Skip whole layers, evenly spaced through the stack, as LayerDrop's every-other-layer pruning does."""
    keep = [1] * len(modules)
    for scope, t in targets.items():
        layers = sorted({m.layer for m in modules if m.part == scope})
        n_drop = round(t * len(layers))
        if n_drop == 0:
            continue
        step = len(layers) / n_drop
        drop = {layers[min(len(layers) - 1, int(step * (k + 0.5)))] for k in range(n_drop)}
        for i, m in enumerate(modules):
            if m.part == scope and m.layer in drop:
                keep[i] = 0
    return keep


def mask_stats(modules: Sequence[PrunableModule], keep: Sequence[int], module_flops: dict[str, int]) -> dict[str, Any]:
    """Module-count sparsity per scope and FLOPs of the kept modules at the reference utterance size."""
    out: dict[str, Any] = {}
    for scope in SCOPES:
        idx = [i for i, m in enumerate(modules) if m.part == scope]
        out[f"sparsity_{scope}"] = round(sum(1 - keep[i] for i in idx) / len(idx), 4)
    out["sparsity_total"] = round(sum(1 - k for k in keep) / len(keep), 4)
    dense = sum(module_flops.values())
    kept = sum(module_flops[m.name] for m, k in zip(modules, keep) if k)
    out["prunable_flops"] = int(kept)
    out["prunable_flops_ratio"] = round(kept / dense, 4) if dense else 1.0
    return out
