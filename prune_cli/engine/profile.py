"""Stage `profile`: FLOPs (FlopCounterMode) and latency (CUDA events / perf_counter) of dense vs masked variants.

Latency runs interleave the variants (A B C A B C ...) so machine drift cancels in the pruned/dense ratios,
which are computed from medians measured in the same run.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from prune_cli.atomic import atomic_write_json
from prune_cli.data.batching import Split, model_inputs
from prune_cli.engine.evaluate import EvalSet, options_for_task, resolve_contexts, scored_options
from prune_cli.engine.session import Session
from prune_cli.model.decoding import DecodeOptions, decode
from prune_cli.model.flops import count_flops, stable_name
from prune_cli.model.gated import GatedModel
from prune_cli.progress import progress
from prune_cli.variants import DENSE, DENSE_TUNED, VARIANTS


def percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats_ms(samples: Sequence[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(samples), 4), "p90": round(percentile(samples, 0.9), 4),
        "mean": round(statistics.fmean(samples), 4),
        "stdev": round(statistics.stdev(samples), 4) if len(samples) > 1 else 0.0, "n": len(samples),
    }


class Timer:
    """Milliseconds for one call: CUDA events with synchronize on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0


def measure_interleaved(
    calls: dict[str, Callable[[], object]], timer: Timer, warmup: int, repeats: int, rotate: int = 0
) -> dict[str, list[float]]:
    """Warm up each call, then time them in turn (A B C A B C ...), starting at offset `rotate`; samples in ms."""
    names = list(calls)
    names = names[rotate % len(names):] + names[: rotate % len(names)]
    for name in names:
        for _ in range(warmup):
            calls[name]()
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        for name in names:
            samples[name].append(timer(calls[name]))
    return dict(samples)


def _batch(s: Session, split: Split, idx: Sequence[int], model: GatedModel) -> tuple[torch.Tensor, torch.Tensor]:
    x, lens = model_inputs(split, idx, s.inputs_for(model))
    return x.to(s.device), lens.to(s.device)


def _kind_of(fqn: str) -> str | None:
    name = stable_name(fqn)
    if name is None:
        return None
    part, _, kind = name.split(".")
    return f"{part}.{kind}"


def variant_flops(s: Session, model: GatedModel, split: Split, groups: dict[str, list[int]],
                  keep_of: dict[str, tuple[bool, ...] | None], opts: DecodeOptions) -> dict[str, Any]:
    """Encoder forward + the full autoregressive decode at its real output lengths, summed over contexts."""
    tok = s.tokenizer
    total = enc = dec = 0
    kinds: dict[str, int] = defaultdict(int)
    uncounted: dict[str, int] = defaultdict(int)
    out_tokens = 0
    for ctx, idx in groups.items():
        x, lens = _batch(s, split, idx, model)
        u = split.utts[idx[0]]
        prompt = tok.prompt(u.task, u.source_lang, u.target_lang)
        result: list[list[int]] = []
        rep = count_flops(lambda: result.extend(decode(model, x, lens, prompt, keep_of[ctx], opts, tok.decode)))
        out_tokens += sum(len(r) + 1 for r in result)
        total += rep.total
        enc += rep.by_module.get("encoder", 0)
        dec += rep.by_module.get("decoder", 0)
        for fqn, f in rep.by_module.items():
            k = _kind_of(fqn)
            if k:
                kinds[k] += f
        for op, n in rep.uncounted_ops.items():
            uncounted[op] += n
    return {"total": total, "encoder": enc, "decoder": dec, "other": total - enc - dec, "by_kind": dict(kinds),
            "output_tokens": out_tokens, "uncounted_ops": dict(uncounted)}


