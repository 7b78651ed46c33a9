"""The `prune-cli` command line (Typer). Each command parses, calls the stage runner or an engine function, renders.

Exit codes: 0 success; 1 runtime failure (bad data, missing inputs, unreadable checkpoint);
2 usage or recipe error; 3 a quality gate or reproducibility check failed; 130 interrupted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from prune_cli import __version__
from prune_cli.commands.common import (
    EXIT_CHECK_FAILED,
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    ManifestOpt,
    OverridesArg,
    QuietOpt,
    RecipeArg,
    RunDirOpt,
    SetContextOpt,
    SetNameOpt,
    SetOpt,
    VariantsOpt,
    check_set_options,
    csv_list,
    emit,
    extra_set,
    guarded,
    open_session,
    override_list,
    print_tables,
    variant_list,
)
from prune_cli.commands.inspect import data_app, model_app, recipe_app
from prune_cli.errors import UsageError
from prune_cli.progress import err_console

app = typer.Typer(name="prune-cli", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Context-aware dynamic pruning of speech foundation models (ASR and speech translation).")
app.add_typer(recipe_app, name="recipe")
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")


def _version(value: bool) -> None:
    if value:
        print(f"prune-cli {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False) -> None:
    pass


# ---------------------------------------------------------------- stages


@app.command()
def train(recipe: RecipeArg, stage: Annotated[str, typer.Option(help="base | gates | all")] = "all", overrides: OverridesArg = None,
          set_: SetOpt = None, run_dir: RunDirOpt = None, device: DeviceOpt = "auto", json_out: JsonOpt = False,
          quiet: QuietOpt = False, debug: DebugOpt = False) -> None:
    """Train the base model (stage base) and/or the gate predictors (stage gates). Rerun to resume."""
    with guarded(debug, json_out, quiet):
        if stage not in ("base", "gates", "all"):
            raise UsageError(f"--stage {stage!r}: expected base, gates or all")
        s, path, _ = open_session(recipe, override_list(set_, overrides), run_dir, device)
        from prune_cli.engine.runner import run_stages

        # One named stage always runs (and resumes); `all` skips the ones that are current.
        out = run_stages(s, ["base", "gates"] if stage == "all" else [stage], [], str(path), [], skip_current=stage == "all")
        done = [k for k, v in out.items() if v != "skipped"]
        emit({"run_dir": str(s.run.path), "results": {k: out[k] for k in done}}, json_out,
             lambda: print(f"trained {', '.join(done) or 'nothing (up to date)'} in {s.run.path}"))


@app.command()
def prune(recipe: RecipeArg, materialize: Annotated[bool, typer.Option(help="Also write one pruned checkpoint per context.")] = False,
          overrides: OverridesArg = None, set_: SetOpt = None, run_dir: RunDirOpt = None, device: DeviceOpt = "auto",
          json_out: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False) -> None:
    """Export one binary mask per context (and baselines) to masks.json, with a heatmap."""
    with guarded(debug, json_out, quiet):
        s, _, _ = open_session(recipe, override_list(set_, overrides), run_dir, device)
        from prune_cli.engine.runner import run_stage
        from prune_cli.report import kept_table

        out = run_stage(s, "prune", materialize=materialize or None)
        emit(out, json_out, lambda: print_tables(kept_table(out["kept"])))


@app.command("eval")
def eval_(recipe: RecipeArg, variants: VariantsOpt = None,
          contexts: Annotated[Optional[str], typer.Option(help="Comma list of context keys, e.g. asr:de,st:de-en.")] = None,
          max_wer: Annotated[Optional[float], typer.Option(help="Exit 3 if any ASR context's WER is above this.")] = None,
          min_bleu: Annotated[Optional[float], typer.Option(help="Exit 3 if any scorable ST context's BLEU is below this.")] = None,
          manifest: ManifestOpt = None, name: SetNameOpt = None, context: SetContextOpt = None,
          overrides: OverridesArg = None, set_: SetOpt = None, run_dir: RunDirOpt = None, device: DeviceOpt = "auto",
          json_out: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False) -> None:
    """Decode each context with each variant; WER/CER for ASR, BLEU/chrF for ST."""
    with guarded(debug, json_out, quiet):
        check_set_options(manifest, name, context)
        chosen = variant_list(variants)
        s, _, _ = open_session(recipe, override_list(set_, overrides), run_dir, device)
        from prune_cli.engine.evaluate import quality_gate
        from prune_cli.engine.runner import run_stage
        from prune_cli.report import comparison_table, eval_table

        summary = run_stage(s, "eval", variants=chosen, contexts=csv_list(contexts), eval_set=extra_set(s, manifest, name, context))
        emit(summary, json_out, lambda: print_tables(eval_table(summary), *([comparison_table(summary)] if summary.get("comparisons") else [])))
        fails = quality_gate(summary, max_wer if max_wer is not None else s.recipe.eval.max_wer,
                             min_bleu if min_bleu is not None else s.recipe.eval.min_bleu)
        for line in fails:
            err_console.print(f"quality gate: {line}", markup=False)
        if fails:
            raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
def profile(recipe: RecipeArg, variants: VariantsOpt = None,
            manifest: ManifestOpt = None, name: SetNameOpt = None, context: SetContextOpt = None, overrides: OverridesArg = None, set_: SetOpt = None,
            run_dir: RunDirOpt = None, device: DeviceOpt = "auto", json_out: JsonOpt = False, quiet: QuietOpt = False,
            debug: DebugOpt = False) -> None:
    """FLOPs and latency of dense vs pruned variants under eval's decoding, greedy beside it (CUDA events / perf_counter)."""
    with guarded(debug, json_out, quiet):
        check_set_options(manifest, name, context)
        chosen = variant_list(variants)
        s, _, _ = open_session(recipe, override_list(set_, overrides), run_dir, device)
        from prune_cli.engine.runner import run_stage
        from prune_cli.report import profile_table

        summary = run_stage(s, "profile", variants=chosen, eval_set=extra_set(s, manifest, name, context))
        emit(summary, json_out, lambda: print_tables(profile_table(summary)))


