"""Stage `prune`: one binary mask per context (and per baseline) -> masks.json, heatmap, optional pruned checkpoints."""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import replace
from typing import Any

from prune_cli.data.batching import Split
from prune_cli.engine.masking import exact_cut, mode_pattern, predict_keep
from prune_cli.engine.session import Session
from prune_cli.gating.checkpoint import GateCheckpoint
from prune_cli.gating.masks import MaskFile, layerdrop_mask, mask_stats, random_mask
from prune_cli.gating.predictor import LabelVocab
from prune_cli.gating.sparsity import SparsitySpec
from prune_cli.model.checkpoint import save_model
from prune_cli.model.flops import module_flops
from prune_cli.progress import log
from prune_cli.variants import CONTEXT, LAYERDROP, RANDOM, VARIANTS


def export_masks(s: Session) -> MaskFile:
    model = s.base_model()
    train, test = s.split("train"), s.split(s.recipe.eval.split)
    ctx_ckpt = GateCheckpoint.load(s.run.predictor_ckpt(CONTEXT.name))
    targets = ctx_ckpt.targets
    # Same weighting as training (module count, or FLOPs), so calibrated masks hit the target in the same units.
    floor, always_run = ctx_ckpt.min_cross_attention, ctx_ckpt.always_run
    spec = SparsitySpec.for_targets(model.modules_list, targets, ctx_ckpt.module_flops, floor, always_run)
    labels = ctx_ckpt.labels
    mean_frames = int(sum(f.shape[0] for f in train.feats) / len(train))
    flops = ctx_ckpt.module_flops or module_flops(model, mean_frames, 12)
    # Every context seen in any split gets a mask.
    contexts = sorted({u.context for split in (train, test) for u in split.utts})
    variants: dict[str, dict[str, list[int]]] = {}

    per_utt = s.predictor(CONTEXT.name).per_utterance
    context_exact = exact_cut(s.recipe, True)
    restored: dict[str, list[str]] = {}  # variant -> contexts whose chosen mask had too few cross-attentions
    rules = {RANDOM.name: lambda: random_mask(model.modules_list, targets, s.recipe.seed + RANDOM.seed_key),
             LAYERDROP.name: lambda: layerdrop_mask(model.modules_list, targets)}
    for v in VARIANTS.values():
        if not v.masked or not s.recipe.enabled(v.name):
            continue
        if v.kind == "unpruned":  # every module kept, on its own base (the recipe check ensured finetune_base)
            variants[v.name] = {c: [1] * model.n_modules for c in contexts}
        elif v.kind == "rule":
            m = rules[v.name]()
            variants[v.name] = {c: m for c in contexts}
        elif s.run.predictor_ckpt(v.name).is_file():
            predictor, exact = s.predictor(v.name), exact_cut(s.recipe, v.context_inputs)
            variants[v.name] = _masks_for_contexts(s, predictor, spec, [train, test], contexts, labels, exact)
            if floor:
                chosen = _masks_for_contexts(s, predictor, replace(spec, min_cross_attention=0), [train, test], contexts,
                                             labels, exact)
                restored[v.name] = [c for c in contexts if chosen[c] != variants[v.name][c]]
                if restored[v.name]:
                    log(f"masks: {v.name}: gates.min_cross_attention={floor} restored cross-attention in "
                        f"{', '.join(restored[v.name])}")
    stats = {v: {c: mask_stats(model.modules_list, keep, flops) for c, keep in table.items()} for v, table in variants.items()}
    own_base = {v: s.base_model(v).weights_hash() for v in variants if s.base_model(v) is not model}
    mf = MaskFile(
        modules=[m.name for m in model.modules_list], arch_hash=model.arch_hash(), weights_hash=model.weights_hash(),
        variants=variants, stats=stats, per_utterance=per_utt, variant_weights=own_base,
        meta={"targets": targets, "scope": ctx_ckpt.scope, **labels.to_blob(), "module_flops": flops,
              "reference_utterance": {"frames": mean_frames, "tokens": 12}, "recipe_hash": s.run.stage_hash("prune"),
              "context_exact_cut": context_exact, "min_cross_attention": floor, "always_run": always_run,
              "cross_attention_restored": restored},
    )
    mf.save(s.run.masks)
    log(f"masks: {len(contexts)} contexts x {len(variants)} variants -> {s.run.masks}")
    return mf


def _masks_for_contexts(s: Session, pred, spec: SparsitySpec, splits: list[Split], contexts: list[str],  # noqa: ANN001
                        labels: LabelVocab, exact: bool = False) -> dict[str, list[int]]:
    """Context-only predictors give one pattern per context; acoustic/condition/speaker ones give each context's mode."""
    per_ctx: dict[str, list[tuple[bool, ...]]] = defaultdict(list)
    for split in splits:
        cap = 200 if pred.per_utterance else 1
        seen: dict[str, int] = defaultdict(int)
        idx = []
        for i, u in enumerate(split.utts):
            if seen[u.context] < cap:
                seen[u.context] += 1
                idx.append(i)
        for i, keep in zip(idx, predict_keep(s, pred, spec, split, idx, labels, exact)):
            per_ctx[split.utts[i].context].append(keep)
    return {c: [int(k) for k in mode_pattern(per_ctx[c])] for c in contexts}


def materialize(s: Session, mf: MaskFile) -> dict[str, dict[str, Any]]:
    """One checkpoint per context with the skipped modules deleted (not zeroed)."""
    model = copy.deepcopy(s.base_model()).cpu()  # the session's copy stays on its device
    out: dict[str, dict[str, Any]] = {}
    full = s.run.path / "pruned" / "_dense_size_probe.pt"
    save_model(full, model)
    dense_bytes = full.stat().st_size
    full.unlink()
    for ctx, keep in mf.variants[CONTEXT.name].items():
        removed = [n for n, k in zip(mf.modules, keep) if not k]
        pruned = type(model)(model.dims, removed=removed)
        state = {k: v for k, v in model.state_dict().items() if k in pruned.state_dict()}
        pruned.load_state_dict(state, strict=True)
        path = s.run.path / "pruned" / f"{ctx.replace(':', '_')}.pt"
        save_model(path, pruned, context=ctx, arch_hash=model.arch_hash(), weights_hash=model.weights_hash())
        out[ctx] = {"path": str(path.relative_to(s.run.path)), "bytes": path.stat().st_size,
                    "size_ratio": round(path.stat().st_size / dense_bytes, 4), "removed": len(removed)}
    return out


def kept_summary(mf: MaskFile, variant: str = CONTEXT.name) -> list[dict[str, Any]]:
    """Per context: kept modules per kind, for the interpretability table."""
    rows = []
    for ctx in sorted(mf.variants[variant]):
        keep = mf.variants[variant][ctx]
        by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for name, k in zip(mf.modules, keep):
            part, _, kind = name.split(".")
            by_kind[f"{part[:3]}.{kind}"][0] += k
            by_kind[f"{part[:3]}.{kind}"][1] += 1
        st = mf.stats[variant][ctx]
        rows.append({"context": ctx, "kept": {k: f"{a}/{b}" for k, (a, b) in by_kind.items()},
                     "sparsity_encoder": st["sparsity_encoder"], "sparsity_decoder": st["sparsity_decoder"],
                     "skipped": [n for n, k in zip(mf.modules, keep) if not k]})
    return rows