def profile(s: Session, variants: Sequence[str], eval_set: "EvalSet | None" = None) -> dict[str, Any]:
    """FLOPs and latency per variant on the recipe's eval split, or on another test set (-> profile/sets/NAME/)."""
    cfg = s.recipe.profile
    if s.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    # Each variant runs on its own weights (dense: the base as trained; static: its own fine-tuned base), so
    # decoded lengths, and with them decoder FLOPs and latency, are the ones eval scores.
    models = {v: s.variant_model(v) for v in variants}
    masks = s.masks(variants) if any(VARIANTS[v].masked for v in variants) else None
    split = eval_set.split if eval_set is not None else s.split(s.recipe.eval.split)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, u in enumerate(split.utts):
        if (cfg.contexts is None or u.context in cfg.contexts) and len(groups[u.context]) < cfg.utts_per_context:
            groups[u.context].append(i)
    groups = dict(sorted(groups.items()))
    contexts = list(groups)
    scored = scored_options(s.recipe.eval, s.tokenizer, models[variants[0]], s.recipe.seed)
    greedy = replace(scored, beam_size=1, length_penalty=0.0, ctc_weight=0.0)
    # The headline latency is that of the decoding eval scores; greedy is timed beside it when that differs.
    decodings = {"e2e": scored} | ({"e2e_greedy": greedy} if scored != greedy else {})
    # A context prune made no mask for is served as eval serves it (eval.unseen_contexts), or stops here.
    fallbacks = resolve_contexts(masks, variants, set(contexts), s.recipe.eval.unseen_contexts,
                                 Counter({c: len(g) for c, g in groups.items()})) if masks is not None else {}
    served = {c: fallbacks[c]["to"] if c in fallbacks else c for c in contexts}
    # One pattern per context; with per-utterance gates that is each context's most frequent pattern.
    keep = {v: {c: masks.keep(v, served[c]) if VARIANTS[v].masked else None for c in contexts} for v in variants}

    # A subset goes beside the full profile, never over it; another set, in its own folder.
    full = eval_set is None and list(variants) == list(cfg.variants)
    summary: dict[str, Any] = {"complete": full, "device": _device_name(s.device), "threads": torch.get_num_threads(),
                               "flops_unit": "FLOPs (a multiply-add counts 2)", "flops_decoding": "greedy",
                               "decoding": {k: vars(o) for k, o in decodings.items()},
                               "decoding_label": _label(scored), "variants": {}, "ratios": {}, "contexts": contexts}
    if eval_set is not None:
        summary["set"] = eval_set.record({c: len(g) for c, g in groups.items()})
    if fallbacks:
        summary["fallbacks"] = fallbacks
    with progress("profile flops", total=len(variants)) as bar:
        for v in variants:
            summary["variants"][v] = {"flops": variant_flops(s, models[v], split, groups, keep[v], greedy)}
            bar.advance()

    # Latency: batch of `bs` utterances of one context per call, rotating contexts over repeats.
    timer = Timer(s.device)
    lat: dict[str, dict[str, dict[str, dict[str, float]]]] = defaultdict(lambda: defaultdict(dict))
    tok = s.tokenizer
    parts = ["encoder", *decodings]
    with progress("profile latency", total=len(cfg.batch_sizes) * len(parts)) as bar:
        for bs in cfg.batch_sizes:
            for part in parts:
                samples: dict[str, list[float]] = defaultdict(list)
                for rep in range(cfg.repeats):
                    ctx = contexts[rep % len(contexts)]
                    pool = groups[ctx]
                    idx = [pool[k % len(pool)] for k in range(bs)]
                    u = split.utts[idx[0]]
                    prompt = tok.prompt(u.task, u.source_lang, u.target_lang)
                    calls = {}
                    for v in variants:
                        k, (x, lens) = keep[v][ctx], _batch(s, split, idx, models[v])  # each model its own input mode
                        if part == "encoder":
                            calls[v] = (lambda k=k, m=models[v], x=x, lens=lens: m.encode(x, lens, k))
                        else:
                            o = options_for_task(decodings[part], u.task)
                            calls[v] = (lambda k=k, m=models[v], o=o, x=x, lens=lens:
                                        decode(m, x, lens, prompt, k, o, tok.decode))
                    with torch.inference_mode():
                        # Each new batch shape is warmed for every variant; the order rotates so no variant
                        # is always first after a shape change.
                        res = measure_interleaved(calls, timer, cfg.warmup if rep == 0 else 1, 1, rotate=rep)
                    for v, xs in res.items():
                        samples[v] += xs
                for v in variants:
                    lat[v][f"bs{bs}"][part] = stats_ms(samples[v])
                bar.advance()
    first = f"bs{cfg.batch_sizes[0]}"
    for v in variants:
        summary["variants"][v]["latency_ms"] = lat[v][first]["e2e"]
        if "e2e_greedy" in lat[v][first]:
            summary["variants"][v]["latency_ms_greedy"] = lat[v][first]["e2e_greedy"]
        summary["variants"][v]["latency_by_batch"] = lat[v]
        summary["variants"][v]["sparsity"] = _mean_sparsity(masks, v, [served[c] for c in contexts])
    if s.device.type == "cuda":
        for v in variants:
            torch.cuda.reset_peak_memory_stats()
            ctx = contexts[0]
            x, lens = _batch(s, split, groups[ctx], models[v])
            u = split.utts[groups[ctx][0]]
            decode(models[v], x, lens, tok.prompt(u.task, u.source_lang, u.target_lang), keep[v][ctx],
                   options_for_task(scored, u.task), tok.decode)
            summary["variants"][v]["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 2)
    summary["cpu_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    # Ratios compare the same work: dense_tuned decodes the pruned variants' domain and output lengths; the zero-shot
    # dense model of a pretrained family may stop early or run on, so it is the reference only without dense_tuned.
    reference = DENSE_TUNED.name if DENSE_TUNED.name in summary["variants"] else DENSE.name
    summary["reference"] = reference
    dense = summary["variants"].get(reference)
    if dense:
        for v in variants:
            if v == reference:
                continue
            sv = summary["variants"][v]
            summary["ratios"][v] = {
                "flops": round(sv["flops"]["total"] / dense["flops"]["total"], 4),
                "latency": round(sv["latency_ms"]["median"] / dense["latency_ms"]["median"], 4),
                "by_batch": {
                    bs: {part: round(sv["latency_by_batch"][bs][part]["median"] / dense["latency_by_batch"][bs][part]["median"], 4)
                         for part in parts}
                    for bs in sv["latency_by_batch"]
                },
            }
            if "latency_ms_greedy" in sv:
                summary["ratios"][v]["latency_greedy"] = round(
                    sv["latency_ms_greedy"]["median"] / dense["latency_ms_greedy"]["median"], 4)
    if eval_set is not None:
        out = s.run.path / "profile" / "sets" / eval_set.name / "summary.json"
    else:
        out = s.run.path / "profile" / ("summary.json" if full else "partial/summary.json")
    atomic_write_json(out, summary)
    return summary


def _label(opts: DecodeOptions) -> str:
    """How eval decodes, in words: `beam 4 + CTC 0.3 (asr)` or `greedy`."""
    if opts.beam_size == 1:
        return "greedy"
    return f"beam {opts.beam_size}" + (f" + CTC {opts.ctc_weight} (asr)" if opts.ctc_weight > 0 else "")


def _mean_sparsity(masks, variant: str, contexts: list[str]) -> float:  # noqa: ANN001
    if not VARIANTS[variant].masked or masks is None:
        return 0.0
    vals = [masks.stats[variant][c]["sparsity_total"] for c in contexts if c in masks.stats.get(variant, {})]
    return round(sum(vals) / len(vals), 4) if vals else 0.0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    import platform

    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
