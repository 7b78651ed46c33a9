"""Paired bootstrap comparison of eval variants: is one variant's average better than another's, or test-set noise?

Each resample draws every context's utterances with replacement, the same draw for every variant (paired), and
scores it as `eval` does: corpus metrics per context, then the unweighted mean over contexts. The 95% interval of
the difference is the resamples' 2.5th to 97.5th percentile (Koehn 2004; sacrebleu's paired bootstrap, here over
the average of several test sets). Sufficient statistics per utterance make a resample a sum, not a re-scoring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import AbstractSet, Any, Mapping, Sequence

import numpy as np
import yaml

from prune_cli.engine.metrics import LOWER_IS_BETTER, bleu_measurable, score_rows, utterance_stats
from prune_cli.errors import MissingInputError, UsageError
from prune_cli.variants import CONTEXT, DENSE, DENSE_TUNED, REFERENCES

METHOD = "paired bootstrap over utterances, stratified by context; 95% percentile interval; p two-sided"
REPLICATED_METHOD = ("the mean over runs of a - b; paired bootstrap over utterances (ci95, p), and over runs and "
                     "utterances (ci95_runs, p_runs); 95% percentile intervals; exact sign-flip test of the mean over "
                     "runs (p_signflip); p two-sided")
EXACT_SIGN_FLIP_RUNS = 16  # 2^16 sign patterns; beyond that, as many drawn at random
SIGN_FLIP_SALT = 0x51F  # its own stream: [seed, 0x5EED, runs] already draws the runs' bootstrap


def comparison_pairs(variants: Sequence[str]) -> list[tuple[str, str]]:
    """Each variant against dense, each pruned one against dense_tuned (the dense copy fine-tuned alike), and the
    context-aware masks against each baseline."""
    dense, tuned, ctx = DENSE.name, DENSE_TUNED.name, CONTEXT.name
    pairs = [(v, dense) for v in variants if v != dense and dense in variants]
    if tuned in variants:
        pairs += [(v, tuned) for v in variants if v not in REFERENCES]
    if ctx in variants:
        pairs += [(ctx, b) for b in variants if b not in (*REFERENCES, ctx)]
    return pairs


def _resampled_averages(
    tasks: Mapping[str, str], refs: Mapping[str, Sequence[str]], hyps: Mapping[str, Mapping[str, Sequence[str]]],
    variants: Sequence[str], n_samples: int, seed: int, bleu_unscorable: AbstractSet[str],
) -> dict[tuple[str, str], tuple[float, np.ndarray]]:
    """(variant, metric) -> (observed average over contexts, (n_samples,) resampled averages). Every variant sees
    the same draw of each context's utterances: the resamples are paired."""
    rng = np.random.default_rng([seed, 0x5EED])
    per_ctx: dict[tuple[str, str], list[tuple[float, np.ndarray]]] = {}
    for ctx in sorted(tasks):
        n = len(refs[ctx])
        draw = rng.integers(0, n, size=(n_samples, n))
        for v in variants:
            for metric, st in utterance_stats(tasks[ctx], refs[ctx], hyps[v][ctx], ctx not in bleu_unscorable).items():
                observed = float(score_rows(metric, st.sum(0, keepdims=True))[0])
                per_ctx.setdefault((v, metric), []).append((observed, score_rows(metric, st[draw].sum(1))))
    return {key: (float(np.mean([o for o, _ in rows])), np.mean([s for _, s in rows], 0)) for key, rows in per_ctx.items()}


def _two_sided_p(diff: np.ndarray) -> float:
    """Twice the share of resamples on the far side of 0, never below 2 / (n + 1)."""
    return min(1.0, 2 * (min(int(np.sum(diff <= 0)), int(np.sum(diff >= 0))) + 1) / (len(diff) + 1))


def sign_flip_p(per_run: Sequence[float] | np.ndarray, seed: int) -> float:
    """Two-sided p of the mean of per-run differences under "each run's difference is as likely + as -" (a
    randomization test over runs, e.g. gate seeds): the share of sign patterns whose mean is at least as far from 0.
    Exact, so it can say what a bootstrap over few runs cannot: n runs can never give p below 2 / 2^n."""
    per_run = np.asarray(per_run, dtype=float)
    n = len(per_run)
    exact = n <= EXACT_SIGN_FLIP_RUNS
    if exact:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
    else:
        signs = np.random.default_rng([seed, 0x5EED, n, SIGN_FLIP_SALT]).choice([-1, 1], size=(2 ** EXACT_SIGN_FLIP_RUNS, n))
    as_far = int(np.sum(np.abs(signs @ per_run) / n >= abs(per_run.mean()) - 1e-9))
    return as_far / len(signs) if exact else (as_far + 1) / (len(signs) + 1)


def _interval(diff: np.ndarray) -> list[float]:
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return [round(float(lo), 3), round(float(hi), 3)]


