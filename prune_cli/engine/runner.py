"""The stage runner: the one place that decides whether a stage is current, runs it, and writes its marker.

Every CLI command that runs a stage goes through `run_stage` or `run_stages`; `run` adds sweeps on top.
A stage is current when its marker (stages/<stage>.json) holds the hash of the recipe sections and data it read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from prune_cli.atomic import atomic_write_json, atomic_write_text
from prune_cli.data.synth import SYNTH_VERSION, build_corpus, plan_corpus
from prune_cli.engine.session import Session
from prune_cli.errors import MissingInputError, UsageError
from prune_cli.plots import plot_cost, plot_heatmap, plot_pareto
from prune_cli.progress import log, progress
from prune_cli.recipe import build_recipe
from prune_cli.recipe_schema import Recipe
from prune_cli.recipe_yaml import point_label, sweep_point_raw
from prune_cli.runs import STAGES, RunDir
from prune_cli.variants import TRAINED, VARIANTS

if TYPE_CHECKING:
    from prune_cli.engine.evaluate import EvalSet

# ---------------------------------------------------------------- stages


def corpus_hash(r: Recipe) -> str:
    return f"{r.section_hash('seed', 'data')[:16]}-v{SYNTH_VERSION}"


def corpus_ready(r: Recipe) -> bool:
    marker = Path(r.data.manifest_dir) / "corpus.json"
    try:
        return json.loads(marker.read_text()).get("hash") == corpus_hash(r)
    except (OSError, json.JSONDecodeError):
        return False


def stage_synth(s: Session) -> dict[str, Any]:
    return synthesize(s.recipe)


def synthesize(r: Recipe) -> dict[str, Any]:
    if r.data.kaldi_dir:
        raise UsageError("data synth: this recipe reads a Kaldi data dir (data.kaldi_dir); there is nothing to synthesize")
    cfg = r.data.synth
    specs = plan_corpus(cfg, r.seed)  # the robustness sets included
    with progress("synth", total=len(specs)) as bar:
        summary = build_corpus(cfg, Path(r.data.manifest_dir), r.data.sample_rate, r.seed, bar.advance, specs=specs)
    atomic_write_json(Path(r.data.manifest_dir) / "corpus.json", {"hash": corpus_hash(r), "summary": summary})
    return summary


def stage_base(s: Session) -> dict[str, Any]:
    if s.is_pretrained:  # a pretrained base is imported, not trained: no loop checkpoints to stamp
        from prune_cli.engine.pretrained import import_pretrained_base

        return import_pretrained_base(s)
    from prune_cli.engine.train import train_base

    _fresh_if_changed(s, "base", ["base"])
    return train_base(s)


def stage_gates(s: Session) -> dict[str, Any]:
    from prune_cli.engine.train import ADAPT_LOOP, train_gates

    _fresh_if_changed(s, "gates", [ADAPT_LOOP, *(str(v.loop) for v in TRAINED)])
    return train_gates(s)


def stage_prune(s: Session, materialize: bool | None = None) -> dict[str, Any]:
    from prune_cli.engine.prune import export_masks, kept_summary
    from prune_cli.engine.prune import materialize as write_pruned

    mf = export_masks(s)
    for v in (v for v in mf.variants if VARIANTS[v].plot_masks):
        plot_heatmap(mf.modules, mf.variants[v], s.run.path / "plots" / f"masks_{v}.png", v)
    out: dict[str, Any] = {"masks": str(s.run.masks), "kept": kept_summary(mf), "stats": mf.stats,
                           "per_utterance": mf.per_utterance}
    if materialize if materialize is not None else s.recipe.prune.materialize:
        out["materialized"] = write_pruned(s, mf)
    atomic_write_json(s.run.path / "prune" / "summary.json", out)
    return out


def stage_eval(s: Session, variants: list[str] | None = None, contexts: list[str] | None = None,
               eval_set: EvalSet | None = None) -> dict[str, Any]:
    from prune_cli.engine.evaluate import evaluate, load_eval_set

    full = eval_set is None and contexts is None and variants is None
    extra = s.recipe.eval.set_paths(s.recipe.data.manifest_dir) if full else []
    missing = missing_eval_sets(s.recipe, synth_first=False) if full else []
    if missing:  # before anything is written
        raise MissingInputError(missing)
    result = evaluate(s, variants or s.recipe.eval.variants, contexts, eval_set)
    if extra:  # the full evaluation also scores the recipe's other test sets
        result["sets"] = {}
        for name, path in extra:
            log(f"[eval] test set {name} ({path})")
            result["sets"][name] = evaluate(s, s.recipe.eval.variants, None, load_eval_set(s, path, name, None))["averages"]
    return result


def missing_eval_sets(r: Recipe, synth_first: bool) -> list[str]:
    """One line per eval.sets entry that is not there (and, with synth_first, that the synth stage will not write)."""
    built = {ts.name for ts in r.data.synth.test_sets} if synth_first and not r.data.kaldi_dir else set()
    return [f"eval.sets: {name}: {path} not found (a synth test set is built by `prune-cli data synth RECIPE`; "
            "a path names a JSONL manifest or a Kaldi dir)"
            for name, path in r.eval.set_paths(r.data.manifest_dir) if not path.exists() and name not in built]


def stage_profile(s: Session, variants: list[str] | None = None, eval_set: EvalSet | None = None) -> dict[str, Any]:
    from prune_cli.engine.profile import profile

    summary = profile(s, variants or s.recipe.profile.variants, eval_set)
    if summary["complete"]:
        plot_cost(summary, s.run.path / "plots" / "cost.png")
    return summary


def _fresh_if_changed(s: Session, stage: str, loop_names: list[str]) -> None:
    """A training loop resumes only from checkpoints made with the same config; otherwise it starts over.

    Under torchrun rank 0 alone decides (the others wait for it when the process group forms)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    h = s.run.stage_hash(stage)
    for name in loop_names:
        d = s.run.checkpoints / name
        stamp = d / "config_hash"
        if d.exists() and (not stamp.is_file() or stamp.read_text().strip() != h):
            log(f"{name}: checkpoints were made with a different config; starting over")
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, h)


