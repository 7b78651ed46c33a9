"""What every stage needs: the recipe, the run directory, the device, and loaders for earlier stages' outputs."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from prune_cli.atomic import atomic_torch_save
from prune_cli.contexts import ContextVocab, language_problem, parse_context_key, task_problem
from prune_cli.data.batching import InputSpec, Split, SplitSpec, load_split
from prune_cli.data.config import ContextDefaults
from prune_cli.data.features import compute_cmvn
from prune_cli.data.manifest import split_fingerprint, split_path
from prune_cli.data.owsm_features import OWSM_FRAMES
from prune_cli.data.owsm_tokenizer import OwsmTokenizer
from prune_cli.data.tokenizer import Tokenizer, train_tokenizer
from prune_cli.data.whisper_features import CHUNK_FRAMES
from prune_cli.data.whisper_tokenizer import WhisperTokenizer
from prune_cli.errors import CheckpointError, DataError, MissingInputError, UsageError
from prune_cli.gating.checkpoint import GateCheckpoint
from prune_cli.gating.masks import MaskFile
from prune_cli.gating.predictor import GatePredictor, LabelVocab
from prune_cli.model.checkpoint import load_model
from prune_cli.model.gated import GatedModel
from prune_cli.model.owsm import OwsmModel
from prune_cli.model.owsm_import import OwsmTokenizerFiles
from prune_cli.model.s2t import dims_from_recipe, max_input_frames
from prune_cli.model.whisper import WhisperModel
from prune_cli.model.whisper_import import TokenizerFiles
from prune_cli.progress import log
from prune_cli.recipe_schema import Recipe
from prune_cli.runs import RunDir
from prune_cli.variants import CONTEXT, VARIANTS

PRETRAINED_FAMILIES = ("whisper", "owsm")


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
        self._models: dict[str, GatedModel] = {}  # loaded checkpoints, by path (inference only)

    # ---- data
    @property
    def is_whisper(self) -> bool:
        return self.recipe.model.family == "whisper"

    @property
    def is_pretrained(self) -> bool:
        """A family whose base is imported (Whisper, OWSM), not trained."""
        return self.recipe.model.family in PRETRAINED_FAMILIES

    @property
    def inputs(self) -> InputSpec:
        """How stored features become model input: CMVN for our own model, Whisper's 30-s padding for Whisper (or
        not: model.whisper_input), OWSM's 30 s always (its MVN is the model's)."""
        if self.is_whisper:
            return InputSpec(None, CHUNK_FRAMES if self.recipe.model.whisper_input == "padded" else None)
        if self.recipe.model.family == "owsm":
            return InputSpec(None, OWSM_FRAMES)
        return InputSpec(self.cmvn)

    def inputs_for(self, model: GatedModel) -> InputSpec:
        """The input a loaded model runs on: a Whisper's own mode (see `configure`), the recipe's otherwise."""
        if isinstance(model, WhisperModel):
            return InputSpec(None, CHUNK_FRAMES if model.padded_input else None)
        return self.inputs

    @property
    def max_tokens(self) -> int:
        """The decoder's positions: prompt + text + end of text must fit."""
        return self.dense_model().dims.max_len if self.is_pretrained else self.recipe.model.max_len

    # ---- data
    def split(self, name: str) -> Split:
        spec = split_spec(self.recipe, name)
        # The cache depends on what is read and how it is featurized, not on batching or eval caps.
        d = self.recipe.data
        front = [spec.frontend] if spec.frontend != "fbank" else []  # fbank: the key it always had
        key = hashlib.sha256(json.dumps([str(spec.path), spec.sample_rate, spec.on_error, vars(d.defaults), spec.n_mels,
                                         spec.max_frames, split_fingerprint(d.manifest_dir, d.kaldi_dir, name), *front]
                                        ).encode()).hexdigest()[:10]
        return load_split(spec, cache=self.run.path / "cache" / f"{name}-{key}.pt")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        d = self.run.tokenizer_dir
        if (d / "tokenizer.json").is_file():
            return Tokenizer.load(d)
        raise MissingInputError(f"{d}: tokenizer not found; it is trained by `prune-cli train RECIPE --stage base`")

    def build_tokenizer(self, train: Split, pretrained: TokenizerFiles | OwsmTokenizerFiles | None = None) -> Tokenizer:
        d = self.run.tokenizer_dir
        if (d / "tokenizer.json").is_file():
            return Tokenizer.load(d)
        if pretrained is not None:  # the model's own tokenizer; the context vocabulary is still the training data's
            vocab = ContextVocab.build({u.task for u in train.utts}, {lg for u in train.utts for lg in (u.source_lang, u.target_lang)},
                                       self.recipe.data.synth.languages)
            if isinstance(pretrained, OwsmTokenizerFiles):
                ptok: WhisperTokenizer | OwsmTokenizer = OwsmTokenizer(
                    pretrained.sp_model, pretrained.token_list, vocab, pretrained.notime, pretrained.first_time, pretrained.last_time)
                name = "OWSM"
            else:
                ptok, name = WhisperTokenizer(pretrained.bpe_json, vocab, pretrained.suppress, pretrained.suppress_begin), "Whisper"
            problems = sorted({f"{u.task}:{u.source_lang}-{u.target_lang}: {p}" for u in train.utts
                               for p in ptok.context_problems(u.task, u.source_lang, u.target_lang)})
            if problems:
                raise DataError(problems + [f"{len(problems)} context(s) of the training data {name} cannot be prompted with"])
            if self.dist.is_main:
                ptok.save(d)
            log(f"tokenizer: {name}'s, {ptok.vocab_size} tokens; tasks {', '.join(vocab.tasks)}; languages {', '.join(vocab.langs)}")
            self.__dict__["tokenizer"] = ptok
            return ptok  # type: ignore[return-value]
        texts = [u.text for u in train.utts] + [u.source_text for u in train.utts if u.source_text]
        # The context vocabulary is the training data's; the demo corpus's languages keep the recipe's order.
        vocab = ContextVocab.build({u.task for u in train.utts}, {lg for u in train.utts for lg in (u.source_lang, u.target_lang)},
                                   self.recipe.data.synth.languages)
        tok = train_tokenizer(self.recipe.tokenizer.kind, texts, self.recipe.tokenizer.vocab_size, vocab)
        if self.dist.is_main:
            tok.save(d)
        log(f"tokenizer: {tok.kind}, {tok.vocab_size} tokens; tasks {', '.join(vocab.tasks)}; languages {', '.join(vocab.langs)}")
        self.__dict__["tokenizer"] = tok
        return tok

    @cached_property
    def cmvn(self) -> dict[str, torch.Tensor]:
        p = self.run.cmvn
        if not p.is_file():
            raise MissingInputError(f"{p}: CMVN stats not found; they are computed by `prune-cli train RECIPE --stage base`")
        return torch.load(p, weights_only=True)

    def build_cmvn(self, train: Split) -> dict[str, torch.Tensor] | None:
        if self.is_pretrained:  # Whisper's features are normalized by its front end, OWSM's by the model
            return None
        if self.run.cmvn.is_file():
            return self.cmvn
        stats = compute_cmvn(train.feats)
        if self.dist.is_main:
            atomic_torch_save(self.run.cmvn, stats)
        self.__dict__["cmvn"] = stats
        return stats

    # ---- models
    def base_model(self, variant: str = CONTEXT.name) -> GatedModel:
        """The base a masked variant runs on: with gates.finetune_base, the copy fine-tuned under its own gates."""
        if not self.recipe.gates.finetune_base:
            return self.dense_model()
        return self._load(self.run.finetuned_ckpt_for(variant), "prune-cli train RECIPE --stage gates")

    def dense_model(self) -> GatedModel:
        """The unpruned reference: the base as trained, before any fine-tuning for pruning."""
        return self._load(self.run.base_ckpt, "prune-cli train RECIPE --stage base")

    def variant_model(self, variant: str) -> GatedModel:
        return self.base_model(variant) if VARIANTS[variant].masked else self.dense_model()

    def configure(self, model: GatedModel, untouched: bool = False) -> GatedModel:
        """Run-time settings a checkpoint does not carry: Whisper's input mode. `untouched`: the pretrained weights as
        imported (the base checkpoint), which run in model.pretrained_input when the recipe sets it."""
        if isinstance(model, WhisperModel):
            m = self.recipe.model
            model.padded_input = (m.pretrained_input if untouched and m.pretrained_input else m.whisper_input) == "padded"
        return model

    def _load(self, path: Path, hint: str) -> GatedModel:
        key = str(path)
        if key not in self._models:
            model, _ = load_model(path, hint)
            if model.family != self.recipe.model.family:
                raise CheckpointError(f"{path}: a {model.family} checkpoint, but the recipe's model.family is "
                                      f"{self.recipe.model.family}")
            if isinstance(model, (WhisperModel, OwsmModel)):  # the checkpoint's dims are the pretrained model's
                self.configure(model, untouched=path == self.run.base_ckpt)
                want, have = {}, {}
            else:
                want = asdict(dims_from_recipe(self.recipe.model, self.recipe.features.n_mels, self.tokenizer.vocab_size))
                have = asdict(model.dims)
            diff = [f"{k} {have.get(k)} (recipe: {v})" for k, v in want.items() if k != "dropout" and have.get(k) != v]
            if diff:
                raise CheckpointError(f"{path}: the checkpoint's architecture does not match the recipe: {', '.join(diff)}; "
                                      "evaluate with the recipe it was trained with, or train it again")
            self._models[key] = model.to(self.device).eval()
        return self._models[key]

    def predictor(self, variant: str = CONTEXT.name) -> GatePredictor:
        """A learned variant's gate predictor (the static one has no inputs), checked against the recipe and model."""
        path = self.run.predictor_ckpt(variant)
        ckpt = GateCheckpoint.load(path)
        g = self.recipe.gates
        want_inputs = list(g.inputs) if VARIANTS[variant].context_inputs else []
        n_modules = self.base_model(variant).n_modules
        problems = []
        if ckpt.inputs != want_inputs:
            problems.append(f"inputs {ckpt.inputs} (recipe: {want_inputs})")
        if ckpt.n_modules != n_modules:
            problems.append(f"{ckpt.n_modules} modules (the model has {n_modules})")
        pred = build_predictor(self.recipe, n_modules, want_inputs, ckpt.labels, self.tokenizer.vocab)
        if not problems:
            try:
                pred.load_state_dict(ckpt.state_dict)
            except (RuntimeError, KeyError) as e:
                problems.append(f"weights that do not fit gates.embed_dim={g.embed_dim} / gates.hidden={g.hidden} "
                                f"({str(e).splitlines()[0][:120]})")
        if problems:
            raise CheckpointError(f"{path}: the gate predictor does not match the recipe: {'; '.join(problems)}; "
                                  "retrain it with `prune-cli train RECIPE --stage gates`")
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


