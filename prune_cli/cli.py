"""The `prune-cli` command line (Typer).

Exit codes: 0 success; 1 runtime failure (bad data, missing inputs, unreadable checkpoint);
2 usage or recipe error; 3 a quality gate or reproducibility check failed; 130 interrupted.
"""

from __future__ import annotations

import json
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console

from prune_cli import __version__
from prune_cli.errors import PruneCliError, UsageError
from prune_cli.progress import MODE, err_console, log

EXIT_CHECK_FAILED = 3

app = typer.Typer(
    name="prune-cli", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Context-aware dynamic pruning of speech foundation models (ASR and speech translation).",
)
recipe_app = typer.Typer(no_args_is_help=True, help="List, show and validate recipes.")
data_app = typer.Typer(no_args_is_help=True, help="Build the demo corpus and check manifests.")
model_app = typer.Typer(no_args_is_help=True, help="Inspect the model.")
app.add_typer(recipe_app, name="recipe")
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")

RecipeArg = Annotated[str, typer.Argument(help="Recipe YAML path or bundled recipe name (demo, ci_smoke).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override: key.path=value (YAML scalar or list).")]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="Overrides after the recipe, torchtune style: key.path=value ...",
                                                             show_default=False)]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", help="Run directory (default runs/<recipe name>).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _version(value: bool) -> None:
    if value:
        print(f"prune-cli {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    pass


@contextmanager
def guarded(debug: bool, json_out: bool = False, quiet: bool = False) -> Iterator[None]:
    """Map errors onto exit codes with one line per problem; tracebacks only with --debug."""
    MODE.json, MODE.quiet = json_out, quiet
    try:
        yield
    except typer.Exit:
        raise
    except PruneCliError as e:
        for line in e.problems:
            err_console.print(f"error: {line}", markup=False, soft_wrap=True)
        if debug:
            traceback.print_exc()
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun the same command to resume", markup=False)
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001 - last line of defence: no bare traceback without --debug
        err_console.print(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", markup=False, soft_wrap=True)
        if debug:
            traceback.print_exc()
        raise typer.Exit(1) from None


def emit(result: Any, json_out: bool, render=None) -> None:  # noqa: ANN001
    """The JSON document on stdout with --json; otherwise the human view."""
    if json_out:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    elif render is not None:
        render()


def _sets(set_: list[str] | None, overrides: list[str] | None) -> list[str]:
    """--set values, then positional key=value overrides (later wins)."""
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise UsageError([f"unexpected argument {o!r}: overrides are key.path=value" for o in bad])
    return [*(set_ or []), *(overrides or [])]


def open_session(recipe: str, sets: list[str] | None, run_dir: Path | None, device: str):  # noqa: ANN201
    from prune_cli.engine.session import Session, resolve_device
    from prune_cli.recipe import load_recipe
    from prune_cli.runs import RunDir

    r, path = load_recipe(recipe, sets or [])
    dev = resolve_device(device)
    run = RunDir(run_dir or Path("runs") / r.name, r)
    run.prepare(str(dev))
    return Session(r, run, dev), path


# ---------------------------------------------------------------- stages


@app.command()
def train(
    recipe: RecipeArg, stage: Annotated[str, typer.Option(help="base | gates | all")] = "all",
    overrides: OverridesArg = None, set_: SetOpt = None, run_dir: RunDirOpt = None, device: DeviceOpt = "auto", json_out: JsonOpt = False,
    quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Train the base model (stage base) and/or the gate predictors (stage gates). Rerun to resume."""
    with guarded(debug, json_out, quiet):
        from prune_cli.engine.pipeline import STAGE_FUNCS

        if stage not in ("base", "gates", "all"):
            raise UsageError(f"--stage {stage!r}: expected base, gates or all")
        s, _ = open_session(recipe, _sets(set_, overrides), run_dir, device)
        out = {}
        for st in (("base", "gates") if stage == "all" else (stage,)):
            if stage == "all" and s.run.stage_complete(st):
                log(f"[{st}] up to date, skipped")
                continue
            out[st] = STAGE_FUNCS[st](s)
            if s.dist.is_main:
                s.run.mark_complete(st)
        emit({"run_dir": str(s.run.path), "results": out}, json_out,
             lambda: print(f"trained {', '.join(out) or 'nothing (up to date)'} in {s.run.path}"))


@app.command()
def prune(
    recipe: RecipeArg, materialize: Annotated[bool, typer.Option(help="Also write one pruned checkpoint per context.")] = False,
    overrides: OverridesArg = None, set_: SetOpt = None, run_dir: RunDirOpt = None, device: DeviceOpt = "auto", json_out: JsonOpt = False,
    quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Export one binary mask per context (and baselines) to masks.json, with a heatmap."""
    with guarded(debug, json_out, quiet):
        from prune_cli.engine.pipeline import stage_prune
        from prune_cli.report import kept_table, print_table

        s, _ = open_session(recipe, _sets(set_, overrides), run_dir, device)
        out = stage_prune(s, materialize or None)
        s.run.mark_complete("prune")
        emit(out, json_out, lambda: print_table(kept_table(out["kept"]), False))


@app.command("eval")
def eval_(
    recipe: RecipeArg,
    variants: Annotated[Optional[str], typer.Option(help="Comma list: dense,context,static,random,layerdrop.")] = None,
    contexts: Annotated[Optional[str], typer.Option(help="Comma list of context keys, e.g. asr:de,st:de-en.")] = None,
    max_wer: Annotated[Optional[float], typer.Option(help="Exit 3 if any ASR context's WER is above this.")] = None,
    min_bleu: Annotated[Optional[float], typer.Option(help="Exit 3 if any ST context's BLEU is below this (contexts in bleu_unscorable are exempt).")] = None,
    overrides: OverridesArg = None, set_: SetOpt = None, run_dir: RunDirOpt = None, device: DeviceOpt = "auto", json_out: JsonOpt = False,
    quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Decode each context with each variant; WER/CER for ASR, BLEU/chrF for ST."""
    with guarded(debug, json_out, quiet):
        from prune_cli.engine.evaluate import quality_gate
        from prune_cli.engine.pipeline import stage_eval
        from prune_cli.report import comparison_table, eval_table, print_table

        s, _ = open_session(recipe, _sets(set_, overrides), run_dir, device)
        vs = _csv(variants)
        _check_variants(vs)
        summary = stage_eval(s, vs, _csv(contexts))
        if summary["complete"]:
            s.run.mark_complete("eval")

        def render() -> None:
            print_table(eval_table(summary), False)
            if summary.get("comparisons"):
                print_table(comparison_table(summary), False)

        emit(summary, json_out, render)
        fails = quality_gate(summary, max_wer if max_wer is not None else s.recipe.eval.max_wer,
                             min_bleu if min_bleu is not None else s.recipe.eval.min_bleu)
        for line in fails:
            err_console.print(f"quality gate: {line}", markup=False)
        if fails:
            raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
def profile(
    recipe: RecipeArg, variants: Annotated[Optional[str], typer.Option(help="Comma list of variants.")] = None,
    overrides: OverridesArg = None, set_: SetOpt = None, run_dir: RunDirOpt = None, device: DeviceOpt = "auto", json_out: JsonOpt = False,
    quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """FLOPs and latency of dense vs pruned variants (CUDA events on GPU, perf_counter on CPU)."""
    with guarded(debug, json_out, quiet):
        from prune_cli.engine.pipeline import stage_profile
        from prune_cli.report import print_table, profile_table

        s, _ = open_session(recipe, _sets(set_, overrides), run_dir, device)
        vs = _csv(variants)
        _check_variants(vs)
        summary = stage_profile(s, vs)
        if summary["complete"]:
            s.run.mark_complete("profile")
        emit(summary, json_out, lambda: print_table(profile_table(summary), False))


@app.command()
def run(
    recipe: RecipeArg,
    stages: Annotated[Optional[str], typer.Option(help="Comma list of stages (default: all): synth,base,gates,prune,eval,profile,report,sweep.")] = None,
    force: Annotated[Optional[list[str]], typer.Option(help="Redo this stage and the ones after it.")] = None,
    sweep: Annotated[Optional[str], typer.Option(help="key.path=v1,v2,...: base, then gates..profile per value, instead of the recipe sweep.")] = None,
    check_against: Annotated[Optional[Path], typer.Option(help="Compare metrics with another run dir; exit 3 on a mismatch.")] = None,
    overrides: OverridesArg = None, set_: SetOpt = None, run_dir: RunDirOpt = None, device: DeviceOpt = "auto", json_out: JsonOpt = False,
    quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Run the whole pipeline, skipping stages whose outputs are complete for this config; then the recipe's sweep."""
    with guarded(debug, json_out, quiet):
        from prune_cli.engine.pipeline import check_against as compare
        from prune_cli.engine.pipeline import env_differences, parse_sweep, run_stages
        from prune_cli.engine.pipeline import sweep as do_sweep
        from prune_cli.engine.session import Session
        from prune_cli.recipe import apply_overrides, build_recipe, load_raw, resolve_recipe_path, sweep_point_raw
        from prune_cli.report import write_report
        from prune_cli.runs import STAGES, RunDir

        run_stage_names = [*STAGES, "sweep"]
        chosen = _csv(stages) or run_stage_names
        for st in chosen:
            if st not in run_stage_names:
                raise UsageError(f"unknown stage {st!r} (stages: {', '.join(run_stage_names)})")
        for st in force or []:
            if st not in STAGES:
                raise UsageError(f"--force: unknown stage {st!r} (stages: {', '.join(STAGES)})")
        sets = _sets(set_, overrides)
        s, path = open_session(recipe, sets, run_dir, device)
        raw = apply_overrides(load_raw(resolve_recipe_path(recipe)), sets)

        def make(r, p):  # noqa: ANN001, ANN202
            return Session(r, RunDir(p, r), s.device)

        result: dict[str, Any]
        if sweep:
            points = parse_sweep(sweep)
            for p in points:  # every sweep point must be a valid recipe before anything runs
                build_recipe(sweep_point_raw(raw, p), str(path))
            result = {"sweep": do_sweep(s, raw, points, make, str(path), sets)}
        else:
            result = run_stages(s, [st for st in STAGES if st in chosen], list(force or []), str(path), sets)
            if "sweep" in chosen and s.recipe.sweep:
                result["sweep"] = do_sweep(s, raw, s.recipe.sweep, make, str(path), sets)
                if "report" in chosen:  # now with the sweep's table
                    result["report"] = str(write_report(s.run.path, str(path), sets))
        out: dict[str, Any] = {"run_dir": str(s.run.path), "stages": {k: ("done" if v != "skipped" else v) for k, v in result.items()}}
        problems: list[str] = []
        env_diff: list[str] = []
        if check_against is not None:
            c = s.recipe.check
            problems = compare(s.run.path, check_against, {"wer": c.wer, "cer": c.cer, "bleu": c.bleu, "chrf": c.chrf})
            env_diff = env_differences(s.run.path, check_against)
            out["check"] = {"against": str(check_against), "ok": not problems, "differences": problems, "env_differences": env_diff}
        emit(out, json_out, lambda: print(f"run complete: {s.run.path}" + (f" (report: {result['report']})" if "report" in result else "")))
        for line in problems:
            err_console.print(f"check: {line}", markup=False)
        if problems and env_diff:  # why a rerun may not match to the last bit
            err_console.print(f"check: note: the runs differ in {'; '.join(env_diff)}; results are bit-identical only on the same "
                              "kernels and thread count, so set tolerances (check.wer, check.bleu, ...) across machines", markup=False)
        if problems:
            raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
def compare(
    a: Annotated[str, typer.Argument(help="RUN_DIR[:VARIANT] (variant default: context).", show_default=False)],
    b: Annotated[str, typer.Argument(help="RUN_DIR[:VARIANT] to compare against (variant default: a's).", show_default=False)],
    samples: Annotated[int, typer.Option(help="Bootstrap resamples.", min=1)] = 1000,
    seed: Annotated[Optional[int], typer.Option(help="Bootstrap seed (default: the seed in a's config.yaml).")] = None,
    replicate: Annotated[Optional[list[Path]], typer.Option(
        "--replicate", "-r", help="Another RUN_DIR holding both variants (e.g. another gate seed) in which the "
        "comparison is repeated; the differences are also averaged over the runs. Repeatable.")] = None,
    json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Paired bootstrap of one evaluated variant against another, across two runs on the same test set (e.g. a
    recipe change against the run it changed): the difference of each averaged metric, its 95% interval and p.
    With --replicate, the same comparison in further runs and its mean over all of them."""
    with guarded(debug, json_out):
        from prune_cli.engine.compare import compare_runs, parse_run_variant
        from prune_cli.report import comparison_table, print_table, replicated_table

        run_a, var_a = parse_run_variant(a, "context")
        run_b, var_b = parse_run_variant(b, var_a)
        out = compare_runs((run_a, var_a), (run_b, var_b), samples, seed, replicate or [])

        def show() -> None:
            print_table(comparison_table(out), False)
            if "replicated" in out:
                print_table(replicated_table(out), False)

        emit(out, json_out, show)


# ---------------------------------------------------------------- recipes


@recipe_app.command("list")
def recipe_list(json_out: JsonOpt = False) -> None:
    """Bundled recipes."""
    from prune_cli.recipe import bundled_recipes

    items = [{"name": p.stem, "path": str(p)} for p in bundled_recipes()]
    emit(items, json_out, lambda: [print(f"{i['name']:<16} {i['path']}") for i in items])


@recipe_app.command("show")
def recipe_show(recipe: RecipeArg, overrides: OverridesArg = None, set_: SetOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Print the resolved recipe (includes and overrides applied)."""
    with guarded(debug, json_out):
        from prune_cli.recipe import load_recipe, to_yaml

        r, _ = load_recipe(recipe, _sets(set_, overrides))
        emit(r.to_dict(), json_out, lambda: sys.stdout.write(to_yaml(r)))


@recipe_app.command("validate")
def recipe_validate(recipe: RecipeArg, overrides: OverridesArg = None, set_: SetOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Check a recipe: unknown keys (with the close match), types, values. Exit 2 on any problem."""
    with guarded(debug, json_out):
        from prune_cli.recipe import load_recipe

        _, path = load_recipe(recipe, _sets(set_, overrides))
        emit({"recipe": str(path), "valid": True}, json_out, lambda: print(f"{path}: ok"))


# ---------------------------------------------------------------- data and model


@data_app.command("synth")
def data_synth(
    recipe: RecipeArg, overrides: OverridesArg = None, set_: SetOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
) -> None:
    """Build the multilingual demo corpus (eSpeak NG + num2words) and its manifests."""
    with guarded(debug, json_out, quiet):
        from rich.table import Table

        from prune_cli.engine.pipeline import synthesize
        from prune_cli.recipe import load_recipe

        r, _ = load_recipe(recipe, _sets(set_, overrides))
        summary = synthesize(r)

        def render() -> None:
            t = Table(title=f"corpus {r.data.manifest_dir}")
            for col in ("split", "context", "utterances", "hours"):
                t.add_column(col)
            for split, table in summary.items():
                for ctx, e in sorted(table.items()):
                    t.add_row(split, ctx, str(e["utts"]), f"{e['hours']:.3f}")
            Console().print(t)

        emit(summary, json_out, render)


@data_app.command("check")
def data_check(
    manifests: Annotated[list[Path], typer.Argument(help="JSONL manifests or Kaldi data dirs.")],
    sample_rate: Annotated[int, typer.Option(help="Expected sample rate.")] = 16000,
    tolerance: Annotated[float, typer.Option(help="Allowed duration mismatch in seconds.")] = 0.05,
    json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Validate every line: JSON, fields, audio exists and decodes, duration, sample rate, text, task, language."""
    with guarded(debug, json_out):
        from prune_cli.data.check import check_manifest
        from prune_cli.recipe import ContextDefaults

        report = []
        all_problems: list[str] = []
        for m in manifests:
            n, problems = check_manifest(m, sample_rate, tolerance, ContextDefaults())
            report.append({"manifest": str(m), "utterances": n, "problems": problems})
            all_problems += problems
        if json_out:
            emit({"ok": not all_problems, "manifests": report}, True)
        else:
            for p in all_problems:
                err_console.print(p, markup=False, soft_wrap=True)
            for r in report:
                print(f"{r['manifest']}: {r['utterances']} utterances, {len(r['problems'])} problem(s)")
        if all_problems:
            raise typer.Exit(1)


@model_app.command("summary")
def model_summary(
    recipe: RecipeArg, frames: Annotated[int, typer.Option(help="Input frames (10 ms each).")] = 300,
    tokens: Annotated[int, typer.Option(help="Decoder tokens.")] = 12,
    overrides: OverridesArg = None, set_: SetOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False,
) -> None:
    """Parameters per module kind and FLOPs per prunable module for a given input length."""
    with guarded(debug, json_out):
        from collections import defaultdict

        from rich.table import Table

        from prune_cli.engine.train import module_flops
        from prune_cli.model.s2t import SpeechModel, count_params, dims_from_recipe
        from prune_cli.recipe import load_recipe

        r, _ = load_recipe(recipe, _sets(set_, overrides))
        model = SpeechModel(dims_from_recipe(r.model, r.features.n_mels, r.tokenizer.vocab_size + 16)).eval()
        flops = module_flops(model, frames, tokens)
        by_kind: dict[str, dict[str, int]] = defaultdict(lambda: {"params": 0, "flops": 0, "count": 0})
        for m in model.modules_list:
            part, i, kind = m.name.split(".")
            layer = getattr(model, part).layers[int(i)]
            k = by_kind[f"{part}.{kind}"]
            k["params"] += count_params(getattr(layer, kind))
            k["flops"] += flops[m.name]
            k["count"] += 1
        out = {"params_total": count_params(model), "prunable_modules": model.n_modules, "frames": frames,
               "tokens": tokens, "flops_unit": "FLOPs", "by_kind": dict(by_kind), "per_module_flops": flops}

        def render() -> None:
            t = Table(title=f"{count_params(model) / 1e6:.2f}M parameters; FLOPs for {frames} frames, {tokens} tokens")
            for col in ("kind", "modules", "params", "GFLOPs"):
                t.add_column(col)
            for k, v in by_kind.items():
                t.add_row(k, str(v["count"]), f"{v['params']:,}", f"{v['flops'] / 1e9:.4f}")
            Console().print(t)

        emit(out, json_out, render)


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _check_variants(vs: list[str] | None) -> None:
    from prune_cli.recipe import VARIANTS

    for v in vs or []:
        if v not in VARIANTS:
            raise UsageError(f"--variants: unknown variant {v!r} ({', '.join(VARIANTS)})")


def main() -> None:
    app()