STAGE_FUNCS: dict[str, Callable[[Session], dict[str, Any]]] = {
    "synth": stage_synth, "base": stage_base, "gates": stage_gates, "prune": stage_prune, "eval": stage_eval,
    "profile": stage_profile,
}


def mark_complete(run: RunDir, stage: str, info: dict[str, Any] | None = None) -> None:
    """Write a stage's marker (its outputs are complete for the current config and data), and the run's record."""
    run.record()
    atomic_write_json(run.marker(stage), {"hash": run.stage_hash(stage), **(info or {})})


def reset_stage(s: Session, stage: str) -> None:
    """--force: forget a stage's outputs so it is redone from scratch (and, through hashes, what follows)."""
    s.run.marker(stage).unlink(missing_ok=True)
    if stage == "synth":
        (Path(s.recipe.data.manifest_dir) / "corpus.json").unlink(missing_ok=True)
    if stage == "base":
        for p in (s.run.checkpoints / "base", s.run.tokenizer_dir, s.run.cmvn, s.run.base_ckpt):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if stage == "gates":
        for v in TRAINED:
            shutil.rmtree(s.run.checkpoints / str(v.loop), ignore_errors=True)
            for p in (s.run.finetuned_ckpt_for(v.name), *([s.run.predictor_ckpt(v.name)] if v.predictor_ckpt else [])):
                p.unlink(missing_ok=True)


def is_complete(s: Session, stage: str) -> bool:
    if stage == "synth":
        return bool(s.recipe.data.kaldi_dir) or corpus_ready(s.recipe)
    return s.run.stage_complete(stage)


def run_stage(s: Session, stage: str, **kwargs: Any) -> dict[str, Any]:
    """Run one stage (resuming where its checkpoints allow) and mark it complete when its output is whole.

    eval and profile of a subset of variants or contexts write beside the full results and mark nothing."""
    result = STAGE_FUNCS[stage](s, **kwargs)
    if stage != "synth" and s.dist.is_main and result.get("complete", True):
        mark_complete(s.run, stage)
    return result


def run_stages(s: Session, stages: list[str], force: list[str], recipe_path: str, overrides: list[str],
               skip_current: bool = True) -> dict[str, Any]:
    """Stages in order, each skipped when current (unless `skip_current` is off); `force` redoes a stage and those after it."""
    from prune_cli.report import write_report

    results: dict[str, Any] = {}
    forced_from = min((STAGES.index(f) for f in force), default=len(STAGES))
    base_due = "base" in stages and (STAGES.index("base") >= forced_from or not (skip_current and is_complete(s, "base")))
    if "eval" in stages:  # before any training: a test set eval cannot find would stop the run at its end
        missing = missing_eval_sets(s.recipe, synth_first="synth" in stages)
        if missing:
            raise MissingInputError(missing)
    if s.is_pretrained and base_due:  # before synth spends minutes: the pretrained model must be there to import
        from prune_cli.engine.pretrained import pretrained_problem

        problem = pretrained_problem(s.recipe.model.family, s.recipe.model.pretrained)
        if problem:
            raise MissingInputError(f"model.pretrained: {problem}")
    for stage in stages:
        if STAGES.index(stage) >= forced_from and stage in STAGE_FUNCS:
            reset_stage(s, stage)
        if stage == "report":
            results["report"] = str(write_report(s.run.path, recipe_path, overrides))
            continue
        if skip_current and is_complete(s, stage):
            log(f"[{stage}] up to date, skipped (use --force {stage} to redo it)")
            results[stage] = "skipped"
            continue
        log(f"[{stage}] running")
        results[stage] = run_stage(s, stage)
    return results


