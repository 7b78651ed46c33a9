"""Model checkpoints: dims + removed modules + weights, written atomically, read with clear errors."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Union

from prune_cli.atomic import atomic_torch_save, load_plain
from prune_cli.errors import CheckpointError, MissingInputError, first_few
from prune_cli.model.owsm import OwsmDims, OwsmModel
from prune_cli.model.s2t import ModelDims, SpeechModel
from prune_cli.model.whisper import WhisperDims, WhisperModel

Model = Union[SpeechModel, WhisperModel, OwsmModel]


def save_model(path: Path, model: Model, **extra: Any) -> None:
    family = {"family": model.family} if not isinstance(model, SpeechModel) else {}  # no key: the E-Branchformer
    atomic_torch_save(path, {
        "kind": "prune-cli/model", **family, "dims": asdict(model.dims), "removed": sorted(model.removed),
        "state_dict": model.state_dict(), **extra,
    })


def read_checkpoint(path: Path, kind: str, producer: str) -> dict[str, Any]:
    if not path.is_file():
        raise MissingInputError(f"{path}: checkpoint not found; produce it with `{producer}`")
    blob = load_plain(path)  # plain data only: never code from a file
    if not isinstance(blob, dict) or blob.get("kind") != kind:
        raise CheckpointError(f"{path}: not a {kind} checkpoint")
    return blob


def load_model(path: Path, producer: str = "prune-cli train RECIPE") -> tuple[Model, dict[str, Any]]:
    blob = read_checkpoint(path, "prune-cli/model", producer)
    try:
        family = blob.get("family", "ebranchformer")
        if family == "whisper":
            model: Model = WhisperModel(WhisperDims(**blob["dims"]), removed=blob["removed"])
        elif family == "owsm":
            model = OwsmModel(OwsmDims(**blob["dims"]), removed=blob["removed"])
        else:
            model = SpeechModel(ModelDims(**blob["dims"]), removed=blob["removed"])
        problems = model.weight_problems(blob["state_dict"])
        if problems:
            raise CheckpointError(f"{path}: {len(problems)} tensor(s) do not fit the model its dims describe: "
                                  + first_few(problems))
        model.load_state_dict(blob["state_dict"])
    except (TypeError, KeyError, RuntimeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: checkpoint does not match the model code ({str(e).splitlines()[0][:160]})") from None
    return model, blob
