"""Training: the base model (stage `base`) and the gate predictors (stage `gates`), with one readable loop.

Resume: rerunning continues from checkpoints/<name>/last.pt. The data order is a function of (seed, epoch),
SpecAugment and Gumbel noise of (seed, step), and the global RNG (dropout) is saved, so a resumed CPU run
reaches the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from prune_cli.atomic import append_jsonl, atomic_torch_save
from prune_cli.contexts import ContextVocab
from prune_cli.data.batching import IGNORE, Batch, Split, collate, make_batches, shard
from prune_cli.data.features import spec_augment
from prune_cli.engine.masking import exact_cut
from prune_cli.engine.session import Session, build_predictor, init_distributed
from prune_cli.errors import TrainingError, UsageError
from prune_cli.gating.predictor import ContextInputs, GatePredictor, LabelVocab, deterministic_gates, gumbel_straight_through, tau_at
from prune_cli.gating.sparsity import SparsitySpec, calibration_shift
from prune_cli.model.checkpoint import load_model, save_model
from prune_cli.model.flops import module_flops
from prune_cli.model.s2t import SpeechModel, count_params, dims_from_recipe
from prune_cli.model.whisper_import import open_pretrained
from prune_cli.progress import log, progress
from prune_cli.runs import derived_generator, seed_everything
from prune_cli.variants import TRAINED

SPECAUG_SALT, GUMBEL_SALT, MODULE_DROP_SALT = 1, 2, 3


# ---------------------------------------------------------------- losses


def seq_loss(logits: torch.Tensor, batch: Batch, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-smoothed cross-entropy over target tokens, and token accuracy."""
    labels = batch.dec_out[:, : logits.shape[1]]
    loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, label_smoothing=smoothing)
    valid = labels != IGNORE
    acc = ((logits.argmax(-1) == labels) & valid).sum() / valid.sum().clamp_min(1)
    return loss, acc


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over target tokens."""
    valid = batch.dec_out[:, : logits.shape[1]] != IGNORE
    t = teacher_logits.float().log_softmax(-1)[valid]
    return F.kl_div(logits.float().log_softmax(-1)[valid], t, log_target=True, reduction="batchmean")


def ctc_loss(ctc_logits: torch.Tensor, mem_lens: torch.Tensor, batch: Batch) -> torch.Tensor:
    has = batch.ctc_lens > 0
    if not bool(has.any()):
        return ctc_logits.new_zeros(())
    lp = ctc_logits.float().log_softmax(-1).transpose(0, 1)[:, has]
    return F.ctc_loss(lp, batch.ctc_targets[has], mem_lens[has], batch.ctc_lens[has], blank=0, zero_infinity=True)


def joint_loss(att: torch.Tensor, ctc_logits: torch.Tensor, mem_lens: torch.Tensor, batch: Batch,
               ctc_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The base's loss, (1 - w) * attention + w * CTC, and its parts: base training and the gate stage both use it."""
    if ctc_weight == 0:
        return att, {"att": att}
    ctc = ctc_loss(ctc_logits, mem_lens, batch)
    return (1 - ctc_weight) * att + ctc_weight * ctc, {"att": att, "ctc": ctc}


class BaseObjective(nn.Module):
    """Joint CTC-attention loss of the dense model; with module drop, of a random sub-network per training batch."""

    def __init__(self, model: SpeechModel, smoothing: float, ctc_weight: float, module_drop: float = 0.0, seed: int = 0):
        super().__init__()
        self.model, self.smoothing, self.ctc_weight = model, smoothing, ctc_weight
        self.module_drop, self.seed = module_drop, seed

    def keep(self, step: int | None) -> list[bool] | None:
        """Modules run at this step: all at validation, a seeded random subset while training with module drop."""
        if step is None or self.module_drop == 0.0:
            return None
        u = torch.rand(self.model.n_modules, generator=derived_generator(self.seed, MODULE_DROP_SALT, step))
        return (u >= self.module_drop).tolist()

    def forward(self, batch: Batch, step: int | None) -> tuple[torch.Tensor, dict[str, float]]:
        logits, ctc_logits, mem_lens = self.model(batch.feats, batch.feat_lens, batch.dec_in, keep=self.keep(step))
        att, acc = seq_loss(logits, batch, self.smoothing)
        loss, parts = joint_loss(att, ctc_logits, mem_lens, batch, self.ctc_weight)
        return loss, {k: float(v.detach()) for k, v in {"loss": loss, **parts, "acc": acc}.items()}


