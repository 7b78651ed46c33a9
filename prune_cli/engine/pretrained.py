"""The whisper family's base stage: a pretrained model imported, not trained (the importers are in
model/whisper_import.py)."""

from __future__ import annotations

from typing import Any

from prune_cli.engine.session import Session
from prune_cli.errors import UsageError
from prune_cli.model.checkpoint import save_model
from prune_cli.model.s2t import count_params
from prune_cli.model.whisper_import import open_pretrained
from prune_cli.progress import log


def import_pretrained_base(s: Session) -> dict[str, Any]:
    """The whisper family's base stage: the pretrained model converted once into the run's base checkpoint, with
    Whisper's tokenizer and the training data's context vocabulary."""
    r = s.recipe
    model, tok_files, source = open_pretrained(r.model.pretrained)
    if model.dims.n_mels != r.features.n_mels:
        raise UsageError(f"features.n_mels: {r.features.n_mels}, but the pretrained Whisper takes {model.dims.n_mels} mel bins")
    train = s.split("train")
    s.build_tokenizer(train, tok_files)
    log(f"base model: pretrained Whisper from {source['source']} ({source['format']}), {count_params(model) / 1e6:.2f}M "
        f"parameters, {model.n_modules} prunable modules; input {r.model.whisper_input}")
    info = {"params": count_params(model), "pretrained": source["source"], "pretrained_format": source["format"],
            "weights_hash": model.weights_hash()}
    if s.dist.is_main:
        save_model(s.run.base_ckpt, model, source=source)
        s.run.update_metrics("base", info)
    return info
