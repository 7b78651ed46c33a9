"""The variant registry: every model variant a run trains, prunes, evaluates and profiles, declared once.

Stages, the run directory's paths and the report read this table; no variant name is spelled anywhere else in
prune_cli. Adding a baseline is one entry here (and, for a new mask rule, its function in gating/masks.py).
A leaf module: it imports nothing from prune_cli.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["unpruned", "learned", "rule"]


@dataclass(frozen=True)
class Variant:
    name: str
    kind: Kind  # unpruned: every module kept; learned: a gate predictor trained in `gates`; rule: a fixed mask
    # learned only: True = the predictor reads the recipe's gates.inputs (the context); False = no input, one table
    context_inputs: bool = False
    loop: str | None = None  # its training loop in the `gates` stage: the logs/<loop>.jsonl and checkpoints/<loop>/ name
    predictor_ckpt: str | None = None  # checkpoints/<this>: the trained gate predictor
    # With gates.finetune_base, the copy of the base this variant adapts on its own (checkpoints/<this>);
    # None: it runs on `runs_on`'s base.
    own_base: str | None = None
    runs_on: str | None = None  # the variant whose base a rule variant runs on
    seed_key: int = 0  # offset of its random stream from the gate seed: stable under renames
    switch: str | None = None  # the recipe key that turns it on (a bool, or prune.baselines membership for rules)
    plot_masks: bool = True  # a heatmap of its masks (an unpruned variant has nothing to draw)
    summary: str = ""

    @property
    def masked(self) -> bool:
        """Runs under masks from masks.json (every variant but the base as trained)."""
        return self is not DENSE


DENSE = Variant("dense", "unpruned", plot_masks=False, summary="the base as trained, every module run")
DENSE_TUNED = Variant(
    "dense_tuned", "unpruned", loop="dense_tuned", own_base="base_finetuned_dense_tuned.pt", seed_key=11,
    switch="gates.train_dense_tuned", plot_masks=False,
    summary="the base fine-tuned like the pruned variants with every module kept: the fair dense reference")
# The seed keys 5, 6 and 11 are the offsets the first version derived from the names' lengths ("gates", "static",
# "dense_tuned"): fixed here so that earlier runs reproduce to the bit.
CONTEXT = Variant(
    "context", "learned", context_inputs=True, loop="gates", predictor_ckpt="gates.pt", own_base="base_finetuned.pt",
    seed_key=5, summary="context-aware gates: one mask per context")
STATIC = Variant(
    "static", "learned", loop="static", predictor_ckpt="static.pt", own_base="base_finetuned_static.pt", seed_key=6,
    switch="gates.train_static", summary="one learned mask for every context, at the same sparsity")
RANDOM = Variant("random", "rule", runs_on="context", switch="prune.baselines",
                 summary="a random mask at the target sparsity (seeded)")
LAYERDROP = Variant("layerdrop", "rule", runs_on="context", switch="prune.baselines",
                    summary="whole layers dropped, evenly spaced, at the target sparsity")

# Order: the gates stage trains its loops in this order, and tables list variants in it.
VARIANTS: dict[str, Variant] = {v.name: v for v in (DENSE, CONTEXT, STATIC, DENSE_TUNED, RANDOM, LAYERDROP)}
NAMES: tuple[str, ...] = tuple(VARIANTS)
TRAINED: tuple[Variant, ...] = tuple(v for v in VARIANTS.values() if v.loop is not None)  # the gates stage's loops, in order
BASELINES: tuple[str, ...] = tuple(v.name for v in VARIANTS.values() if v.switch == "prune.baselines" or v is STATIC)
REFERENCES: tuple[str, ...] = tuple(v.name for v in VARIANTS.values() if v.kind == "unpruned")


def get(name: str) -> Variant:
    return VARIANTS[name]
