"""Turning predictors and mask files into keep patterns, and grouping utterances by pattern for batched inference."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence

import torch

from prune_cli.data.batching import Split, model_inputs
from prune_cli.engine.session import Session
from prune_cli.gating.masks import MaskFile
from prune_cli.gating.predictor import ContextInputs, GatePredictor, LabelVocab
from prune_cli.gating.sparsity import SparsitySpec
from prune_cli.model.gated import GatedModel
from prune_cli.recipe_schema import Recipe
from prune_cli.variants import STATIC, VARIANTS

Keep = tuple[bool, ...]


@torch.no_grad()
def predict_keep(
    s: Session, predictor: GatePredictor, spec: SparsitySpec, split: Split, idx: Sequence[int], labels: LabelVocab,
    exact: bool = False,
) -> list[Keep]:
    """Deterministic keep pattern per utterance (inference path: argmax, no noise)."""
    out: list[Keep] = []
    for start in range(0, len(idx), 256):
        chunk = list(idx[start : start + 256])
        x, lens = (t.to(s.device) for t in model_inputs(split, chunk, s.inputs))
        us = [split.utts[i] for i in chunk]
        ctx = ContextInputs.build([u.task for u in us], [u.source_lang for u in us], [u.target_lang for u in us],
                                  [u.speaker for u in us], [u.condition for u in us], x, lens, labels, s.tokenizer.vocab)
        logits = predictor(ctx)
        keep = spec.deployed_gates(logits, exact).bool().cpu()
        out += [tuple(row.tolist()) for row in keep]
    return out


def exact_cut(r: Recipe, context_aware: bool) -> bool:
    """Whether a variant's masks are cut at exactly the target (largest skip margins first) instead of the argmax:
    the static baseline (prune.calibrate_static), and the context-aware predictor when every context is held to the
    target itself (gates.sparsity_per: context), so that each context skips exactly its share by its own ranking."""
    return r.gates.sparsity_per == "context" if context_aware else r.prune.calibrate_static


def utterance_patterns(
    s: Session, variant: str, model: GatedModel, split: Split, idx: Sequence[int], masks: MaskFile | None,
    fallback: dict[str, str] | None = None,
) -> list[Keep | None]:
    """Keep pattern of each utterance for a variant (None = dense). Per-utterance predictors are re-run.

    `fallback` maps a context prune never saw to the trained context (or the static variant) whose mask serves it."""
    if not VARIANTS[variant].masked:
        return [None] * len(idx)
    assert masks is not None
    if VARIANTS[variant].context_inputs and masks.per_utterance:
        pred = s.predictor(variant)
        spec = spec_from_masks(model, masks)
        return predict_keep(s, pred, spec, split, idx, LabelVocab.from_blob(masks.meta), masks.meta.get("context_exact_cut", False))
    table = masks.variants.get(variant, {})
    single = {tuple(v) for v in table.values()}

    def keep(ctx: str) -> Keep:
        if ctx in table or not fallback or ctx not in fallback:
            return masks.keep(variant, ctx)
        if len(single) == 1:  # one mask for every context (static, random, layerdrop, dense_tuned)
            return tuple(bool(v) for v in next(iter(single)))
        to = fallback[ctx]
        return masks.keep(STATIC.name, next(iter(masks.variants[STATIC.name]))) if to == STATIC.name else masks.keep(variant, to)

    return [keep(split.utts[i].context) for i in idx]


def spec_from_masks(model: GatedModel, masks: MaskFile) -> SparsitySpec:
    return SparsitySpec.for_targets(model.modules_list, masks.meta.get("targets", {}), None,
                                    masks.meta.get("min_cross_attention", 0), masks.meta.get("always_run", []))


def group_by_pattern(split: Split, idx: Sequence[int], patterns: Sequence[Keep | None]) -> dict[tuple[str, Keep | None], list[int]]:
    """(context, pattern) -> utterance indices: each group decodes as batches with one prompt and one mask."""
    groups: dict[tuple[str, Keep | None], list[int]] = defaultdict(list)
    for i, p in zip(idx, patterns):
        groups[(split.utts[i].context, p)].append(i)
    return dict(groups)


def mode_pattern(patterns: Sequence[Keep]) -> Keep:
    return Counter(patterns).most_common(1)[0][0]
