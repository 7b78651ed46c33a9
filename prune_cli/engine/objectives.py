"""The training objectives: the base's loss, and the gate stage's task loss through hard-gated modules plus the
sparsity loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prune_cli.contexts import ContextVocab
from prune_cli.data.batching import IGNORE, Batch
from prune_cli.engine.session import Session
from prune_cli.gating.predictor import ContextInputs, GatePredictor, LabelVocab, gumbel_straight_through, tau_at
from prune_cli.gating.sparsity import SparsitySpec
from prune_cli.model.gated import GatedModel
from prune_cli.model.s2t import SpeechModel
from prune_cli.runs import derived_generator

SPECAUG_SALT, GUMBEL_SALT, MODULE_DROP_SALT = 1, 2, 3


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

    def __init__(self, model: GatedModel, predictor: GatePredictor | None, spec: SparsitySpec, session: Session,
                 labels: LabelVocab, anneal_steps: int, seed: int, vocab: ContextVocab, calibrated: bool = False,
                 frozen_from: int | None = None, teacher: GatedModel | None = None, adapt_until: int = 0):
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
