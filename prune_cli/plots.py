"""PNG plots of a run: mask heatmaps, latency vs FLOPs, quality vs cost over a sweep. Written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prune_cli.atomic import atomic_savefig
from prune_cli.variants import CONTEXT, DENSE, STATIC


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    atomic_savefig(fig, path)
    _pyplot().close(fig)


def plot_heatmap(modules: list[str], table: dict[str, list[int]], path: Path, variant: str) -> None:
    """Kept (green) and skipped (white) modules, one row per context."""
    plt = _pyplot()
    ctxs = sorted(table)
    fig, ax = plt.subplots(figsize=(max(8, len(modules) * 0.22), 1.2 + 0.35 * len(ctxs)))
    ax.imshow([table[c] for c in ctxs], cmap="Greens", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(ctxs)), ctxs)
    ax.set_xticks(range(len(modules)), modules, rotation=90, fontsize=7)
    ax.set_title(f"kept modules per context ({variant}); green = kept, white = skipped")
    _save(fig, path)


def plot_cost(summary: dict[str, Any], path: Path) -> None:
    """Each variant's end-to-end latency against its FLOPs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, d in summary["variants"].items():
        x, y = d["flops"]["total"] / 1e9, d["latency_ms"]["median"]
        ax.scatter(x, y, s=60, label=v)
        ax.annotate(v, (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("GFLOPs (encoder + full decode, profile subset)")
    ax.set_ylabel(f"end-to-end latency, median ms ({summary.get('decoding_label', 'scored decoding')})")
    ax.set_title(summary["device"])
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_pareto(rows: list[dict[str, Any]], path: Path, keys: str) -> None:
    """Average WER and BLEU against FLOPs and latency ratios, one point per sweep value."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ci, cost in enumerate(("flops_ratio", "latency_ratio")):
        for ri, metric in enumerate(("wer", "bleu")):
            ax = axes[ri][ci]
            for variant, marker in ((DENSE.name, "s"), (CONTEXT.name, "o"), (STATIC.name, "^")):
                pts = [(r[variant][cost], r[variant].get(metric)) for r in rows if variant in r and r[variant].get(metric) is not None]
                if pts:
                    xs, ys = zip(*sorted(pts))
                    ax.plot(xs, ys, marker=marker, label=variant)
            ax.set_xlabel(f"{cost.replace('_', ' ')} (pruned/dense)")
            ax.set_ylabel(f"avg {metric.upper()}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"quality vs cost, sweep over {keys}")
    _save(fig, path)