def parse_context(key: str) -> ContextDefaults:
    """`asr:de` or `st:de-en` as the context given to utterances whose data names none."""
    try:
        task, src, tgt = parse_context_key(key)
    except ValueError:
        raise UsageError(f"--context {key!r}: expected asr:LANG or TASK:SRC-TGT, e.g. asr:de or st:de-en") from None
    problems = [p for p in (task_problem(task), language_problem(src), language_problem(tgt)) if p]
    if problems:
        raise UsageError([f"--context {key!r}: {p}" for p in problems])
    return ContextDefaults(task, src, tgt)


def split_spec(recipe: Recipe, split: str) -> SplitSpec:
    """What a split is read with: our fbank up to the E-Branchformer's positional table, or Whisper's or OWSM's
    log-mel up to 30 s."""
    d = recipe.data
    family = recipe.model.family
    max_frames, frontend = {"whisper": (CHUNK_FRAMES, "whisper"), "owsm": (OWSM_FRAMES, "owsm")}.get(family, (max_input_frames(), "fbank"))
    return SplitSpec(split_path(d.manifest_dir, d.kaldi_dir, split), d.defaults, d.sample_rate, recipe.features.n_mels,
                     d.on_error, max_frames, frontend)


def build_predictor(recipe: Recipe, n_modules: int, inputs: list[str], labels: LabelVocab, vocab: ContextVocab) -> GatePredictor:
    g = recipe.gates
    return GatePredictor(n_modules, inputs, g.embed_dim, g.hidden, recipe.features.n_mels, labels, g.init_keep_logit,
                         len(vocab.tasks), len(vocab.langs))