class GateObjective(nn.Module):
    """Task loss through hard-gated modules (Gumbel straight-through) + sparsity loss."""

    def __init__(self, model: SpeechModel, predictor: GatePredictor | None, spec: SparsitySpec, session: Session,
                 labels: LabelVocab, anneal_steps: int, seed: int, vocab: ContextVocab, calibrated: bool = False,
                 frozen_from: int | None = None, teacher: SpeechModel | None = None, adapt_until: int = 0):
        super().__init__()
        self.model, self.predictor, self.spec = model, predictor, spec
        self.s, self.labels, self.total, self.seed, self.vocab = session, labels, anneal_steps, seed, vocab
        self.teacher = teacher  # the dense base, frozen: gates.distill > 0
        # calibrated: the exported mask is cut at exactly the target (static baseline), not the argmax.
        self.calibrated, self.frozen_from = calibrated, frozen_from
        self.adapt_until = adapt_until  # phased with gates.adapt_share: the base adapts densely before this step

    def adapting(self, step: int | None) -> bool:
        """Every module runs and nothing is steered: the base's dense adaptation before the predictor learns."""
        return step is not None and step < self.adapt_until

    def tau(self, step: int | None) -> float | None:
        """The Gumbel temperature while the predictor learns; None in evaluation and once it is frozen."""
        if step is None or (self.frozen_from is not None and step >= self.frozen_from):
            return None
        g = self.s.recipe.gates
        return tau_at(step - self.adapt_until, self.total, g.tau_start, g.tau_end)

    def gates(self, batch: Batch, step: int | None) -> torch.Tensor:
        """(B, M) keep gates: Gumbel straight-through while the predictor learns, the exported masks otherwise;
        every module kept without a predictor (the `dense_tuned` reference) and while the base adapts densely."""
        if self.predictor is None or self.adapting(step):
            return torch.ones(len(batch.task), self.model.n_modules, device=batch.feats.device)
        ctx = ContextInputs.build(batch.task, batch.source_lang, batch.target_lang, batch.speaker, batch.condition,
                                  batch.feats, batch.feat_lens, self.labels, self.vocab)
        logits = self.predictor(ctx)
        g = self.s.recipe.gates
        # Evaluation, and training once the predictor is frozen (phased fine-tuning), use the masks prune exports,
        # so the base adapts to exactly the masks it will be deployed with.
        tau = self.tau(step)
        if tau is None:
            return self.spec.deployed_gates(logits, exact=self.calibrated)
        keep = gumbel_straight_through(logits, tau, derived_generator(self.seed, GUMBEL_SALT, step),
                                       noise_scale=tau / g.tau_start)
        return self.spec.force_ungated(keep)

    def forward(self, batch: Batch, step: int | None) -> tuple[torch.Tensor, dict[str, float]]:
        g = self.s.recipe.gates
        keep = self.gates(batch, step)
        logits, ctc_logits, mem_lens = self.model(batch.feats, batch.feat_lens, batch.dec_in, scale=keep)
        att, acc = seq_loss(logits, batch, self.s.recipe.base.label_smoothing)
        # The base's own joint loss: ASR decoding rescores with the CTC head, which must keep up with a pruned
        # (and, when fine-tuned, changing) encoder.
        task, parts = joint_loss(att, ctc_logits, mem_lens, batch, self.s.recipe.base.ctc_weight)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits, _, _ = self.teacher(batch.feats, batch.feat_lens, batch.dec_in)
            parts["distill"] = distill_loss(logits, teacher_logits, batch)
            task = task + g.distill * parts["distill"]
        warm = 1.0 if step is None else min(1.0, (step - self.adapt_until + 1) / max(1, g.target_warmup_steps))
        if self.predictor is None or self.adapting(step):  # nothing is skipped, so there is no sparsity to steer
            logs = {k: float(v.detach()) for k, v in {"loss": task, "task": task, **parts, "acc": acc}.items()}
            return task, logs
        groups = None
        # The static baseline has one mask for every context, so it always takes the batch-mean loss: its numbers do
        # not move with sparsity_per, and the context-aware variants are compared with one fixed baseline.
        if g.sparsity_per == "context" and self.predictor.inputs:
            ids: dict[tuple[str, str, str], int] = {}
            keys = zip(batch.task, batch.source_lang, batch.target_lang)
            groups = torch.tensor([ids.setdefault(k, len(ids)) for k in keys], device=keep.device)
        sp_loss, sp_logs = self.spec.loss(keep, g.alpha, warm, groups)
        loss = task + sp_loss
        logs = {k: float(v.detach()) for k, v in
                {"loss": loss, "task": task, **parts, "sparsity_loss": sp_loss, "acc": acc}.items()}
        if (tau := self.tau(step)) is not None:
            logs["tau"] = tau
        return loss, {**logs, **sp_logs}


