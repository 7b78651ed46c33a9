"""Typed recipe schema, YAML loading with includes, dotted overrides and strict validation.

Validation happens once, here. Everything downstream receives a `Recipe` and trusts it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence, Union

import yaml

from prune_cli.contexts import language_problem, task_problem
from prune_cli.data.config import ContextDefaults, SpecAugmentConfig, SynthConfig
from prune_cli.errors import UsageError
from prune_cli.variants import BASELINES, CONTEXT, DENSE, NAMES, STATIC, VARIANTS

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class DataConfig:
    manifest_dir: str = "data_manifests/demo"  # holds train/dev/test.jsonl
    kaldi_dir: Optional[str] = None  # alternative input: a Kaldi/ESPnet data dir root with train/dev/test
    synth: SynthConfig = field(default_factory=SynthConfig)
    sample_rate: int = 16000
    on_error: Literal["fail", "skip"] = "fail"
    defaults: ContextDefaults = field(default_factory=ContextDefaults)
    max_frames_per_batch: int = 12000
    max_utts_per_context: Optional[int] = None  # cap per context for eval/profile subsets
    duration_tolerance_s: float = 0.05


@dataclass
class FeatureConfig:
    n_mels: int = 80
    specaugment: Optional[SpecAugmentConfig] = field(default_factory=SpecAugmentConfig)


@dataclass
class TokenizerConfig:
    kind: Literal["char", "sentencepiece"] = "sentencepiece"
    vocab_size: int = 400


@dataclass
class ModelConfig:
    family: Literal["ebranchformer", "whisper"] = "ebranchformer"
    # whisper: the pretrained model (whisper-base, a transformers dir, an openai-whisper .pt, a CTranslate2 dir, or
    # a `prune-cli model import` .pt); the width and depth keys below are then the checkpoint's, not the recipe's
    pretrained: str = ""
    whisper_input: Literal["padded", "variable"] = "padded"  # Whisper's 30-s input, or the utterance's own length
    d_model: int = 144
    heads: int = 4
    enc_layers: int = 6
    dec_layers: int = 4
    ffn_dim: int = 576
    cgmlp_dim: int = 576
    cgmlp_kernel: int = 15
    merge_kernel: int = 3
    frontend_channels: int = 32
    dropout: float = 0.1
    max_len: int = 128


@dataclass
class BaseTrainConfig:
    steps: int = 3000
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 300
    grad_accum: int = 1
    clip: float = 5.0
    label_smoothing: float = 0.1
    ctc_weight: float = 0.3
    # LayerDrop-style: each prunable module is skipped (not run) for a whole batch with this probability,
    # so the base learns to work with modules missing, which is what pruning asks of it.
    module_drop: float = 0.0
    val_every: int = 500
    save_every: int = 250
    keep_best: int = 3
    log_every: int = 50


@dataclass
class SparsityTarget:
    encoder: float = 0.0
    decoder: float = 0.5


@dataclass
class GatesConfig:
    inputs: list[Literal["task", "source_lang", "target_lang", "pooled_features", "speaker", "condition"]] = field(
        default_factory=lambda: ["task", "source_lang", "target_lang"]
    )
    embed_dim: int = 32
    hidden: int = 64
    scope: Literal["encoder", "decoder", "both"] = "decoder"
    target: SparsityTarget = field(default_factory=SparsityTarget)
    weighting: Literal["modules", "flops"] = "modules"
    # batch: the loss is on the batch-mean sparsity, so contexts trade it (the paper's ASR decoders prune more);
    # context: every context meets the target itself, and only chooses which modules to skip: its exported masks
    # (and those the base adapts to when phased) skip exactly the target share by the context's own ranking.
    # The static baseline (one mask for all contexts) takes the batch-mean loss either way.
    sparsity_per: Literal["batch", "context"] = "batch"
    # Every deployed mask (context-aware and static; exported, and trained under once the predictor is frozen) keeps at
    # least this many decoder cross-attentions, trading them for the decoder's other modules at the same module
    # count. Without one the decoder never sees the audio. 0: masks as the gates chose them.
    min_cross_attention: int = 1
    # Modules no learned mask skips (names or fnmatch patterns, e.g. encoder.0.attn); the targets fall on the others.
    always_run: list[str] = field(default_factory=list)
    alpha: float = 5.0
    target_warmup_steps: int = 200
    tau_start: float = 1.0
    tau_end: float = 0.1
    # The Gumbel temperature (and noise) anneal from tau_start to tau_end over `all` of `steps`, or over the steps in
    # which the predictor learns (`predictor`: up to the freeze point of `phased`; the same as `all` otherwise).
    # With `all` and phased, the predictor stops at tau 0.56 (share 0.25), its sampled masks still far from its argmax.
    anneal_over: Literal["all", "predictor"] = "all"
    steps: int = 800
    lr: float = 3e-3  # higher rates saturate the gate logits before contexts can diverge
    finetune_base: bool = False
    # joint: base and predictor learn together (masks tend to converge to one for all contexts);
    # phased: the predictor learns on the frozen base for the first `predictor_share` of the steps, then the base
    # learns under its masks.
    finetune_schedule: Literal["joint", "phased"] = "joint"
    predictor_share: float = 0.5  # phased: the share of `steps` in which the predictor learns, before the base does
    # phased: the share of `steps` in which the base first adapts with every module kept, before the predictor learns.
    # For a pretrained model far from the data (Whisper on the synthetic corpus): gates learned on a base that cannot
    # yet produce the targets follow noise (docs/whisper.md). The base then learns in [0, adapt) and [freeze, steps).
    adapt_share: float = 0.0
    base_lr: float = 1e-4
    init_keep_logit: float = 2.0
    # Context-aware masks are the argmax, which can end off target (the loss meets it in sampled batch means). When the
    # predictor stops learning (the freeze point of `phased`, or the end with a frozen base), shift each scope's skip
    # threshold so the mean sparsity over training utterances meets the target. Not applied to `joint`, nor with
    # sparsity_per: context (whose masks are cut at exactly the target per context).
    calibrate: bool = True
    # Weight of a distillation term: KL from the dense base's next-token distribution (teacher forcing) to the gated
    # model's, added to the task loss in every gate step. 0: off (no teacher forward pass).
    distill: float = 0.0
    # Seeds the gate stage alone (predictor init, Gumbel noise, data order, SpecAugment); None: the run's seed.
    # Lets one base and corpus measure how much the learned masks and their quality vary with gate training's randomness.
    seed: Optional[int] = None
    train_static: bool = True  # the `static` baseline is trained with the same loop
    # The fair dense reference, `dense_tuned`: a copy of the base fine-tuned on the same schedule and data with every
    # module kept (needs finetune_base). Against it, eval measures what pruning costs, not what extra training gains.
    train_dense_tuned: bool = False
    static_lr: float = 2e-2  # its single logit table needs a larger step to reach the target in the same steps
    val_every: int = 200
    save_every: int = 100
    log_every: int = 50

    @property
    def phased(self) -> bool:
        """The base is fine-tuned after the predictor has learned (not beside it, nor not at all)."""
        return self.finetune_base and self.finetune_schedule == "phased"

    @property
    def adapt_step(self) -> int:
        """Phased schedule: the step at which the predictor starts learning (the base adapted densely before it)."""
        return int(self.steps * self.adapt_share) if self.phased else 0

    @property
    def freeze_step(self) -> int:
        """Phased schedule: the step at which the predictor stops learning and the base starts again."""
        return self.adapt_step + int(self.steps * self.predictor_share)

    @property
    def base_windows(self) -> list[tuple[int, int]]:
        """Phased schedule: the [start, stop) step ranges in which the base learns."""
        return [(a, b) for a, b in ((0, self.adapt_step), (self.freeze_step, self.steps)) if a < b]

    @property
    def anneal_steps(self) -> int:
        """The steps over which the Gumbel temperature anneals (gates.anneal_over), counted from adapt_step."""
        end = self.freeze_step if self.phased and self.anneal_over == "predictor" else self.steps
        return end - self.adapt_step


@dataclass
class PruneConfig:
    baselines: list[Literal[BASELINES]] = field(default_factory=lambda: list(BASELINES))  # type: ignore[valid-type]
    materialize: bool = False
    # The static baseline skips exactly the target share of each scope (largest skip margins first) instead of its
    # raw argmax, so it is compared with the context-aware masks at the same sparsity.
    calibrate_static: bool = True


@dataclass
class EvalConfig:
    variants: list[str] = field(default_factory=lambda: [DENSE.name, CONTEXT.name, STATIC.name])
    split: Literal["dev", "test"] = "test"
    beam_size: int = 1
    length_penalty: float = 0.0
    max_len_ratio: float = 1.0  # max output tokens = max_len_ratio * encoder frames (capped by model.max_len)
    # Text form before scoring: `basic` (lowercase, punctuation removed for WER) or `numbers` (also numbers as digits)
    normalize: Literal["basic", "numbers"] = "basic"
    # ASR only: joint CTC/attention beam search, (1 - w) * attention + w * CTC prefix score (needs beam_size > 1)
    ctc_weight: float = 0.0
    # Temperature fallback: decode again at the next temperature when an output's gzip compression ratio is above
    # compression_ratio_threshold or its average log-probability below logprob_threshold (null: that test off).
    temperatures: Optional[list[float]] = None  # null: the model family's own (Whisper: 0, 0.2, ..., 1; ours: 0 only)
    compression_ratio_threshold: Optional[float] = 2.4
    logprob_threshold: Optional[float] = -1.0
    best_of: int = 5  # samples per utterance at a temperature above 0
    batch_size: int = 64
    max_wer: Optional[float] = None
    min_bleu: Optional[float] = None
    # Resamples of the paired bootstrap that compares variants' averages (context vs static, each vs dense); 0: off.
    bootstrap: int = 1000
    # A test context prune made no mask for: `error`, or serve it with the `static` mask or the `nearest` trained one.
    unseen_contexts: Literal[("error", STATIC.name, "nearest")] = "error"  # type: ignore[valid-type]
    # More test sets the eval stage scores, each into eval/sets/<name>/: a synth test set's name (its manifest in
    # data.manifest_dir), or a JSONL manifest / Kaldi dir path (named by its file or folder name).
    sets: list[str] = field(default_factory=list)

    def set_paths(self, manifest_dir: str) -> list[tuple[str, Path]]:
        """(name, path) of each entry of `sets`."""
        out = []
        for entry in self.sets:
            path = Path(entry)
            if len(path.parts) == 1 and path.suffix != ".jsonl":
                out.append((entry, Path(manifest_dir) / f"{entry}.jsonl"))
            else:
                out.append((path.name if path.is_dir() or not path.suffix else path.stem, path))
        return out


@dataclass
class ProfileConfig:
    variants: list[str] = field(default_factory=lambda: [DENSE.name, CONTEXT.name, STATIC.name])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    warmup: int = 2
    repeats: int = 10
    threads: int = 2
    utts_per_context: int = 8
    contexts: Optional[list[str]] = None  # None: every context in the split


@dataclass
class CheckConfig:
    """Tolerances for `run --check-against` (absolute, in metric units)."""

    wer: float = 0.0
    cer: float = 0.0
    bleu: float = 0.0
    chrf: float = 0.0


@dataclass
class Recipe:
    name: str = "demo"
    seed: int = 1234
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    base: BaseTrainConfig = field(default_factory=BaseTrainConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    # More operating points `run` trains after the main job, each a mapping of dotted keys to values (the
    # key=value override syntax), e.g. {gates.target.encoder: 0.75, gates.target.decoder: 0.75}: gates -> prune ->
    # eval -> profile per point on the same base, a summary table and a quality-vs-cost plot.
    sweep: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def enabled(self, variant: str) -> bool:
        """Whether this recipe produces a variant (its registry `switch`: a bool key, or prune.baselines)."""
        switch = VARIANTS[variant].switch
        if switch is None:
            return True
        if switch == "prune.baselines":
            return variant in self.prune.baselines
        section, key = switch.split(".")
        return bool(getattr(getattr(self, section), key))

    def section_hash(self, *sections: str) -> str:
        """Hash of the named sections: a stage is up to date when the sections it depends on are unchanged."""
        d = self.to_dict()
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- YAML loading


class _Loader(yaml.SafeLoader):
    """YAML 1.1's float pattern needs a dot, so `1e-3` would load as a string: YAML 1.2's also takes exponents."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)"
               r"|[-+]?(?:[0-9][0-9_]*)\.[0-9_]*|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"{path}: recipe file not found")
    try:
        data = load_yaml(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UsageError(f"{where}: invalid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        raise UsageError(f"{path}: empty recipe")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a recipe must be a mapping at top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_raw(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe and the recipes it includes (`include:` or `defaults:`), parents first."""
    path = path.resolve()
    if path in _seen:
        raise UsageError(f"{path}: include cycle: {' -> '.join(str(p) for p in _seen + (path,))}")
    data = _read_yaml(path)
    includes = data.pop("include", None) or data.pop("defaults", None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = deep_merge(merged, load_raw((path.parent / inc), _seen + (path,)))
    return deep_merge(merged, data)


def resolve_recipe_path(name_or_path: str) -> Path:
    """A path, or the name of a bundled recipe (`demo`, `ci_smoke`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (RECIPES_DIR / name_or_path, RECIPES_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    bundled = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
    hint = difflib.get_close_matches(p.stem, bundled, n=1)
    extra = f" (did you mean '{hint[0]}'?)" if hint else f" (bundled: {', '.join(bundled)})"
    raise UsageError(f"{name_or_path}: recipe not found{extra}")


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    if "=" not in text:
        raise UsageError(f"--set {text!r}: expected key.path=value")
    key, value = text.split("=", 1)
    try:
        parsed = load_yaml(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return tuple(key.strip().split(".")), parsed


def parse_sweep(text: str) -> list[dict[str, Any]]:
    """--sweep key.path=v1,v2,... as sweep points: [{key.path: v1}, {key.path: v2}, ...]."""
    if "=" not in text:
        raise UsageError(f"--sweep {text!r}: expected key.path=v1,v2,...")
    key, values = text.split("=", 1)
    vals = [v for v in values.split(",") if v != ""]
    if len(vals) < 1:
        raise UsageError(f"--sweep {text!r}: no values")
    return [{key.strip(): parse_override(f"{key}={v}")[1]} for v in vals]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    return apply_values(raw, [parse_override(text) for text in overrides])


def apply_values(raw: dict[str, Any], values: Iterable[tuple[Sequence[str], Any]]) -> dict[str, Any]:
    """A copy of `raw` with each key path set to its value, in order."""
    out = copy.deepcopy(raw)
    for path, value in values:
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return out


def sweep_point_raw(raw: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The raw recipe of one sweep point: the parent's, without its own sweep, with the point's values set."""
    return apply_values({k: v for k, v in raw.items() if k != "sweep"}, [(k.split("."), v) for k, v in point.items()])


def point_label(point: dict[str, Any]) -> str:
    """A sweep point as key=value pairs, also the name of its run directory: no spaces, quotes or brackets
    (lists join with +, booleans as in YAML)."""
    def text(v: Any) -> str:
        if isinstance(v, list):
            return "+".join(text(x) for x in v)
        return str(v).lower() if isinstance(v, bool) else str(v)

    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(f"{k}={text(v)}" for k, v in point.items()))


# ---------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            trial: list[str] = []
            out = _convert(value, a, path, trial)
            if not trial:
                return out
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            errors.append(f"{path}: expected a mapping of dotted keys to values, got {value!r}")
            return {}
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
            return []
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
            return tp()
        return _build(tp, value, path, errors)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected float, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path}: expected str, got {value!r}")
        return value
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            full = [f"{prefix}.{c}" if prefix else c for c in close]
            hint = f" (did you mean '{full[0]}'?)" if full else f" (valid keys: {', '.join(names)})"
            errors.append(f"{path}: unknown key{hint}")
            continue
        kwargs[key] = _convert(value, hints[key], path, errors)
    return cls(**kwargs)


def _semantic_checks(r: Recipe) -> list[str]:
    errs: list[str] = []
    errs += _synth_problems(r.data.synth)
    set_names = [name for name, _ in r.eval.set_paths(r.data.manifest_dir)]
    errs += [f"eval.sets: two sets named {n!r} (their folders under eval/sets/ would collide)"
             for n in sorted({n for n in set_names if set_names.count(n) > 1})]
    errs += [f"eval.sets: {n!r} is not a plain name (letters, digits, '.', '_', '-')" for n in set_names if not is_plain_name(n)]
    d = r.data.defaults
    errs += [f"data.defaults: {p}" for p in (task_problem(d.task) if d.task else None,
                                             language_problem(d.source_lang) if d.source_lang else None,
                                             language_problem(d.target_lang) if d.target_lang else None) if p]
    for sec, key in (("encoder", r.gates.target.encoder), ("decoder", r.gates.target.decoder)):
        if not 0.0 <= key < 1.0:
            errs.append(f"gates.target.{sec}: must be in [0, 1), got {key}")
    if r.model.family == "whisper":
        if not r.model.pretrained:
            errs.append("model.pretrained: the whisper family starts from a pretrained model (whisper-base, or a path)")
        for key, w in (("base.ctc_weight", r.base.ctc_weight), ("eval.ctc_weight", r.eval.ctc_weight)):
            if w > 0:
                errs.append(f"{key}: Whisper has no CTC head; set it to 0")
        if r.data.sample_rate != 16000:
            errs.append(f"data.sample_rate: Whisper's front end takes 16000 Hz, got {r.data.sample_rate}")
    elif r.model.pretrained:
        errs.append("model.pretrained: only the whisper family loads a pretrained model (set model.family: whisper)")
    if r.model.d_model % r.model.heads:
        errs.append(f"model.d_model: {r.model.d_model} is not divisible by model.heads={r.model.heads}")
    if r.model.cgmlp_dim % 2:
        errs.append("model.cgmlp_dim: must be even (it is split into two gated halves)")
    for section, vs in (("eval", r.eval.variants), ("profile", r.profile.variants)):
        for v in vs:
            if v not in VARIANTS:
                errs.append(f"{section}.variants: unknown variant {v!r} ({', '.join(NAMES)})")
            elif VARIANTS[v].kind == "unpruned" and not r.enabled(v):  # masked ones fail at eval, naming masks.json
                errs.append(f"{section}.variants: {v} is trained only with {VARIANTS[v].switch}: true")
    for v in VARIANTS.values():  # an unpruned variant that trains its own copy of the base needs fine-tuning on
        if v.kind == "unpruned" and v.own_base and r.enabled(v.name) and not r.gates.finetune_base:
            errs.append(f"{v.switch}: the dense reference is the base fine-tuned like the pruned variants; "
                        "it needs gates.finetune_base: true")
    for bs in r.profile.batch_sizes:
        if bs < 1:
            errs.append("profile.batch_sizes: must be positive")
    if not 0 <= r.gates.min_cross_attention <= r.model.dec_layers:
        errs.append(f"gates.min_cross_attention: must be in [0, model.dec_layers={r.model.dec_layers}], "
                    f"got {r.gates.min_cross_attention}")
    adapt_ok = 0.0 <= r.gates.adapt_share < 1.0
    if not adapt_ok:
        errs.append(f"gates.adapt_share: must be in [0, 1), got {r.gates.adapt_share}")
    elif r.gates.adapt_share > 0 and not r.gates.phased:
        errs.append("gates.adapt_share: the base adapts before the predictor only in the phased schedule "
                    "(gates.finetune_base: true, gates.finetune_schedule: phased)")
    if not 0.0 < r.gates.predictor_share < 1.0:
        errs.append(f"gates.predictor_share: must be in (0, 1), got {r.gates.predictor_share}")
    elif adapt_ok and r.gates.phased and not r.gates.adapt_step + 1 <= r.gates.freeze_step < r.gates.steps:
        errs.append(f"gates.predictor_share: {r.gates.predictor_share} of gates.steps={r.gates.steps} leaves the predictor "
                    "or the base no step of the phased schedule")
    if r.gates.distill < 0.0:
        errs.append(f"gates.distill: must be >= 0, got {r.gates.distill}")
    if not 0.0 <= r.base.module_drop < 1.0:
        errs.append(f"base.module_drop: must be in [0, 1), got {r.base.module_drop}")
    if not 0.0 <= r.eval.ctc_weight <= 1.0:
        errs.append(f"eval.ctc_weight: must be in [0, 1], got {r.eval.ctc_weight}")
    elif r.eval.ctc_weight > 0 and r.eval.beam_size < 2:
        errs.append("eval.ctc_weight: joint CTC/attention decoding is a beam search; set eval.beam_size >= 2 (or ctc_weight 0)")
    if r.eval.beam_size < 1:
        errs.append(f"eval.beam_size: must be >= 1, got {r.eval.beam_size}")
    temps = r.eval.temperatures
    if temps is not None and (not temps or temps[0] != 0.0 or any(b <= a for a, b in zip(temps, temps[1:]))):
        errs.append(f"eval.temperatures: must start at 0.0 and rise (e.g. [0.0, 0.2, 0.4]), got {temps}")
    if r.eval.best_of < 1:
        errs.append(f"eval.best_of: must be >= 1, got {r.eval.best_of}")
    if r.eval.bootstrap != 0 and r.eval.bootstrap < 100:
        errs.append(f"eval.bootstrap: must be 0 (off) or >= 100 resamples, got {r.eval.bootstrap}")
    if r.tokenizer.vocab_size < 16:
        errs.append("tokenizer.vocab_size: must be >= 16")
    positive = {
        "base.steps": r.base.steps, "base.lr": r.base.lr, "base.val_every": r.base.val_every,
        "base.save_every": r.base.save_every, "base.log_every": r.base.log_every, "base.grad_accum": r.base.grad_accum,
        "gates.steps": r.gates.steps, "gates.lr": r.gates.lr, "gates.static_lr": r.gates.static_lr,
        "gates.base_lr": r.gates.base_lr, "gates.val_every": r.gates.val_every, "gates.save_every": r.gates.save_every,
        "gates.log_every": r.gates.log_every, "gates.tau_start": r.gates.tau_start, "gates.tau_end": r.gates.tau_end,
        "data.max_frames_per_batch": r.data.max_frames_per_batch, "data.sample_rate": r.data.sample_rate,
        "eval.batch_size": r.eval.batch_size, "profile.repeats": r.profile.repeats, "profile.threads": r.profile.threads,
        "profile.utts_per_context": r.profile.utts_per_context, "features.n_mels": r.features.n_mels,
    }
    errs += [f"{k}: must be > 0, got {v}" for k, v in positive.items() if isinstance(v, (int, float)) and not v > 0]
    non_negative = {"base.warmup_steps": r.base.warmup_steps, "base.weight_decay": r.base.weight_decay, "base.clip": r.base.clip,
                    "base.keep_best": r.base.keep_best, "gates.alpha": r.gates.alpha, "profile.warmup": r.profile.warmup,
                    "gates.target_warmup_steps": r.gates.target_warmup_steps}
    errs += [f"{k}: must be >= 0, got {v}" for k, v in non_negative.items() if isinstance(v, (int, float)) and not v >= 0]
    if r.data.max_utts_per_context is not None and r.data.max_utts_per_context < 1:
        errs.append(f"data.max_utts_per_context: must be >= 1 (or null), got {r.data.max_utts_per_context}")
    if not is_plain_name(r.name):
        errs.append(f"name: {r.name!r} must be a plain folder name (letters, digits, '.', '_', '-'; no '/' or '..'): "
                    "the run dir is runs/<name>")
    return errs


def is_plain_name(name: str) -> bool:
    """A folder name that stays where it is put: letters, digits, '.', '_', '-'; no '/' and no '..'."""
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name)) and ".." not in name


