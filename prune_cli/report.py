"""Rich tables for the terminal, PNG plots, and the run's report.md."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from prune_cli.atomic import atomic_write_text, dumps
from prune_cli.recipe_yaml import point_label
from prune_cli.variants import CONTEXT, DENSE, DENSE_TUNED, NAMES, VARIANTS


def _fmt(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def _bleu(summary: dict[str, Any], ctx: str, scores: dict[str, Any]) -> str:
    """A context's BLEU; n/a where its references are too short for BLEU to score (out of the average)."""
    return "n/a" if ctx in summary.get("bleu_unscorable", []) else f"{scores['bleu']:.2f}"


def eval_table(summary: dict[str, Any]) -> Table:
    variants = list(summary["variants"])
    contexts = sorted({c for t in summary["variants"].values() for c in t})
    t = Table(title="quality per context (WER/CER % for asr, BLEU/chrF for st)")
    t.add_column("context")
    t.add_column("n", justify="right")
    for v in variants:
        t.add_column(v, justify="right")
    for c in contexts:
        cells = []
        n = ""
        for v in variants:
            sc = summary["variants"][v].get(c)
            if sc is None:
                cells.append("-")
                continue
            n = str(sc["n"])
            cells.append(f"WER {sc['wer']:.2f} CER {sc['cer']:.2f}" if "wer" in sc else f"BLEU {_bleu(summary, c, sc)} chrF {sc['chrf']:.2f}")
        t.add_row(c, n, *cells)
    avg = summary.get("averages", {})
    if avg:
        t.add_row("average", "", *[" ".join(f"{k.upper()} {val:.2f}" for k, val in avg.get(v, {}).items()) for v in variants])
    return t


