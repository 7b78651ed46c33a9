"""Print the README's results table from a run directory: quality per variant next to FLOPs and latency ratios.

All ratios are pruned/dense from the same profile run (variants interleaved). Re-measure first with
`prune-cli profile RECIPE --run-dir RUN` to refresh the latency numbers on this machine.

usage: python benchmarks/pruning_ratios.py RUN_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run_dir: Path) -> None:
    ev = json.loads((run_dir / "eval" / "summary.json").read_text())
    profile = run_dir / "profile" / "summary.json"
    if profile.is_file():
        print_cost(ev, json.loads(profile.read_text()))
    else:  # e.g. `run --stages gates,prune,eval`: quality only
        print("no profile/summary.json: quality only\n| variant | avg WER (asr) | avg BLEU (st) | avg chrF (st) |\n|---|---|---|---|")
        for v, avg in ev["averages"].items():
            print(f"| {v} | {avg.get('wer', float('nan')):.2f} | {avg.get('bleu', float('nan')):.2f} | {avg.get('chrf', float('nan')):.2f} |")
    for pair in ev.get("comparisons", {}).get("pairs", []):  # eval's paired bootstrap: test-set sampling noise
        print(f"{pair['a']} - {pair['b']}, 95% interval, p: " + "; ".join(
            f"{m.upper()} {x['diff']:+.2f} [{x['ci95'][0]:+.2f}, {x['ci95'][1]:+.2f}] p {x['p']:.3f}"
            for m, x in pair["metrics"].items()))
    masks_path = run_dir / "masks.json"
    if masks_path.is_file():
        print_mask_structure(json.loads(masks_path.read_text()))


def print_cost(ev: dict, pr: dict) -> None:
    """Quality beside FLOPs and latency ratios, and how far latency follows FLOPs."""
    print(f"device: {pr['device']}")
    print("| variant | avg WER (asr) | avg BLEU (st) | sparsity | GFLOPs | FLOPs ratio | e2e latency ms | latency ratio | latency ratio per batch size |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v, d in pr["variants"].items():
        avg = ev["averages"].get(v, {})
        r = pr["ratios"].get(v, {})
        per_bs = ", ".join(f"{bs}: {x['e2e']:.3f}" for bs, x in r.get("by_batch", {}).items()) or "-"
        print(f"| {v} | {avg.get('wer', float('nan')):.2f} | {avg.get('bleu', float('nan')):.2f} | {d['sparsity']:.3f} "
              f"| {d['flops']['total'] / 1e9:.3f} | {r.get('flops', 1.0):.3f} | {d['latency_ms']['median']:.2f} "
              f"| {r.get('latency', 1.0):.3f} | {per_bs} |")
    # dense_tuned (when evaluated) is the dense copy fine-tuned like the pruned variants: the fair reference
    refs = {name: ev["averages"][name] for name in ("dense", "dense_tuned") if name in ev["averages"]}
    for v, r in pr["ratios"].items():
        flops_cut, lat_cut = 1 - r["flops"], 1 - r["latency"]
        track = lat_cut / flops_cut if flops_cut > 0 else float("nan")
        avg = ev["averages"].get(v, {})
        line = f"{v}: FLOPs -{100 * flops_cut:.1f}%, latency -{100 * lat_cut:.1f}% (latency cut / FLOPs cut = {track:.2f})"
        for name, ref in refs.items():
            if name == v:
                continue
            diffs = ", ".join(f"{m.upper()} {avg[m] - ref[m]:+.2f}" for m in ("wer", "bleu") if m in avg and m in ref)
            if diffs:
                line += f"; quality vs {name}: {diffs}"
        print(line)


def print_mask_structure(masks: dict) -> None:
    """Per learned variant: mean sparsity of ASR and of ST contexts, and how many distinct masks each part has."""
    modules = masks["modules"]
    kind_of = [f"{m.split('.')[0]}.{m.split('.')[2]}" for m in modules]  # encoder.3.cgmlp -> encoder.cgmlp
    for v in ("context", "static"):
        table, stats = masks["variants"].get(v), masks["stats"].get(v, {})
        if not table:
            continue
        rows_by_task = {task: [ctx for ctx in table if ctx.split(":")[0] == task] for task in ("asr", "st")}
        by_task = {task: " / ".join(f"{sum(stats[c][f'sparsity_{p}'] for c in ctxs) / len(ctxs):.3f}"
                                    for p in ("encoder", "decoder"))
                   for task, ctxs in rows_by_task.items() if ctxs}
        distinct = {part: len({tuple(k for k, m in zip(vec, modules) if m.startswith(part)) for vec in table.values()})
                    for part in ("encoder", "decoder")}
        print(f"{v} masks: mean sparsity enc / dec " + ", ".join(f"{t} {x}" for t, x in by_task.items())
              + f"; distinct masks: encoder {distinct['encoder']}, decoder {distinct['decoder']} of {len(table)} contexts")
        restored = masks.get("meta", {}).get("cross_attention_restored", {}).get(v)
        if restored:
            print(f"  gates.min_cross_attention restored cross-attention in {', '.join(restored)}")
        if v != "context":  # which kinds of module ASR and ST contexts give up, e.g. ST keeping more cross-attention
            continue
        for task, ctxs in rows_by_task.items():
            if not ctxs:
                continue
            skipped = dict.fromkeys(sorted(set(kind_of)), 0.0)
            for c in ctxs:
                for keep, kind in zip(table[c], kind_of):
                    skipped[kind] += (1 - keep) / len(ctxs)
            print(f"  {task} contexts, modules skipped per context by kind: "
                  + ", ".join(f"{k} {x:.2f}" for k, x in skipped.items() if x))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