# ---------------------------------------------------------------- the loop


@dataclass
class LoopSpec:
    name: str  # checkpoint folder and log name
    objective: nn.Module
    params: list[dict]  # optimizer param groups
    steps: int
    warmup: int
    val_every: int
    save_every: int
    log_every: int
    keep_best: int
    clip: float
    grad_accum: int
    state_modules: dict[str, nn.Module]  # what a checkpoint holds
    train_mode: Callable[[], None]
    eval_mode: Callable[[], None]
    seed: int  # data order and SpecAugment
    weight_decay: float = 0.0
    skips_modules: bool = False  # some parameters get no gradient in a step
    before_step: Callable[[int], None] | None = None  # e.g. calibration at the freeze point of phased training
    history: list[dict] = field(default_factory=list)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _batch_plan(split: Split, s: Session, epoch: int, seed: int) -> list[list[int]]:
    lengths = [f.shape[0] for f in split.feats]
    return shard(make_batches(lengths, s.recipe.data.max_frames_per_batch, seed, epoch), s.dist.rank, s.dist.world)


def _prepare(split: Split, idx: list[int], s: Session, augment: tuple[int, int] | None) -> Batch:
    """Collate on the device; `augment` = (seed, step) of a training batch's SpecAugment, None for evaluation."""
    b = collate(split, idx, s.tokenizer, s.inputs, s.max_tokens)
    if augment is not None and s.recipe.features.specaugment is not None:
        seed, step = augment
        b.feats = spec_augment(b.feats, b.feat_lens, s.recipe.features.specaugment,
                               derived_generator(seed, SPECAUG_SALT, step))
    return b.to(s.device)


@torch.no_grad()
def validate(spec: LoopSpec, dev: Split, s: Session) -> dict[str, float]:
    spec.eval_mode()
    tot: dict[str, float] = {}
    n = 0
    for idx in make_batches([f.shape[0] for f in dev.feats], s.recipe.data.max_frames_per_batch, 0, 0, shuffle=False):
        with _autocast(s):
            _, logs = spec.objective(_prepare(dev, idx, s, None), None)
        for k, v in logs.items():
            tot[k] = tot.get(k, 0.0) + v * len(idx)
        n += len(idx)
    spec.train_mode()
    return {f"val_{k}": v / n for k, v in tot.items()}


def _autocast(s: Session):  # noqa: ANN202
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=s.device.type == "cuda")


