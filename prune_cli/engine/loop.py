"""The one training loop every stage runs (base, the shared adaptation, each variant's gates), read in one sitting.

Resume: rerunning continues from checkpoints/<name>/last.pt. The data order is a function of (seed, epoch),
SpecAugment and Gumbel noise of (seed, step), and the global RNG (dropout) is saved, so a resumed CPU run
reaches the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from prune_cli.atomic import append_jsonl, atomic_torch_save, load_plain
from prune_cli.data.batching import Batch, Split, collate, make_batches, shard
from prune_cli.data.features import spec_augment
from prune_cli.engine.objectives import SPECAUG_SALT
from prune_cli.engine.session import Session
from prune_cli.errors import TrainingError
from prune_cli.progress import log, progress
from prune_cli.runs import derived_generator


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
    stop: int | None = None  # end the loop here (its schedule still runs to `steps`): the shared adaptation
    start_from: Path | None = None  # a stopped loop's last.pt: its model, its base optimizer state and data position
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


def prepare_batch(split: Split, idx: list[int], s: Session, augment: tuple[int, int] | None) -> Batch:
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
            _, logs = spec.objective(prepare_batch(dev, idx, s, None), None)
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
    elif spec.start_from is not None:
        step, epoch, pos = _continue_from(spec.start_from, spec, opt)
        log(f"{spec.name}: continues the shared adaptation ({spec.start_from.parent.name}) at step {step}/{spec.steps}")
    end = spec.steps if spec.stop is None else spec.stop

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
    with progress(f"train {spec.name}", total=end) as bar:
        bar.advance(step)
        while step < end:
            active = [any(a <= step < b for a, b in g.get("windows", [(0, spec.steps)])) for g in opt.param_groups]
            for g, lr, on in zip(opt.param_groups, base_lrs, active):  # a group learns only within its windows
                g["lr"] = lr * lr_factor(step, spec.warmup, spec.steps) if on else 0.0
            if spec.before_step is not None:
                spec.before_step(step)
            idle = not any(active)  # nothing learns (dense_tuned while the others' predictors do): the data moves on
            logs: dict[str, float] = {}
            for _ in range(spec.grad_accum):
                if pos >= len(plan):
                    epoch, pos = epoch + 1, 0
                    plan = _batch_plan(train, s, epoch, spec.seed)
                pos += 1
                if idle:
                    continue
                batch = prepare_batch(train, plan[pos - 1], s, (spec.seed, step))
                with _autocast(s):
                    loss, logs = objective(batch, step)
                if not math.isfinite(logs["loss"]):  # a diverged run must never be saved or marked complete
                    raise TrainingError(f"{spec.name}: non-finite loss at step {step + 1} ({logs['loss']}); "
                                        "lower the learning rate, then rerun (it resumes from the last good checkpoint)")
                (loss / spec.grad_accum).backward()
            if idle:
                step += 1
                bar.advance(1, postfix="idle: no parameter learns at this step")
                if step % spec.save_every == 0 or step == end:
                    save(last)
                continue
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
            if step % spec.save_every == 0 or step == end:
                save(last)
    if tb is not None:
        tb.close()  # flush the event file
    spec.eval_mode()
    return metrics


def _continue_from(path: Path, spec: LoopSpec, opt: torch.optim.Optimizer) -> tuple[int, int, int]:
    """Start where a stopped dense loop ended: its weights, its Adam moments for the base's parameters (the
    optimizer's group named "base"), its step and data position. The variant's own RNG stream is kept."""
    blob = load_plain(path, "shared adaptation checkpoint")
    spec.state_modules["model"].load_state_dict(blob["modules"]["model"])
    base = [p for g in opt.param_groups if g.get("name") == "base" for p in g["params"]]
    saved = blob["optimizer"]["state"]
    for i, p in enumerate(base):
        if i in saved:
            opt.state[p] = {k: v.to(p.device) if torch.is_tensor(v) and v.shape == p.shape else v
                            for k, v in saved[i].items()}
    return blob["step"], blob["epoch"], blob["pos"]


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