def paired_bootstrap(
    tasks: Mapping[str, str], refs: Mapping[str, Sequence[str]], hyps: Mapping[str, Mapping[str, Sequence[str]]],
    pairs: Sequence[tuple[str, str]], n_samples: int, seed: int, bleu_unscorable: AbstractSet[str],
) -> dict[str, Any]:
    """tasks/refs: per context; hyps: per variant, per context. Returns the difference a - b of each averaged metric
    (BLEU, as in eval's averages, only over contexts outside `bleu_unscorable`)."""
    variants = sorted({v for p in pairs for v in p})
    return _pair_differences(_resampled_averages(tasks, refs, hyps, variants, n_samples, seed, bleu_unscorable),
                             pairs, n_samples)


def _pair_differences(avg: Mapping[tuple[str, str], tuple[float, np.ndarray]], pairs: Sequence[tuple[str, str]],
                      n_samples: int) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    for a, b in pairs:
        metrics: dict[str, Any] = {}
        for metric in sorted({m for (v, m) in avg if v == a}):
            (obs_a, res_a), (obs_b, res_b) = avg[(a, metric)], avg[(b, metric)]
            diff = res_a - res_b
            better = diff < 0 if metric in LOWER_IS_BETTER else diff > 0
            metrics[metric] = {"a": round(obs_a, 3), "b": round(obs_b, 3), "diff": round(obs_a - obs_b, 3),
                               "ci95": _interval(diff), "p": round(_two_sided_p(diff), 4),
                               "a_better_share": round(float(np.mean(better)), 4)}
        out.append({"a": a, "b": b, "metrics": metrics})
    return {"method": METHOD, "samples": n_samples, "pairs": out}


def replicated_differences(avg: Mapping[tuple[str, str], tuple[float, np.ndarray]], pairs: Sequence[tuple[str, str]],
                           n_samples: int, seed: int) -> dict[str, Any]:
    """One comparison repeated in several runs (pairs: (a, b) per run, e.g. per gate seed), on one test set, from the
    paired resamples of _resampled_averages: the difference a - b of each averaged metric, averaged over the runs.

    Two intervals. `ci95`/`p`: the utterances resampled (paired across every run and variant), the runs as they are:
    is the mean over these runs beyond the test set's noise? `ci95_runs`/`p_runs`: the runs resampled too, with
    replacement: would it hold for other seeds? With few runs it is coarse (three runs: a resample is one run three
    times in 1 of 9) and understates the runs' spread (the plain bootstrap's variance is (n - 1) / n of it).
    `p_signflip`: the runs' own differences, sign-flipped (sign_flip_p): exact, and it cannot be fooled by the
    within-run noise the utterance bootstrap misses (two variants trained apart differ even with identical masks).
    """
    run_draw = np.random.default_rng([seed, 0x5EED, len(pairs)]).integers(0, len(pairs), size=(n_samples, len(pairs)))
    metrics: dict[str, Any] = {}
    for metric in sorted({m for (v, m) in avg if v == pairs[0][0]}):
        obs = np.array([avg[(a, metric)][0] - avg[(b, metric)][0] for a, b in pairs])
        res = np.stack([avg[(a, metric)][1] - avg[(b, metric)][1] for a, b in pairs])  # (runs, samples)
        diff = res.mean(0)
        diff_runs = res[run_draw, np.arange(n_samples)[:, None]].mean(1)
        better = obs < 0 if metric in LOWER_IS_BETTER else obs > 0
        metrics[metric] = {
            "a": round(float(np.mean([avg[(a, metric)][0] for a, _ in pairs])), 3),
            "b": round(float(np.mean([avg[(b, metric)][0] for _, b in pairs])), 3),
            "diff": round(float(obs.mean()), 3), "per_run": [round(float(d), 3) for d in obs],
            "a_better_runs": int(better.sum()), "ci95": _interval(diff), "p": round(_two_sided_p(diff), 4),
            "ci95_runs": _interval(diff_runs), "p_runs": round(_two_sided_p(diff_runs), 4),
            "p_signflip": round(sign_flip_p(obs, seed), 4),
        }
    return {"method": REPLICATED_METHOD, "samples": n_samples, "runs": len(pairs), "metrics": metrics}


# ---------------------------------------------------------------- across runs


