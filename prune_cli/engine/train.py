"""The training stages: the base (trained, or a pretrained Whisper imported) and the gate stage's loops."""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch

from prune_cli.atomic import append_jsonl
from prune_cli.data.batching import Split
from prune_cli.engine.loop import LoopSpec, average_checkpoints, prepare_batch, run_loop, validate
from prune_cli.engine.masking import exact_cut
from prune_cli.engine.objectives import BaseObjective, GateObjective
from prune_cli.engine.session import Session, build_predictor, init_distributed
from prune_cli.errors import TrainingError, UsageError
from prune_cli.gating.checkpoint import GateCheckpoint
from prune_cli.gating.predictor import ContextInputs, GatePredictor, LabelVocab, deterministic_gates
from prune_cli.gating.sparsity import SparsitySpec, calibration_shift
from prune_cli.model.checkpoint import load_model, save_model
from prune_cli.model.flops import module_flops
from prune_cli.model.gated import GatedModel
from prune_cli.model.s2t import SpeechModel, count_params, dims_from_recipe
from prune_cli.progress import log
from prune_cli.runs import seed_everything
from prune_cli.variants import TRAINED

ADAPT_LOOP = "adapt"  # the gate stage's shared dense adaptation: logs/adapt.jsonl, checkpoints/adapt/


def prepare_data(s: Session) -> tuple[Split, Split]:
    train, dev = s.split("train"), s.split("dev")
    s.build_tokenizer(train)
    s.build_cmvn(train)
    return train, dev


def train_base(s: Session) -> dict[str, Any]:
    r = s.recipe
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
    b = prepare_batch(train, idx, s, None)
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


def _load_base(s: Session) -> GatedModel:
    model, _ = load_model(s.run.base_ckpt, "prune-cli train RECIPE --stage base")
    return s.configure(model).to(s.device).eval()


def shared_adaptation(s: Session, train: Split, dev: Split, sparsity: SparsitySpec, labels: LabelVocab,
                      seed: int, teacher: GatedModel | None) -> Path:
    """The phased schedule's dense first steps, run once for every variant (checkpoints/adapt/last.pt).

    Until gates.adapt_share every variant runs the same loop: every module kept, the same data order, the base's
    learning-rate windows, no predictor step. So each variant continues from this one state (weights, the base's Adam
    moments, the data position) and reaches the weights it reached when it ran these steps itself."""
    r, g = s.recipe, s.recipe.gates
    model = _load_base(s).requires_grad_(True)
    obj = GateObjective(model, None, sparsity, s, labels, g.anneal_steps, seed, s.tokenizer.vocab,
                        teacher=teacher, adapt_until=g.adapt_step)
    spec = LoopSpec(
        name=ADAPT_LOOP, objective=obj,
        params=[{"params": list(model.parameters()), "lr": g.base_lr, "name": "base", "windows": g.base_windows}],
        steps=g.steps, stop=g.adapt_step, warmup=gate_warmup(g.steps), val_every=g.val_every,
        save_every=g.save_every, log_every=g.log_every, keep_best=0, clip=r.base.clip, grad_accum=r.base.grad_accum,
        state_modules={"model": model}, train_mode=model.train, eval_mode=model.eval, seed=seed,
    )
    log(f"{ADAPT_LOOP}: steps 0-{g.adapt_step - 1}, every module kept; shared by every variant of the gate stage")
    run_loop(spec, train, dev, s)
    if s.dist.world > 1:
        torch.distributed.barrier()  # rank 0 has written last.pt
    return s.run.checkpoints / ADAPT_LOOP / "last.pt"


def gate_warmup(steps: int) -> int:
    return min(50, steps // 10 + 1)


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
    shared = shared_adaptation(s, train, dev, sparsity, labels, seed, teacher) if g.phased and g.adapt_step > 0 else None
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
            name=name, objective=obj, params=params, steps=g.steps, warmup=gate_warmup(g.steps),
            val_every=g.val_every, save_every=g.save_every, log_every=g.log_every, keep_best=0, clip=r.base.clip,
            grad_accum=r.base.grad_accum, state_modules=state, train_mode=train_mode, eval_mode=eval_mode,
            before_step=before_step, seed=seed, start_from=shared,
        )
        metrics = run_loop(spec, train, dev, s)
        if calibrate_at == g.steps and predictor is not None:  # frozen base: after the last step (idempotent on resume)
            calibrate_thresholds(s, predictor, sparsity, train, labels, g.steps)
        if s.dist.is_main:
            if predictor is not None:
                GateCheckpoint(list(inputs or []), labels, model.n_modules, predictor.state_dict(), g.scope,
                               sparsity.targets, flops, count_params(predictor), g.min_cross_attention,
                               list(g.always_run)).save(s.run.predictor_ckpt(v.name))
            if joint:
                save_model(s.run.finetuned_ckpt_for(v.name), model.cpu())
                model.to(s.device)
        results[name] = metrics
    if s.dist.is_main:
        s.run.update_metrics("gates", results)
    return results

