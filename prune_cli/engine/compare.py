"""Paired bootstrap comparison of eval variants: is one variant's average better than another's, or test-set noise?

Each resample draws every context's utterances with replacement, the same draw for every variant (paired), and
scores it as `eval` does: corpus metrics per context, then the unweighted mean over contexts. The 95% interval of
the difference is the resamples' 2.5th to 97.5th percentile (Koehn 2004; sacrebleu's paired bootstrap, here over
the average of several test sets). Sufficient statistics per utterance make a resample a sum, not a re-scoring.
"""

from __future__ import annotations

from typing import AbstractSet, Any, Mapping, Sequence

import numpy as np

from prune_cli.engine.metrics import LOWER_IS_BETTER, score_rows, utterance_stats

METHOD = "paired bootstrap over utterances, stratified by context; 95% percentile interval; p two-sided"


def comparison_pairs(variants: Sequence[str]) -> list[tuple[str, str]]:
    """Each pruned variant against dense, and the context-aware masks against each baseline."""
    pairs = [(v, "dense") for v in variants if v != "dense" and "dense" in variants]
    if "context" in variants:
        pairs += [("context", b) for b in variants if b not in ("dense", "context")]
    return pairs


def paired_bootstrap(
    tasks: Mapping[str, str], refs: Mapping[str, Sequence[str]], hyps: Mapping[str, Mapping[str, Sequence[str]]],
    pairs: Sequence[tuple[str, str]], n_samples: int, seed: int, bleu_unscorable: AbstractSet[str],
) -> dict[str, Any]:
    """tasks/refs: per context; hyps: per variant, per context. Returns the difference a - b of each averaged metric
    (BLEU, as in eval's averages, only over contexts outside `bleu_unscorable`)."""
    rng = np.random.default_rng([seed, 0x5EED])
    variants = sorted({v for p in pairs for v in p})
    # (variant, metric) -> per-context arrays of (observed, resampled scores)
    per_ctx: dict[tuple[str, str], list[tuple[float, np.ndarray]]] = {}
    for ctx in sorted(tasks):
        n = len(refs[ctx])
        draw = rng.integers(0, n, size=(n_samples, n))
        for v in variants:
            for metric, st in utterance_stats(tasks[ctx], refs[ctx], hyps[v][ctx], ctx not in bleu_unscorable).items():
                observed = float(score_rows(metric, st.sum(0, keepdims=True))[0])
                per_ctx.setdefault((v, metric), []).append((observed, score_rows(metric, st[draw].sum(1))))
    out: list[dict[str, Any]] = []
    for a, b in pairs:
        metrics: dict[str, Any] = {}
        for metric in sorted({m for (v, m) in per_ctx if v == a}):
            obs_a = float(np.mean([o for o, _ in per_ctx[(a, metric)]]))
            obs_b = float(np.mean([o for o, _ in per_ctx[(b, metric)]]))
            diff = np.mean([s for _, s in per_ctx[(a, metric)]], 0) - np.mean([s for _, s in per_ctx[(b, metric)]], 0)
            lo, hi = np.percentile(diff, [2.5, 97.5])
            # Two-sided: twice the share of resamples on the far side of 0, never below 2 / (n + 1).
            p = min(1.0, 2 * (min(int(np.sum(diff <= 0)), int(np.sum(diff >= 0))) + 1) / (n_samples + 1))
            better = diff < 0 if metric in LOWER_IS_BETTER else diff > 0
            metrics[metric] = {"a": round(obs_a, 3), "b": round(obs_b, 3), "diff": round(obs_a - obs_b, 3),
                               "ci95": [round(float(lo), 3), round(float(hi), 3)], "p": round(p, 4),
                               "a_better_share": round(float(np.mean(better)), 4)}
        out.append({"a": a, "b": b, "metrics": metrics})
    return {"method": METHOD, "samples": n_samples, "pairs": out}
