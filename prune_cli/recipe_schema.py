"""The recipe schema: one typed dataclass per section, with defaults and one-line comments per key.

Validation happens once, at the edge (prune_cli.recipe). Everything downstream receives a `Recipe` and trusts it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from prune_cli.data.config import ContextDefaults, SpecAugmentConfig, SynthConfig
from prune_cli.variants import BASELINES, CONTEXT, DENSE, STATIC, VARIANTS


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
    family: Literal["ebranchformer", "whisper", "owsm"] = "ebranchformer"
    # whisper: the pretrained model (whisper-base, a transformers dir, an openai-whisper .pt, a CTranslate2 dir, or
    # a `prune-cli model import` .pt); owsm: an ESPnet download's directory or config.yaml, or an imported .pt.
    # The width and depth keys below are then the checkpoint's, not the recipe's
    pretrained: str = ""
    whisper_input: Literal["padded", "variable"] = "padded"  # Whisper's 30-s input, or the utterance's own length
    # The untouched pretrained weights (the dense variant): their own input mode; null = whisper_input. Weights the
    # gate stage adapts are trained and scored in whisper_input.
    pretrained_input: Optional[Literal["padded", "variable"]] = None
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
