"""The base stage of a pretrained family (Whisper, OWSM): the model imported, not trained (the importers are in
model/whisper_import.py and model/owsm_import.py)."""

from __future__ import annotations

from typing import Any

from prune_cli.engine.session import Session
from prune_cli.errors import UsageError
from prune_cli.model.checkpoint import save_model
from prune_cli.model.s2t import count_params
from prune_cli.progress import log


def pretrained_problem(family: str, ref: str) -> str | None:
    """Why model.pretrained cannot be opened for this family, found without reading the weights (None: it can)."""
    if family == "owsm":
        from prune_cli.model.owsm_import import pretrained_problem as problem
    else:
        from prune_cli.model.whisper_import import pretrained_problem as problem
    return problem(ref)


def import_pretrained_base(s: Session) -> dict[str, Any]:
    """The pretrained model converted once into the run's base checkpoint, with its own tokenizer and the training
    data's context vocabulary."""
    r = s.recipe
    if r.model.family == "owsm":
        from prune_cli.model.owsm_import import open_owsm

        model, tok_files, source = open_owsm(r.model.pretrained)
        name, mode = "OWSM", "30-s window"
    else:
        from prune_cli.model.whisper_import import open_pretrained

        model, tok_files, source = open_pretrained(r.model.pretrained)  # type: ignore[assignment]
        name, mode = "Whisper", r.model.whisper_input
    if model.dims.n_mels != r.features.n_mels:
        raise UsageError(f"features.n_mels: {r.features.n_mels}, but the pretrained {name} takes {model.dims.n_mels} mel bins")
    train = s.split("train")
    s.build_tokenizer(train, tok_files)
    log(f"base model: pretrained {name} from {source['source']} ({source['format']}), {count_params(model) / 1e6:.2f}M "
        f"parameters, {model.n_modules} prunable modules; input {mode}")
    info = {"params": count_params(model), "pretrained": source["source"], "pretrained_format": source["format"],
            "weights_hash": model.weights_hash()}
    if s.dist.is_main:
        save_model(s.run.base_ckpt, model, source=source)
        s.run.update_metrics("base", info)
    return info