# ---------------------------------------------------------------- sweeps


def sweep(
    parent: Session, raw: dict[str, Any], points: list[dict[str, Any]], make_session: Callable[[Recipe, Path], Session],
    recipe_path: str, overrides: list[str],
) -> dict[str, Any]:
    """Shared base, then gates -> prune -> eval -> profile for each point; a table and a quality-vs-cost plot.

    `raw` is the recipe with the run's overrides applied; each point's values go on top of it."""
    run_stages(parent, ["synth", "base"], [], recipe_path, overrides)
    rows = []
    for point in points:
        label = point_label(point)
        sub_over = [*overrides, *(f"{k}={v}" for k, v in point.items())]  # the child report's rerun commands
        child = make_session(build_recipe(sweep_point_raw(raw, point), recipe_path), parent.run.path / "sweep" / label)
        child.run.open(str(child.device))
        if _share_base(parent.run, child.run):
            log(f"[sweep] {label}: the shared base was retrained; redoing this point's gates and what follows")
            for stage in ("gates", "prune", "eval", "profile"):
                reset_stage(child, stage)
        log(f"[sweep] {label}")
        run_stages(child, ["base", "gates", "prune", "eval", "profile", "report"], [], recipe_path, sub_over)
        rows.append(_sweep_row(child.run.path, point))
    keys = list(dict.fromkeys(k for p in points for k in p))
    out: dict[str, Any] = {"keys": keys, "rows": rows}
    atomic_write_json(parent.run.path / "sweep" / "summary.json", out)
    plot_pareto(rows, parent.run.path / "plots" / "pareto.png", ", ".join(keys))
    return out


def _share_base(parent: RunDir, child: RunDir) -> bool:
    """Link the parent's base outputs into the child when the base config is identical.

    True when a link the child had pointed at an older parent base (retrained since): what the child trained on
    it is stale."""
    if parent.stage_hash("base") != child.stage_hash("base") or not parent.stage_complete("base"):
        return False
    rels = ["checkpoints/base.pt", "cmvn.pt", "tokenizer/tokenizer.json", "tokenizer/spm.model"]
    rels += [f"cache/{p.name}" for p in (parent.path / "cache").glob("*.pt")]
    replaced = False
    for rel in rels:
        src, dst = parent.path / rel, child.path / rel
        if not src.is_file() or (dst.exists() and os.path.samefile(src, dst)):
            continue
        if dst.exists():
            dst.unlink()
            replaced = True
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
    mark_complete(child, "base", {"shared_from": str(parent.path)})
    return replaced


def _sweep_row(run_dir: Path, point: dict[str, Any]) -> dict[str, Any]:
    ev = json.loads((run_dir / "eval" / "summary.json").read_text())
    pr = json.loads((run_dir / "profile" / "summary.json").read_text())
    row: dict[str, Any] = {"point": point, "run_dir": str(run_dir)}
    if len(point) == 1:
        row["value"] = next(iter(point.values()))
    for v, avg in ev["averages"].items():
        row[v] = {**avg, "flops": pr["variants"].get(v, {}).get("flops", {}).get("total"),
                  "latency_ms": pr["variants"].get(v, {}).get("latency_ms", {}).get("median"),
                  "flops_ratio": pr["ratios"].get(v, {}).get("flops", 1.0),
                  "latency_ratio": pr["ratios"].get(v, {}).get("latency", 1.0),
                  "sparsity": pr["variants"].get(v, {}).get("sparsity", 0.0)}
    return row


# ---------------------------------------------------------------- `run`


def run_pipeline(s: Session, raw: dict[str, Any], recipe_path: str, overrides: list[str], stages: list[str],
                 force: list[str], sweep_points: list[dict[str, Any]] | None) -> dict[str, Any]:
    """`prune-cli run`: the chosen stages (current ones skipped), then the recipe's sweep, or only `sweep_points`.

    `raw` is the recipe as read, with the overrides applied: each sweep point's values go on top of it."""
    def make(r: Recipe, path: Path) -> Session:
        return Session(r, RunDir(path, r), s.device)

    if sweep_points:
        for p in sweep_points:  # every sweep point must be a valid recipe before anything runs
            build_recipe(sweep_point_raw(raw, p), recipe_path)
        return {"sweep": sweep(s, raw, sweep_points, make, recipe_path, overrides)}
    result = run_stages(s, [st for st in STAGES if st in stages], force, recipe_path, overrides)
    if "sweep" in stages and s.recipe.sweep:
        result["sweep"] = sweep(s, raw, s.recipe.sweep, make, recipe_path, overrides)
        if "report" in stages:  # now with the sweep's table
            from prune_cli.report import write_report

            result["report"] = str(write_report(s.run.path, recipe_path, overrides))
    return result