def _synth_problems(cfg: SynthConfig) -> list[str]:
    """The demo corpus speaks the languages both eSpeak NG and num2words support, read from the libraries."""
    from prune_cli.data.synth import FORMS, form_supported, supported_languages, synth_contexts

    errs: list[str] = []
    supported = supported_languages()
    for lang in cfg.languages:
        if lang not in supported:
            errs.append(f"data.synth.languages: unsupported language {lang!r}: eSpeak NG and num2words do not both speak "
                        f"it ({len(supported)} do: {', '.join(supported)})")
    for pair in cfg.st_pairs:
        parts = pair.split("-")
        if len(parts) != 2 or parts[0] == parts[1] or any(p not in supported for p in parts):
            errs.append(f"data.synth.st_pairs: bad pair {pair!r} (SRC-TGT: two different languages eSpeak NG and num2words speak)")
    for form in cfg.forms:
        if form not in FORMS:
            errs.append(f"data.synth.forms: unknown form {form!r} ({', '.join(FORMS)})")
    langs = dict.fromkeys([*cfg.languages, *(p for pair in cfg.st_pairs for p in pair.split("-"))])
    for lang in (lg for lg in langs if lg in supported):
        for form in (f for f in cfg.forms if f in FORMS and not form_supported(lang, f)):
            errs.append(f"data.synth.forms: num2words has no {form} numbers in {lang!r}")
    if cfg.max_number < 10:
        errs.append("data.synth.max_number: must be >= 10")
    n_contexts = len(synth_contexts(cfg))
    for key in ("n_train", "n_dev", "n_test"):  # every split needs each context at least once
        if getattr(cfg, key) < max(1, n_contexts):
            errs.append(f"data.synth.{key}: at least one utterance per context ({n_contexts}), got {getattr(cfg, key)}")
    for key in ("voices_per_lang", "workers"):
        if getattr(cfg, key) < 1:
            errs.append(f"data.synth.{key}: at least 1, got {getattr(cfg, key)}")
    return errs + _variation_problems(cfg)