def run_loop(spec: LoopSpec, train: Split, dev: Split, s: Session) -> dict[str, float]:
    ckdir = s.run.checkpoints / spec.name
    opt = torch.optim.AdamW(spec.params, weight_decay=spec.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    step, epoch, pos = 0, 0, 0
    best: list[tuple[float, str]] = []  # (val loss, checkpoint file)
    last = ckdir / "last.pt"
    if last.is_file():
        blob = torch.load(last, map_location="cpu", weights_only=True)
        for k, m in spec.state_modules.items():
            m.load_state_dict(blob["modules"][k])
        opt.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["rng"])
        step, epoch, pos, best = blob["step"], blob["epoch"], blob["pos"], [tuple(b) for b in blob["best"]]
        log(f"{spec.name}: resumed from {last} at step {step}/{spec.steps}")
        append_jsonl(s.run.path / "logs" / f"{spec.name}.jsonl", {"event": "resume", "step": step})

    def save(path: Path) -> None:
        if any(not bool(torch.isfinite(t).all()) for m in spec.state_modules.values() for t in m.parameters()):
            raise TrainingError(f"{spec.name}: non-finite weights at step {step}; nothing saved. Lower the learning rate")
        if s.dist.is_main:
            atomic_torch_save(path, {
                "modules": {k: m.state_dict() for k, m in spec.state_modules.items()}, "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(), "step": step, "epoch": epoch, "pos": pos, "best": best,
            })

    # Module drop leaves some parameters without gradients in a step; DDP must be told to expect that.
    objective = DDP(spec.objective, find_unused_parameters=spec.skips_modules) if s.dist.world > 1 else spec.objective
    tb = _tensorboard(s.run.path / "tensorboard" / spec.name) if s.dist.is_main else None
    spec.train_mode()
    plan = _batch_plan(train, s, epoch, spec.seed)
    t0 = time.monotonic()
    metrics: dict[str, float] = {}
    with progress(f"train {spec.name}", total=spec.steps) as bar:
        bar.advance(step)
        while step < spec.steps:
            for g, lr in zip(opt.param_groups, base_lrs):  # a group learns only within its [start, stop) windows
                active = any(a <= step < b for a, b in g.get("windows", [(0, spec.steps)]))
                g["lr"] = lr * lr_factor(step, spec.warmup, spec.steps) if active else 0.0
            if spec.before_step is not None:
                spec.before_step(step)
            logs: dict[str, float] = {}
            for _ in range(spec.grad_accum):
                if pos >= len(plan):
                    epoch, pos = epoch + 1, 0
                    plan = _batch_plan(train, s, epoch, spec.seed)
                batch = _prepare(train, plan[pos], s, (spec.seed, step))
                pos += 1
                with _autocast(s):
                    loss, logs = objective(batch, step)
                if not math.isfinite(logs["loss"]):  # a diverged run must never be saved or marked complete
                    raise TrainingError(f"{spec.name}: non-finite loss at step {step + 1} ({logs['loss']}); "
                                        "lower the learning rate, then rerun (it resumes from the last good checkpoint)")
                (loss / spec.grad_accum).backward()
            gnorm = torch.nn.utils.clip_grad_norm_([p for g in spec.params for p in g["params"]], spec.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            logs.update({f"lr_{g['name']}": g["lr"] for g in opt.param_groups if "name" in g})
            logs.update(step=step, epoch=epoch, lr=opt.param_groups[0]["lr"], grad_norm=float(gnorm),
                        elapsed_s=round(time.monotonic() - t0, 2))
            if s.dist.is_main and (step % spec.log_every == 0 or step == spec.steps):
                append_jsonl(s.run.path / "logs" / f"{spec.name}.jsonl", logs)
                if tb is not None:
                    for k, v in logs.items():
                        tb.add_scalar(f"{spec.name}/{k}", v, step)
            bar.advance(1, postfix=f"loss {logs['loss']:.3f} acc {logs['acc']:.3f}")
            if step % spec.val_every == 0 or step == spec.steps:
                metrics = validate(spec, dev, s)
                if not math.isfinite(metrics["val_loss"]):
                    raise TrainingError(f"{spec.name}: non-finite validation loss at step {step}; lower the learning rate")
                metrics["step"] = step
                if s.dist.is_main:
                    append_jsonl(s.run.path / "logs" / f"{spec.name}.jsonl", {"event": "val", **metrics})
                log(f"{spec.name} step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "step"))
                if spec.keep_best > 0:
                    path = ckdir / f"step{step:07d}.pt"
                    best.append((metrics["val_loss"], path.name))
                    best.sort()
                    for _, stale in best[spec.keep_best :]:
                        (ckdir / stale).unlink(missing_ok=True)
                    best = best[: spec.keep_best]
                    if any(name == path.name for _, name in best):
                        save(path)
            if step % spec.save_every == 0 or step == spec.steps:
                save(last)
    if tb is not None:
        tb.close()  # flush the event file
    spec.eval_mode()
    return metrics


def _tensorboard(path: Path):  # noqa: ANN202
    """A SummaryWriter when the tensorboard package is installed; None otherwise (JSONL logs always exist)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def average_checkpoints(paths: list[Path], key: str) -> dict[str, torch.Tensor]:
    states = [torch.load(p, map_location="cpu", weights_only=True)["modules"][key] for p in paths]
    avg = {}
    for k, v in states[0].items():
        avg[k] = sum(st[k].float() for st in states) / len(states) if v.is_floating_point() else v
        avg[k] = avg[k].to(v.dtype)
    return avg


# ---------------------------------------------------------------- stages


def prepare_data(s: Session) -> tuple[Split, Split]:
    train, dev = s.split("train"), s.split("dev")
    s.build_tokenizer(train)
    s.build_cmvn(train)
    return train, dev


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


def train_base(s: Session) -> dict[str, Any]:
    r = s.recipe
    if s.is_whisper:
        return import_pretrained_base(s)
    s.dist = init_distributed(s.device)
    seed_everything(r.seed)
    train, dev = prepare_data(s)
    model = SpeechModel(dims_from_recipe(r.model, r.features.n_mels, s.tokenizer.vocab_size)).to(s.device)
    log(f"base model: {count_params(model) / 1e6:.2f}M parameters, {model.n_modules} prunable modules, "
        f"{len(train)} train / {len(dev)} dev utterances")
    b = r.base
    spec = LoopSpec(
        name="base", objective=BaseObjective(model, b.label_smoothing, b.ctc_weight, b.module_drop, r.seed),
        params=[{"params": list(model.parameters()), "lr": b.lr}], steps=b.steps, warmup=b.warmup_steps,
        val_every=b.val_every, save_every=b.save_every, log_every=b.log_every, keep_best=b.keep_best, clip=b.clip,
        grad_accum=b.grad_accum, state_modules={"model": model}, train_mode=model.train, eval_mode=model.eval,
        seed=r.seed, weight_decay=b.weight_decay, skips_modules=b.module_drop > 0,
    )
    metrics = run_loop(spec, train, dev, s)
    if s.dist.world > 1:
        torch.distributed.barrier()  # rank 0 has written the best checkpoints that every rank averages
    ckdir = s.run.checkpoints / "base"
    kept = sorted(ckdir.glob("step*.pt"))
    if kept:
        model.load_state_dict(average_checkpoints(kept, "model"))
        log(f"base: averaged {len(kept)} best checkpoint(s): {', '.join(p.name for p in kept)}")
    final = validate(spec, dev, s)
    if not math.isfinite(final["val_loss"]):
        raise TrainingError("base: non-finite validation loss of the final model; nothing saved")
    if s.dist.is_main:
        save_model(s.run.base_ckpt, model.cpu(), averaged=[p.name for p in kept])
        s.run.update_metrics("base", {**metrics, **{f"final_{k}": v for k, v in final.items()},
                                      "params": count_params(model)})
    return final


@torch.no_grad()
def calibrate_thresholds(s: Session, predictor: GatePredictor, spec: SparsitySpec, train: Split, labels: LabelVocab,
                         step: int, n: int = 512) -> None:
    """Shift the predictor's skip thresholds (see calibration_shift) on a fixed, evenly spaced set of train utterances."""
    idx = list(range(0, len(train), max(1, len(train) // n)))[:n]
    b = _prepare(train, idx, s, None)
    was_training = predictor.training
    predictor.eval()
    ctx = ContextInputs.build(b.task, b.source_lang, b.target_lang, b.speaker, b.condition, b.feats, b.feat_lens, labels,
                              s.tokenizer.vocab)
    logits = predictor(ctx)
    before = {k: round(float(v.mean()), 4) for k, v in spec.sparsity(spec.force_ungated(deterministic_gates(logits))).items()}
    predictor.shift_skip_logits(calibration_shift(logits, spec))
    after = {k: round(float(v.mean()), 4) for k, v in
             spec.sparsity(spec.force_ungated(deterministic_gates(predictor(ctx)))).items()}
    predictor.train(was_training)
    log(f"gates: calibrated skip thresholds at step {step} on {len(idx)} train utterances: sparsity {before} -> {after}")
    if s.dist.is_main:
        append_jsonl(s.run.path / "logs" / "gates.jsonl", {"event": "calibrate", "step": step, "before": before, "after": after})


def _load_base(s: Session) -> SpeechModel:
    model, _ = load_model(s.run.base_ckpt, "prune-cli train RECIPE --stage base")
    return s.configure(model).to(s.device).eval()


def train_gates(s: Session) -> dict[str, dict[str, float]]:
    r, g = s.recipe, s.recipe.gates
    s.dist = init_distributed(s.device)
    seed = r.seed if g.seed is None else g.seed
    seed_everything(seed + 1)
    train, dev = prepare_data(s)
    model = _load_base(s)
    teacher = _load_base(s).requires_grad_(False) if g.distill > 0 else None
    labels = LabelVocab.of(train.utts)
    mean_frames = int(sum(f.shape[0] for f in train.feats) / len(train))
    mean_tokens = int(sum(len(s.tokenizer.encode(u.text)) for u in train.utts[:2000]) / min(2000, len(train))) + 5
    flops = module_flops(model, mean_frames, mean_tokens) if g.weighting == "flops" else None
    sparsity = SparsitySpec.build(model.modules_list, g.scope, {"encoder": g.target.encoder, "decoder": g.target.decoder},
                                  flops, g.min_cross_attention, g.always_run)
    unmatched = [p for p in g.always_run if not any(fnmatchcase(m.name, p) for m in model.modules_list)]
    if unmatched:
        raise UsageError([f"gates.always_run: {p!r} matches no prunable module (e.g. {model.modules_list[0].name})"
                          for p in unmatched])
    results: dict[str, dict[str, float]] = {}
    for n, v in enumerate(x for x in TRAINED if r.enabled(x.name)):
        name = str(v.loop)
        seed_everything(seed + v.seed_key)
        # With fine-tuning, each learned variant adapts its own copy of the base, on the same schedule and budget:
        # the static baseline gets what the context-aware gates get.
        joint = g.finetune_base
        if joint and n > 0:
            model = _load_base(s)
        for p in model.parameters():
            p.requires_grad_(joint)
        # No predictor for an unpruned variant: every module kept, the base fine-tuned as the others are.
        inputs = None if v.kind == "unpruned" else (list(g.inputs) if v.context_inputs else [])
        predictor = None if inputs is None else build_predictor(r, model.n_modules, inputs, labels, s.tokenizer.vocab).to(s.device)
        base_group = {"params": list(model.parameters()), "lr": g.base_lr, "name": "base"}
        params: list[dict[str, Any]] = []
        if predictor is not None:
            log(f"{name}: predictor inputs {inputs or '(none: static)'}, {count_params(predictor)} parameters "
                f"(base model {count_params(model)}), scope {g.scope}, targets {sparsity.targets}")
            params.append({"params": list(predictor.parameters()), "lr": g.lr if inputs else g.static_lr})
        else:
            log(f"{name}: every module kept; the base fine-tuned on the gate stage's schedule (the fair dense reference)")
        if joint:
            params.append(base_group)
            if g.phased:
                base_group["windows"] = g.base_windows
                if predictor is not None:
                    params[0]["windows"] = [(g.adapt_step, g.freeze_step)]
        freeze = g.freeze_step if g.phased else None
        obj = GateObjective(model, predictor, sparsity, s, labels, g.anneal_steps, seed, s.tokenizer.vocab,
                            calibrated=exact_cut(r, v.context_inputs), frozen_from=freeze, teacher=teacher,
                            adapt_until=g.adapt_step)

        def train_mode(predictor: GatePredictor | None = predictor, joint: bool = joint) -> None:
            if predictor is not None:
                predictor.train()
            model.train(joint)

        def eval_mode(predictor: GatePredictor | None = predictor) -> None:
            if predictor is not None:
                predictor.eval()
            model.eval()

        # The context-aware predictor's thresholds are calibrated when it stops learning: at the freeze point of
        # phased training (so the base adapts to the calibrated masks), or at the end when the base stays frozen.
        calibrate_at: int | None = None
        if g.calibrate and v.context_inputs and not exact_cut(r, True):
            calibrate_at = freeze if joint else g.steps  # joint without phases never freezes: freeze is None

        def before_step(step: int, predictor: GatePredictor | None = predictor, at: int | None = calibrate_at) -> None:
            if step == at and predictor is not None:
                calibrate_thresholds(s, predictor, sparsity, train, labels, step)

        state = ({"predictor": predictor} if predictor is not None else {}) | ({"model": model} if joint else {})
        spec = LoopSpec(
            name=name, objective=obj, params=params, steps=g.steps, warmup=min(50, g.steps // 10 + 1),
            val_every=g.val_every, save_every=g.save_every, log_every=g.log_every, keep_best=0, clip=r.base.clip,
            grad_accum=r.base.grad_accum, state_modules=state, train_mode=train_mode, eval_mode=eval_mode,
            before_step=before_step, seed=seed,
        )
        metrics = run_loop(spec, train, dev, s)
        if calibrate_at == g.steps and predictor is not None:  # frozen base: after the last step (idempotent on resume)
            calibrate_thresholds(s, predictor, sparsity, train, labels, g.steps)
        if s.dist.is_main:
            if predictor is not None:
                atomic_torch_save(s.run.predictor_ckpt(v.name), {
                    "kind": "prune-cli/gates", "inputs": inputs, **labels.to_blob(), "n_modules": model.n_modules,
                    "state_dict": predictor.state_dict(), "scope": g.scope, "targets": sparsity.targets,
                    "module_flops": flops, "params": count_params(predictor),
                    "min_cross_attention": g.min_cross_attention, "always_run": list(g.always_run),
                })
            if joint:
                save_model(s.run.finetuned_ckpt_for(v.name), model.cpu())
                model.to(s.device)
        results[name] = metrics
    if s.dist.is_main:
        s.run.update_metrics("gates", results)
    return results

