"""Model checkpoints: dims + removed modules + weights, written atomically, read with clear errors."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Union

import torch

from prune_cli.atomic import atomic_torch_save
from prune_cli.errors import CheckpointError, MissingInputError
from prune_cli.model.s2t import ModelDims, SpeechModel
from prune_cli.model.whisper import WhisperDims, WhisperModel

Model = Union[SpeechModel, WhisperModel]


def save_model(path: Path, model: Model, **extra: Any) -> None:
    family = {"family": model.family} if isinstance(model, WhisperModel) else {}  # no key: the E-Branchformer
    atomic_torch_save(path, {
        "kind": "prune-cli/model", **family, "dims": asdict(model.dims), "removed": sorted(model.removed),
        "state_dict": model.state_dict(), **extra,
    })


def read_checkpoint(path: Path, kind: str, producer: str) -> dict[str, Any]:
    if not path.is_file():
        raise MissingInputError(f"{path}: checkpoint not found; produce it with `{producer}`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)  # plain data only: never code from a file
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(blob, dict) or blob.get("kind") != kind:
        raise CheckpointError(f"{path}: not a {kind} checkpoint")
    return blob


def load_model(path: Path, producer: str = "prune-cli train RECIPE") -> tuple[Model, dict[str, Any]]:
    blob = read_checkpoint(path, "prune-cli/model", producer)
    try:
        if blob.get("family", "ebranchformer") == "whisper":
            model: Model = WhisperModel(WhisperDims(**blob["dims"]), removed=blob["removed"])
        else:
            model = SpeechModel(ModelDims(**blob["dims"]), removed=blob["removed"])
        model.load_state_dict(blob["state_dict"])
    except (TypeError, KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint does not match the model code ({str(e).splitlines()[0][:160]})") from None
    return model, blob