def comparison_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per (pair, metric) of the paired bootstrap: a, b, a - b with its 95% interval, p."""
    rows = []
    for pair in summary.get("comparisons", {}).get("pairs", []):
        for metric, m in pair["metrics"].items():
            rows.append([f"{pair['a']} vs {pair['b']}", metric.upper(), f"{m['a']:.2f}", f"{m['b']:.2f}",
                         _with_interval(m), f"{m['p']:.3f}"])
    return rows


COMPARISON_HEADER = ["variants (a vs b)", "metric (avg)", "a", "b", "a - b [95% interval]", "p"]


def comparison_table(summary: dict[str, Any]) -> Table:
    n = summary.get("comparisons", {}).get("samples", 0)
    t = Table(title=f"paired bootstrap over test utterances ({n} resamples): differences of the averages")
    for col in COMPARISON_HEADER:
        t.add_column(col, justify="left" if col.startswith("variants") else "right")
    for row in comparison_rows(summary):
        t.add_row(*row)
    return t


def replicated_table(summary: dict[str, Any]) -> Table:
    """The mean over runs of a comparison repeated in several runs (`prune-cli compare --replicate`)."""
    rep = summary["replicated"]
    a, b = summary["a"]["variant"], summary["b"]["variant"]
    t = Table(title=f"{a} vs {b}, mean over {rep['runs']} runs ({rep['samples']} resamples)")
    for col in ("metric (avg)", "a", "b", "a - b per run", f"{a} better", "mean a - b [95%, utterances]", "p",
                "[95%, runs and utterances]", "p", "p, sign-flip over runs"):
        t.add_column(col, justify="left" if col.startswith("metric") else "right")
    for metric, m in rep["metrics"].items():
        (lo, hi), (rlo, rhi) = m["ci95"], m["ci95_runs"]
        t.add_row(metric.upper(), f"{m['a']:.2f}", f"{m['b']:.2f}", " ".join(f"{d:+.2f}" for d in m["per_run"]),
                  f"{m['a_better_runs']}/{rep['runs']}", f"{m['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]", f"{m['p']:.3f}",
                  f"[{rlo:+.2f}, {rhi:+.2f}]", f"{m['p_runs']:.3f}", f"{m['p_signflip']:.3f}")
    return t


def profile_table(summary: dict[str, Any]) -> Table:
    t = Table(title=f"cost on {summary['device']} ({summary['flops_unit']}); ratios against {summary.get('reference', DENSE.name)}")
    for col in ("variant", "sparsity", "GFLOPs", "enc GFLOPs", "dec GFLOPs", "latency ms (median)", "p90",
                "FLOPs ratio", "latency ratio"):
        t.add_column(col, justify="right" if col != "variant" else "left")
    for v, d in summary["variants"].items():
        r = summary["ratios"].get(v, {})
        f = d["flops"]
        t.add_row(v, _fmt(d["sparsity"]), f"{f['total'] / 1e9:.3f}", f"{f['encoder'] / 1e9:.3f}", f"{f['decoder'] / 1e9:.3f}",
                  _fmt(d["latency_ms"]["median"]), _fmt(d["latency_ms"]["p90"]), _fmt(r.get("flops", 1.0)),
                  _fmt(r.get("latency", 1.0)))
    return t


def kept_table(rows: list[dict[str, Any]]) -> Table:
    kinds = list(rows[0]["kept"]) if rows else []
    t = Table(title="modules kept per context (kept/total)")
    t.add_column("context")
    for k in kinds:
        t.add_column(k, justify="right")
    t.add_column("enc sparsity", justify="right")
    t.add_column("dec sparsity", justify="right")
    for r in rows:
        t.add_row(r["context"], *[r["kept"][k] for k in kinds], _fmt(r["sparsity_encoder"]), _fmt(r["sparsity_decoder"]))
    return t


def print_table(table: Table, to_stderr: bool = False) -> None:
    import sys

    stream = sys.stderr if to_stderr else sys.stdout
    # Logs and CI capture are not terminals; give tables room instead of rich's 80-column default.
    Console(file=stream, width=None if stream.isatty() else 200).print(table)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def quality_rows(ev: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    variants = list(ev["variants"])
    contexts = sorted({c for t in ev["variants"].values() for c in t})
    rows = []
    for c in contexts:
        row: list[Any] = [c]
        for v in variants:
            sc = ev["variants"][v].get(c, {})
            if "wer" in sc:
                row.append(f"{sc['wer']:.2f}")
            elif "bleu" in sc:
                row.append(_bleu(ev, c, sc) + (f" / {sc['chrf']:.2f}" if "chrf" in sc else ""))
            else:
                row.append("-")
        rows.append(row)
    avg = ev.get("averages", {})
    for metric, label in (("wer", "WER (asr)"), ("bleu", "BLEU (st)"), ("chrf", "chrF (st)")):
        if any(metric in avg.get(v, {}) for v in variants):
            rows.append([f"**avg {label}**"] + [_num(avg.get(v, {}).get(metric)) for v in variants])
    return ["context (WER % / BLEU / chrF)"] + variants, rows


def sweep_rows(sweep: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per sweep point and variant: averages, sparsity, FLOPs and latency ratios."""
    rows = []
    for row in sweep["rows"]:
        label = point_label(row["point"])  # the point's run directory under sweep/
        for v in NAMES:
            if v in row:
                d = row[v]
                rows.append([label, v, _num(d.get("wer")), _num(d.get("bleu")), _num(d.get("chrf")),
                             _num(d.get("sparsity"), 3), _num(d.get("flops_ratio"), 3), _num(d.get("latency_ratio"), 3)])
    return ["point", "variant", "avg WER", "avg BLEU", "avg chrF", "sparsity", "FLOPs ratio", "latency ratio"], rows


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def write_report(run_dir: Path, recipe_path: str, overrides: list[str]) -> Path:
    """report.md from what the stages wrote: quality, cost, masks, plots and the commands to rerun each stage."""
    ev = _read(run_dir / "eval" / "summary.json")
    pr = _read(run_dir / "profile" / "summary.json")
    masks = _read(run_dir / "masks.json")
    env = _read(run_dir / "env.json")
    metrics = _read(run_dir / "metrics.json")
    set_flags = "".join(f" --set {shlex.quote(o)}" for o in overrides)
    rd = f" --run-dir {shlex.quote(str(run_dir))}"
    lines = [f"# prune-cli report: {run_dir.name}", ""]
    lines += [f"Machine: {env.get('device_name')} ({env.get('device')}), {env.get('cpu_count')} CPUs, torch {env.get('torch')}, "
              f"git {env.get('git_commit')}, seed {env.get('seed')}.", ""]
    if ev:
        h, rows = quality_rows(ev)
        lines += ["## Quality (test split)", "", f"Normalization: {ev['normalization']}.", "",
                  markdown_table(h, rows), "", f"BLEU signature: `{ev['signatures'].get('bleu', '-')}`", ""]
        if ev.get("comparisons"):
            lines += [f"Differences of the averages, {ev['comparisons']['method']} ({ev['comparisons']['samples']} "
                      "resamples). WER/CER: lower is better; BLEU/chrF: higher.", "",
                      markdown_table(COMPARISON_HEADER, comparison_rows(ev)), ""]
    sets = set_summaries(run_dir)
    if ev and sets:
        h, rows = robustness_rows(ev, sets)
        lines += ["## Robustness: every test set", "",
                  "Averages per set (WER/CER: lower is better; BLEU: higher). The difference columns say what pruning "
                  "costs on each set, with paired-bootstrap 95% intervals: a cost that grows from `test` to the noisy "
                  "or unseen-voice sets is a cost that clean speech hides.", "", markdown_table(h, rows), ""]
    for es in sets:
        info = es["set"]
        h, rows = quality_rows(es)
        notes = [f"{sum(info['utterances'].values())} utterances in {len(info['utterances'])} contexts, manifest "
                 f"fingerprint {info['fingerprint']}"]
        if info.get("context_defaulted"):
            notes.append(f"{info['context_defaulted']} took the default context")
        if es.get("fallbacks"):
            served = ", ".join(f"{c} -> {f['to']}" for c, f in es["fallbacks"].items())
            notes.append(f"contexts without a trained mask served by: {served}")
        lines += [f"## Test set {info['name']} ({info['manifest']})", "", "; ".join(notes) + ".", "",
                  markdown_table(h, rows), ""]
        if es.get("comparisons"):
            lines += [markdown_table(COMPARISON_HEADER, comparison_rows(es)), ""]
        ps = _read(run_dir / "profile" / "sets" / info["name"] / "summary.json") if (
            run_dir / "profile" / "sets" / info["name"] / "summary.json").is_file() else {}
        if ps.get("ratios"):
            lines += [f"Cost on this set ({ps.get('decoding_label', 'greedy')}), against {ps.get('reference', DENSE.name)}: " + "; ".join(
                f"{v} FLOPs {r['flops']}, latency {r['latency']}" for v, r in ps["ratios"].items()) + ".", ""]
    if masks:
        lines += ["## Masks", "", "![mask heatmap](plots/masks_context.png)", ""]
        st = masks["stats"]
        hdr = ["variant", "enc sparsity (mean)", "dec sparsity (mean)", "prunable FLOPs ratio (mean)"]
        rows = []
        for v, table in st.items():
            vals = list(table.values())
            rows.append([v] + [round(sum(x[k] for x in vals) / len(vals), 3)
                               for k in ("sparsity_encoder", "sparsity_decoder", "prunable_flops_ratio")])
        lines += [markdown_table(hdr, rows), ""]
    if pr:
        label = pr.get("decoding_label", "greedy")
        greedy = any("latency_ms_greedy" in d for d in pr["variants"].values())
        hdr = ["variant", "GFLOPs", "FLOPs ratio", f"latency ms, {label} (median)", "p90", "latency ratio"]
        hdr += ["latency ratio, greedy"] if greedy else []
        rows = [[v, round(d["flops"]["total"] / 1e9, 4), pr["ratios"].get(v, {}).get("flops", 1.0),
                 d["latency_ms"]["median"], d["latency_ms"]["p90"], pr["ratios"].get(v, {}).get("latency", 1.0)]
                + ([pr["ratios"].get(v, {}).get("latency_greedy", 1.0)] if greedy else [])
                for v, d in pr["variants"].items()]
        lines += ["## Cost", "", f"Device: {pr['device']}. {pr['flops_unit']}, encoder + full greedy decode at the real "
                  f"output lengths. Latency: encoder + the decoding eval scores ({label})"
                  + (", and greedy beside it" if greedy else "") + f". Ratios are against {pr.get('reference', DENSE.name)}, "
                  "from the same run (variants interleaved).", "", markdown_table(hdr, rows), "", "![latency vs FLOPs](plots/cost.png)", ""]
        bs_rows = []
        for v, d in pr["variants"].items():
            for bs, parts in d["latency_by_batch"].items():
                ratios = pr["ratios"].get(v, {}).get("by_batch", {}).get(bs, {})
                bs_rows.append([v, bs, parts["encoder"]["median"], parts["e2e"]["median"], ratios.get("e2e", 1.0)]
                               + ([parts["e2e_greedy"]["median"], ratios.get("e2e_greedy", 1.0)] if greedy else []))
        cols = ["variant", "batch", "encoder", f"e2e ({label})", "e2e ratio"] + (["e2e greedy", "greedy ratio"] if greedy else [])
        lines += ["Batch-size sweep (median ms):", "", markdown_table(cols, bs_rows), ""]
    sweep = _read(run_dir / "sweep" / "summary.json")
    if sweep.get("rows"):
        lines += ["## Sweep", "", "More operating points, each trained on this run's base (see `sweep/`). Averages; "
                  "ratios against the unpruned reference.", "", markdown_table(*sweep_rows(sweep)), "", "![quality vs cost](plots/pareto.png)", ""]
    if metrics.get("base"):
        lines += ["## Training", "", f"Base: {dumps(metrics['base'], indent=None)}", ""]
    if metrics.get("gates"):
        lines += [f"Gates: {dumps(metrics['gates'], indent=None)}", ""]
    lines += ["## Rerun each stage", "", "```sh"]
    for stage in ("base", "gates"):
        lines.append(f"prune-cli train {shlex.quote(recipe_path)} --stage {stage}{set_flags}{rd}")
    for cmd in ("prune", "eval", "profile"):
        lines.append(f"prune-cli {cmd} {shlex.quote(recipe_path)}{set_flags}{rd}")
    lines += ["```", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def set_summaries(run_dir: Path) -> list[dict[str, Any]]:
    """The eval summaries of the other test sets (eval/sets/*), by name."""
    out = []
    for path in sorted((run_dir / "eval" / "sets").glob("*/summary.json")):
        es = _read(path)
        if es.get("set"):
            out.append(es)
    return out


def _diff(summary: dict[str, Any], a: str, b: str, metric: str) -> str:
    """a - b of a metric's average with its bootstrap interval, from the summary's comparisons; '-' when absent."""
    for pair in summary.get("comparisons", {}).get("pairs", []):
        m = pair["metrics"].get(metric)
        if pair["a"] == a and pair["b"] == b and m:
            return _with_interval(m)
    return "-"


def _with_interval(m: dict[str, Any]) -> str:
    """A bootstrap difference with its 95% interval: +1.23 [-0.40, +2.90]."""
    lo, hi = m["ci95"]
    return f"{m['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def robustness_rows(ev: dict[str, Any], sets: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Every test set side by side, one row per set and metric: each variant's average, what pruning costs against
    the dense reference (dense_tuned where evaluated), and context-aware against static, with 95% intervals."""
    variants = list(ev.get("averages", {}))
    ref = DENSE_TUNED.name if DENSE_TUNED.name in variants else DENSE.name
    pruned = [v for v in variants if VARIANTS[v].kind != "unpruned"]
    baselines = [b for b in pruned if b != CONTEXT.name] if CONTEXT.name in pruned else []
    header = ["test set", "metric"] + variants + [f"{v} - {ref}" for v in pruned] + [f"{CONTEXT.name} - {b}" for b in baselines]
    rows = []
    for name, summary in [("test", ev)] + [(es["set"]["name"], es) for es in sets]:
        for metric in ("wer", "bleu"):
            avg = summary.get("averages", {})
            if not any(metric in avg.get(v, {}) for v in variants):
                continue
            row = [name, f"avg {metric.upper()}"] + [_num(avg.get(v, {}).get(metric)) for v in variants]
            row += [_diff(summary, v, ref, metric) for v in pruned]
            row += [_diff(summary, CONTEXT.name, b, metric) for b in baselines]
            rows.append(row)
        kept = summary.get("sparsity", {})  # the masks decoded on this set (they differ between sets with acoustic inputs)
        if any(v in kept for v in pruned):
            rows.append([name, "prunable FLOPs kept"] + [_num(kept.get(v, {}).get("prunable_flops_ratio"), 3) for v in variants]
                        + [""] * (len(header) - 2 - len(variants)))
    return header, rows


def headline_rows(run_dir: Path) -> tuple[list[str], list[list[str]]]:
    """The report's headline, one row per evaluated variant: averages, sparsity, FLOPs and latency ratios."""
    ev = _read(run_dir / "eval" / "summary.json")
    pr = _read(run_dir / "profile" / "summary.json")
    ref = pr.get("reference", DENSE.name)
    header = ["variant", "avg WER", "avg BLEU", "avg chrF", "sparsity", f"FLOPs ratio (vs {ref})",
              f"latency ratio (vs {ref}, {pr.get('decoding_label', 'greedy')})"]
    rows = []
    for v in dict.fromkeys([*ev.get("averages", {}), *pr.get("variants", {})]):
        avg, cost = ev.get("averages", {}).get(v, {}), pr.get("variants", {}).get(v)
        ratio = pr.get("ratios", {}).get(v, {}) if cost else {}
        rows.append([v, _num(avg.get("wer")), _num(avg.get("bleu")), _num(avg.get("chrf")),
                     _num(cost.get("sparsity") if cost else None, 3),
                     _num(ratio.get("flops", 1.0) if cost else None, 3), _num(ratio.get("latency", 1.0) if cost else None, 3)])
    return header, rows


def robustness_table(run_dir: Path) -> Table | None:
    """The report's robustness table for the terminal; None when the run scored no other test set."""
    sets = set_summaries(run_dir)
    ev = _read(run_dir / "eval" / "summary.json")
    if not sets or not ev:
        return None
    header, rows = robustness_rows(ev, sets)
    t = Table(title="every test set: averages, and what pruning costs on each [95% interval]")
    for col in header:
        t.add_column(col, justify="left" if col in ("test set", "metric") else "right")
    for r in rows:
        t.add_row(*r)
    return t


def headline_table(run_dir: Path) -> Table:
    header, rows = headline_rows(run_dir)
    t = Table(title=f"{run_dir}: test-split averages; cost ratios against the unpruned reference (details: report.md)")
    for col in header:
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        t.add_row(*r)
    return t


def corpus_table(manifest_dir: str, summary: dict[str, Any]) -> Table:
    t = Table(title=f"corpus {manifest_dir}")
    for col in ("split", "context", "utterances", "hours"):
        t.add_column(col)
    for split, table in summary.items():
        for ctx, e in sorted(table.items()):
            t.add_row(split, ctx, str(e["utts"]), f"{e['hours']:.3f}")
    return t


def contexts_table(title: str, contexts: dict[str, dict[str, float]]) -> Table:
    t = Table(title=f"contexts in {title}")
    t.add_column("context")
    for col in ("utterances", "hours"):
        t.add_column(col, justify="right")
    for ctx, e in contexts.items():
        t.add_row(ctx, str(e["utterances"]), f"{e['hours']:.3f}")
    return t


def model_table(out: dict[str, Any]) -> Table:
    t = Table(title=f"{out['params_total'] / 1e6:.2f}M parameters; FLOPs for {out['frames']} frames, {out['tokens']} tokens")
    for col in ("kind", "modules", "params", "GFLOPs"):
        t.add_column(col)
    for k, v in out["by_kind"].items():
        t.add_row(k, str(v["count"]), f"{v['params']:,}", f"{v['flops'] / 1e9:.4f}")
    return t


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