def parse_run_variant(spec: str, default_variant: str) -> tuple[Path, str]:
    """RUN_DIR[:VARIANT] -> (run dir, variant). A suffix after the last ':' is a variant unless it holds a '/'."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and "/" not in tail and not Path(spec).is_dir():
        return Path(head), tail
    return Path(spec), default_variant


def read_eval_hyps(run_dir: Path, variant: str, test_set: str | None = None) -> dict[str, dict[str, tuple[str, str]]]:
    """A run's full eval of one variant: context -> utt_id -> (ref, hyp), from eval/utterances.jsonl, or from
    eval/sets/<test_set>/utterances.jsonl for another test set."""
    path = run_dir / "eval" / ("sets/" + test_set if test_set else "") / "utterances.jsonl"
    if not path.is_file():
        how = f"an eval with eval.sets or --manifest ... --name {test_set}" if test_set else "a full `prune-cli eval`"
        raise MissingInputError(f"{path}: missing ({how} of {run_dir} writes it)")
    rows: dict[str, dict[str, dict[str, tuple[str, str]]]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            r = json.loads(line)
            rows.setdefault(r["variant"], {}).setdefault(r["context"], {})[r["utt_id"]] = (r["ref"], r["hyp"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MissingInputError(f"{path}:{n}: not an eval row ({e})") from None
    if variant not in rows:
        raise UsageError(f"{run_dir}: no eval of variant {variant!r} (evaluated: {', '.join(sorted(rows))})")
    return rows[variant]


def _run_seed(run_dir: Path) -> int:
    try:
        return int((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("seed", 0))
    except (OSError, yaml.YAMLError, TypeError, ValueError):
        return 0


def _test_set_problems(ref: tuple[Path, Mapping[str, Mapping[str, tuple[str, str]]]],
                       other: tuple[Path, Mapping[str, Mapping[str, tuple[str, str]]]]) -> list[str]:
    """Why two evals are not on the same test set (the same utterances, with the same references, per context)."""
    (run_a, ha), (run_b, hb) = ref, other
    problems: list[str] = []
    for ctx in sorted(set(ha) | set(hb)):
        if ctx not in ha or ctx not in hb:
            problems.append(f"context {ctx}: evaluated in {run_a if ctx in ha else run_b} only")
            continue
        only_a, only_b = ha[ctx].keys() - hb[ctx].keys(), hb[ctx].keys() - ha[ctx].keys()
        if only_a or only_b:
            problems.append(f"context {ctx}: {len(only_a)} utterance(s) only in {run_a}, {len(only_b)} only in {run_b}")
            continue
        changed = sum(ha[ctx][u][0] != hb[ctx][u][0] for u in ha[ctx])
        if changed:
            problems.append(f"context {ctx}: {changed} utterance(s) have different references")
    return [f"not the same test set: {p}" for p in problems]


def compare_runs(a: tuple[Path, str], b: tuple[Path, str], n_samples: int, seed: int | None,
                 replicates: Sequence[Path] = (), test_set: str | None = None) -> dict[str, Any]:
    """Paired bootstrap of variant a (in its run) against variant b (in its run) on the test utterances both
    evaluated, e.g. a recipe change against the recipe it changed. The two must hold the same test set: the same
    utterances with the same references in every context. Seed: run a's, unless given.

    `replicates`: further runs, each holding both variants (e.g. other gate seeds), in which the same comparison is
    repeated; `replicated` then holds the difference averaged over all the runs (replicated_differences)."""
    (run_a, var_a), (run_b, var_b) = a, b
    sides = [((run_a, var_a), (run_b, var_b))] + [((r, var_a), (r, var_b)) for r in replicates]
    labels = [f"{run}:{var}" for side in sides for run, var in side]
    if len(set(labels)) < len(labels):
        twice = sorted({x for x in labels if labels.count(x) > 1})
        raise UsageError([f"{x} compared with itself" if len(sides) == 1 else f"{x} given twice" for x in twice])
    evals = {f"{run}:{var}": (run, read_eval_hyps(run, var, test_set)) for side in sides for run, var in side}
    reference = evals[labels[0]]
    problems = [p for label in labels[1:] for p in _test_set_problems(reference, evals[label])]
    if problems:
        raise UsageError(list(dict.fromkeys(problems)))
    ha = reference[1]
    tasks = {ctx: ctx.split(":", 1)[0] for ctx in ha}
    order = {ctx: list(ha[ctx]) for ctx in ha}  # run a's eval order: comparing within one run repeats eval's draw
    refs = {ctx: [ha[ctx][u][0] for u in order[ctx]] for ctx in ha}
    hyps = {label: {ctx: [h[ctx][u][1] for u in order[ctx]] for ctx in ha} for label, (_, h) in evals.items()}
    unscorable = {ctx for ctx, task in tasks.items() if task == "st" and not bleu_measurable(refs[ctx])}
    seed = _run_seed(run_a) if seed is None else seed
    pairs = [(labels[2 * i], labels[2 * i + 1]) for i in range(len(sides))]
    # Scored and resampled once: each run's own comparison and their mean read the same resamples.
    avg = _resampled_averages(tasks, refs, hyps, labels, n_samples, seed, unscorable)
    out = {"a": {"run": str(run_a), "variant": var_a}, "b": {"run": str(run_b), "variant": var_b}, "seed": seed,
           "test_set": test_set or "test",
           "utterances": sum(len(r) for r in refs.values()), "bleu_unscorable": sorted(unscorable),
           "comparisons": _pair_differences(avg, pairs, n_samples)}
    if replicates:
        out["replicates"] = [str(r) for r in replicates]
        out["replicated"] = replicated_differences(avg, pairs, n_samples, seed)
    return out
