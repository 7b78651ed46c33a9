"""What every command shares: option types, the error-to-exit-code mapping, output, overrides and the session."""

from __future__ import annotations

import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer

from prune_cli.atomic import dumps
from prune_cli.errors import PruneCliError, UsageError
from prune_cli.progress import MODE, err_console
from prune_cli.recipe import bundled_recipes

EXIT_CHECK_FAILED = 3

BUNDLED = ", ".join(p.stem for p in bundled_recipes())
RecipeArg = Annotated[str, typer.Argument(help=f"Recipe YAML path or bundled recipe name ({BUNDLED}).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override: key.path=value (YAML scalar or list).")]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="Overrides after the recipe, torchtune style: key.path=value ...",
                                                             show_default=False)]
RunDirOpt = Annotated[Optional[str], typer.Option("--run-dir", help="Run directory (default runs/<recipe name>).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
VariantsOpt = Annotated[Optional[str], typer.Option(help="Comma list of variants (default: the recipe's).")]
ManifestOpt = Annotated[Optional[Path], typer.Option(help="Another test set (JSONL manifest or Kaldi dir), into <stage>/sets/NAME/.")]
SetNameOpt = Annotated[Optional[str], typer.Option(help="That set's name (default: the manifest's stem).")]
SetContextOpt = Annotated[Optional[str], typer.Option(help="Context of its utterances that name none, e.g. asr:de or st:de-en.")]


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


def emit(result: Any, json_out: bool, render: Callable[[], object] | None = None) -> None:
    """The JSON document on stdout with --json (strict: NaN and Infinity become null); otherwise the human view."""
    if json_out:
        sys.stdout.write(dumps(result) + "\n")
    elif render is not None:
        render()


def override_list(set_: list[str] | None, overrides: list[str] | None) -> list[str]:
    """--set values, then positional key=value overrides (later wins)."""
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise UsageError([f"unexpected argument {o!r}: overrides are key.path=value" for o in bad])
    return [*(set_ or []), *(overrides or [])]


def csv_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def variant_list(value: str | None) -> list[str] | None:
    from prune_cli.variants import NAMES

    vs = csv_list(value)
    bad = [v for v in vs or [] if v not in NAMES]
    if bad:
        raise UsageError([f"--variants: unknown variant {v!r} ({', '.join(NAMES)})" for v in bad])
    return vs


def open_session(recipe: str, sets: list[str], run_dir: str | None, device: str):  # noqa: ANN201
    """The recipe (validated once, here), its run dir locked, the device: what every stage needs.

    The recipe is checked before torch is imported, so a bad recipe fails in well under a second."""
    from prune_cli.recipe import load_recipe_raw

    if run_dir is not None and not run_dir.strip():
        raise UsageError("--run-dir: empty path")
    r, path, raw = load_recipe_raw(recipe, sets)
    from prune_cli.engine.session import Session, resolve_device
    from prune_cli.runs import RunDir

    dev = resolve_device(device)
    run = RunDir(Path(run_dir) if run_dir else Path("runs") / r.name, r)
    run.open(str(dev))
    return Session(r, run, dev), path, raw


def check_set_options(manifest: Path | None, name: str | None, context: str | None) -> None:
    if (name or context) and manifest is None:
        raise UsageError("--name and --context go with --manifest")


def extra_set(s: Any, manifest: Path | None, name: str | None, context: str | None) -> Any:
    """The test set named by --manifest/--name/--context (None without --manifest)."""
    if manifest is None:
        return None
    from prune_cli.engine.evaluate import load_eval_set

    return load_eval_set(s, manifest, name or (manifest.name if manifest.is_dir() else manifest.stem), context)


def print_tables(*tables: Any) -> None:
    from prune_cli.report import print_table

    for t in tables:
        print_table(t)