def _variation_problems(cfg: SynthConfig) -> list[str]:
    """Held-out voices, training augmentation and robustness test sets."""
    from prune_cli.data.synth import NOISES, VOICE_VARIANTS, voice_variants

    errs: list[str] = []
    known = voice_variants()
    errs += [f"data.synth.heldout_voices: eSpeak NG has no voice variant {v!r}" for v in cfg.heldout_voices if v not in known]
    errs += [f"data.synth.heldout_voices: {v!r} is one of the clean splits' voices (the first voices_per_lang of "
             f"{', '.join(VOICE_VARIANTS)})" for v in cfg.heldout_voices if v in VOICE_VARIANTS[: cfg.voices_per_lang]]

    def check_range(key: str, pair: list, lo: float, hi: float) -> None:
        if len(pair) != 2 or not lo <= pair[0] <= pair[1] <= hi:
            errs.append(f"data.synth.{key}: expected [low, high] within [{lo}, {hi}], got {pair}")

    def check_noises(key: str, noises: list[str]) -> None:
        if not noises:
            errs.append(f"data.synth.{key}: at least one of {', '.join(NOISES)}")
        errs.extend(f"data.synth.{key}: unknown noise {n!r} ({', '.join(NOISES)})" for n in noises if n not in NOISES)

    check_range("rate_range", cfg.rate_range, 80, 450)
    check_range("pitch_range", cfg.pitch_range, 0, 99)
    if cfg.augment is not None:
        a = cfg.augment
        for key in ("clean_share", "noise_share", "reverb_share"):
            if not 0.0 <= getattr(a, key) <= 1.0:
                errs.append(f"data.synth.augment.{key}: a share in [0, 1], got {getattr(a, key)}")
        check_range("augment.rate_range", a.rate_range, 80, 450)
        check_range("augment.pitch_range", a.pitch_range, 0, 99)
        check_range("augment.snr_range", a.snr_range, -10, 60)
        check_range("augment.rt60_range", a.rt60_range, 0.05, 3.0)
        check_noises("augment.noises", a.noises)
        if a.babble_talkers < 1:
            errs.append(f"data.synth.augment.babble_talkers: at least 1, got {a.babble_talkers}")
    names = [ts.name for ts in cfg.test_sets]
    for i, ts in enumerate(cfg.test_sets):
        key = f"test_sets[{i}]"
        if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", ts.name) or ts.name in ("train", "dev", "test"):
            errs.append(f"data.synth.{key}.name: lowercase letters, digits and _, not train/dev/test; got {ts.name!r}")
        elif names.count(ts.name) > 1:
            errs.append(f"data.synth.{key}.name: {ts.name!r} is used twice")
        if ts.per_context < 1:
            errs.append(f"data.synth.{key}.per_context: at least 1, got {ts.per_context}")
        if ts.voices == "heldout" and not cfg.heldout_voices:
            errs.append(f"data.synth.{key}.voices: heldout, but data.synth.heldout_voices is empty")
        if ts.voices == "neural":
            from prune_cli.data.neural_voice import PIPER_LANGUAGE, missing

            if PIPER_LANGUAGE not in cfg.languages:
                errs.append(f"data.synth.{key}.voices: neural speaks {PIPER_LANGUAGE} only, which data.synth.languages lacks")
            elif missing():
                errs.append(f"data.synth.{key}.voices: {missing()}")
        check_noises(f"{key}.noises", ts.noises)
        if ts.rate_range is not None:
            check_range(f"{key}.rate_range", ts.rate_range, 80, 450)
        if ts.pitch_range is not None:
            check_range(f"{key}.pitch_range", ts.pitch_range, 0, 99)
    return errs