@app.command()
def run(recipe: RecipeArg,
        stages: Annotated[Optional[str], typer.Option(help="Comma list (default all): synth,base,gates,prune,eval,profile,report,sweep.")] = None,
        force: Annotated[Optional[list[str]], typer.Option(help="Redo this stage and the ones after it.")] = None,
        sweep: Annotated[Optional[str], typer.Option(help="key.path=v1,v2,...: base, then gates..profile per value, instead of the recipe sweep.")] = None,
        check_against: Annotated[Optional[Path], typer.Option(help="Compare metrics with another run dir; exit 3 on a mismatch.")] = None,
        overrides: OverridesArg = None, set_: SetOpt = None, run_dir: RunDirOpt = None, device: DeviceOpt = "auto",
        json_out: JsonOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False) -> None:
    """Run the whole pipeline, skipping stages whose outputs are current for this config; then the recipe's sweep."""
    with guarded(debug, json_out, quiet):
        from prune_cli.recipe_yaml import parse_sweep
        from prune_cli.runs import STAGES

        names = [*STAGES, "sweep"]
        chosen = csv_list(stages) or names
        bad = [f"unknown stage {st!r} (stages: {', '.join(names)})" for st in chosen if st not in names]
        bad += [f"--force: unknown stage {st!r} (stages: {', '.join(STAGES)})" for st in force or [] if st not in STAGES]
        if bad:
            raise UsageError(bad)
        sets = override_list(set_, overrides)
        points = parse_sweep(sweep) if sweep else None
        s, path, raw = open_session(recipe, sets, run_dir, device)
        from prune_cli.engine.reproduce import check_messages, check_report
        from prune_cli.engine.runner import run_pipeline
        from prune_cli.report import headline_table, robustness_table

        result = run_pipeline(s, raw, str(path), sets, chosen, list(force or []), points)
        out: dict[str, Any] = {"run_dir": str(s.run.path), "stages": {k: ("done" if v != "skipped" else v) for k, v in result.items()}}
        check = check_report(s.run.path, check_against, s.recipe.check) if check_against is not None else None
        if check is not None:
            out["check"] = check

        def render() -> None:
            if (s.run.path / "eval" / "summary.json").is_file():
                print_tables(headline_table(s.run.path), *filter(None, [robustness_table(s.run.path)]))
            print(f"run complete: {s.run.path}" + (f" (report: {result['report']})" if "report" in result else ""))

        emit(out, json_out, render)
        if check is not None and not check["ok"]:
            for line in check_messages(check):
                err_console.print(f"check: {line}", markup=False)
            raise typer.Exit(EXIT_CHECK_FAILED)


@app.command()
def compare(a: Annotated[str, typer.Argument(help="RUN_DIR[:VARIANT] (variant default: context).", show_default=False)],
            b: Annotated[str, typer.Argument(help="RUN_DIR[:VARIANT] to compare against (variant default: a's).", show_default=False)],
            samples: Annotated[int, typer.Option(help="Bootstrap resamples.", min=1)] = 1000,
            seed: Annotated[Optional[int], typer.Option(help="Bootstrap seed (default: the seed in a's config.yaml).")] = None,
            replicate: Annotated[Optional[list[Path]], typer.Option("--replicate", "-r", help="Another RUN_DIR holding both variants "
                                 "(e.g. another gate seed): the comparison is repeated there and averaged over the runs. Repeatable.")] = None,
            test_set: Annotated[Optional[str], typer.Option("--test-set", help="Compare on another test set both runs "
                                "scored (eval/sets/NAME/) instead of the test split.")] = None,
            json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Paired bootstrap of one evaluated variant against another, across two runs on the same test set: the difference of
    each averaged metric, its 95% interval and p. With --replicate, the same comparison in further runs and its mean."""
    with guarded(debug, json_out):
        from prune_cli.engine.compare import compare_runs, parse_run_variant
        from prune_cli.report import comparison_table, replicated_table
        from prune_cli.variants import CONTEXT

        run_a, var_a = parse_run_variant(a, CONTEXT.name)
        run_b, var_b = parse_run_variant(b, var_a)
        out = compare_runs((run_a, var_a), (run_b, var_b), samples, seed, replicate or [], test_set)
        emit(out, json_out, lambda: print_tables(comparison_table(out), *([replicated_table(out)] if "replicated" in out else [])))


def main() -> None:
    """The entry point: usage errors print one line, as every other error does (exit 2)."""
    import sys

    from typer.exceptions import Abort, TyperException

    try:
        rv = app(standalone_mode=False)
    except TyperException as e:  # the command-line parser's errors (typer's own copy of click's)
        if type(e).__name__ == "NoArgsIsHelpError":  # `prune-cli` alone, or a group alone: the help is the answer
            e.show()
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None else ""
        err_console.print(f"error: {where}{' '.join(e.format_message().split())} (see --help)", markup=False, soft_wrap=True)
        sys.exit(getattr(e, "exit_code", 2))
    except Abort:
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
