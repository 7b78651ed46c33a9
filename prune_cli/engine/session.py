"""What every stage needs: the recipe, the run directory, the device, and loaders for earlier stages' outputs."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from prune_cli.atomic import atomic_torch_save
from prune_cli.data.batching import Split, load_split
from prune_cli.data.features import compute_cmvn
from prune_cli.data.manifest import split_fingerprint
from prune_cli.data.tokenizer import Tokenizer, train_tokenizer
from prune_cli.errors import CheckpointError, MissingInputError, UsageError
from prune_cli.gating.masks import MaskFile
from prune_cli.gating.predictor import GatePredictor
from prune_cli.model.checkpoint import load_model, read_checkpoint
from prune_cli.model.s2t import SpeechModel
from prune_cli.progress import log
from prune_cli.recipe import Recipe
from prune_cli.runs import RunDir
from prune_cli.variants import CONTEXT, VARIANTS


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    if choice not in ("cpu", "cuda"):
        raise UsageError(f"--device {choice!r}: expected auto, cpu or cuda")
    return torch.device(choice)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(d.local_rank)
    return d


class Session:
    def __init__(self, recipe: Recipe, run: RunDir, device: torch.device):
        self.recipe = recipe
        self.run = run
        self.device = device
        self.dist = Dist()
        self._models: dict[str, SpeechModel] = {}  # loaded checkpoints, by path (inference only)

    # ---- data
    def split(self, name: str) -> Split:
        d = self.recipe.data
        # The cache depends on what is read and how it is featurized, not on batching or eval caps.
        key = hashlib.sha256(json.dumps([d.manifest_dir, d.kaldi_dir, d.sample_rate, d.on_error, vars(d.defaults),
                                         self.recipe.features.n_mels, split_fingerprint(d.manifest_dir, d.kaldi_dir, name)]
                                        ).encode()).hexdigest()[:10]
        return load_split(self.recipe, name, cache=self.run.path / "cache" / f"{name}-{key}.pt")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        d = self.run.tokenizer_dir
        if (d / "tokenizer.json").is_file():
            return Tokenizer.load(d)
        raise MissingInputError(f"{d}: tokenizer not found; it is trained by `prune-cli train RECIPE --stage base`")

    def build_tokenizer(self, train: Split) -> Tokenizer:
        d = self.run.tokenizer_dir
        if (d / "tokenizer.json").is_file():
            return Tokenizer.load(d)
        texts = [u.text for u in train.utts] + [u.source_text for u in train.utts if u.source_text]
        tok = train_tokenizer(self.recipe.tokenizer.kind, texts, self.recipe.tokenizer.vocab_size)
        if self.dist.is_main:
            tok.save(d)
        log(f"tokenizer: {tok.kind}, {tok.vocab_size} tokens")
        self.__dict__["tokenizer"] = tok
        return tok

    @cached_property
    def cmvn(self) -> dict[str, torch.Tensor]:
        p = self.run.cmvn
        if not p.is_file():
            raise MissingInputError(f"{p}: CMVN stats not found; they are computed by `prune-cli train RECIPE --stage base`")
        return torch.load(p, weights_only=True)

    def build_cmvn(self, train: Split) -> dict[str, torch.Tensor]:
        if self.run.cmvn.is_file():
            return self.cmvn
        stats = compute_cmvn(train.feats)
        if self.dist.is_main:
            atomic_torch_save(self.run.cmvn, stats)
        self.__dict__["cmvn"] = stats
        return stats

    # ---- models
    def base_model(self, variant: str = CONTEXT.name) -> SpeechModel:
        """The base a masked variant runs on: with gates.finetune_base, the copy fine-tuned under its own gates."""
        if not self.recipe.gates.finetune_base:
            return self.dense_model()
        return self._load(self.run.finetuned_ckpt_for(variant), "prune-cli train RECIPE --stage gates")

    def dense_model(self) -> SpeechModel:
        """The unpruned reference: the base as trained, before any fine-tuning for pruning."""
        return self._load(self.run.base_ckpt, "prune-cli train RECIPE --stage base")

    def variant_model(self, variant: str) -> SpeechModel:
        return self.base_model(variant) if VARIANTS[variant].masked else self.dense_model()

    def _load(self, path: Path, hint: str) -> SpeechModel:
        key = str(path)
        if key not in self._models:
            model, _ = load_model(path, hint)
            self._models[key] = model.to(self.device).eval()
        return self._models[key]

    def predictor(self, variant: str = CONTEXT.name) -> GatePredictor:
        """A learned variant's gate predictor (the static one has no inputs)."""
        blob = read_checkpoint(self.run.predictor_ckpt(variant), "prune-cli/gates", "prune-cli train RECIPE --stage gates")
        pred = build_predictor(self.recipe, blob["n_modules"], blob["inputs"], blob["speakers"])
        pred.load_state_dict(blob["state_dict"])
        return pred.to(self.device).eval()

    def masks(self, variants: Sequence[str] = (CONTEXT.name,)) -> MaskFile:
        """masks.json, checked against the base each of `variants` runs on."""
        path = self.run.masks
        if not path.is_file():
            raise MissingInputError(f"{path}: masks not found; produce them with `prune-cli prune RECIPE`")
        mf = MaskFile.load(path)
        for v in dict.fromkeys(v for v in variants if VARIANTS[v].masked):
            if v not in mf.variants:
                raise CheckpointError(f"{path}: no {v!r} masks (has: {', '.join(mf.variants)}); see prune.baselines "
                                      "and gates.train_static")
            model = self.base_model(v)
            mf.check_model([m.name for m in model.modules_list], model.arch_hash(), model.weights_hash(), path, v)
        return mf


def build_predictor(recipe: Recipe, n_modules: int, inputs: list[str], speakers: list[str]) -> GatePredictor:
    g = recipe.gates
    return GatePredictor(n_modules, inputs, g.embed_dim, g.hidden, recipe.features.n_mels, len(speakers), g.init_keep_logit)