def build_recipe(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    errors: list[str] = []
    recipe = _build(Recipe, raw, "", errors)
    if not errors:
        errors = _semantic_checks(recipe)
    for i, point in enumerate(recipe.sweep if not errors else []):
        if not point or any(k == "sweep" or k.startswith("sweep.") for k in point):
            errors.append(f"sweep[{i}]: a point sets at least one key, and not sweep itself; got {point!r}")
            continue
        try:  # each point must be a valid recipe before anything runs
            build_recipe(sweep_point_raw(raw, point))
        except UsageError as e:
            errors += [f"sweep[{i}]: {line.removeprefix('<recipe>: ')}" for line in e.problems]
    if errors:
        raise UsageError([f"{source}: {e}" for e in errors])
    return recipe


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    r, path, _ = load_recipe_raw(name_or_path, overrides)
    return r, path


def load_recipe_raw(name_or_path: str, overrides: list[str] | None = None) -> tuple[Recipe, Path, dict[str, Any]]:
    """The validated recipe, its path, and the raw mapping it was built from (overrides applied; sweeps start from it)."""
    path = resolve_recipe_path(name_or_path)
    raw = apply_overrides(load_raw(path), overrides or [])
    return build_recipe(raw, str(path)), path, raw


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def bundled_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml"))
