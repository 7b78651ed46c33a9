"""Gate predictor, Gumbel straight-through, sparsity loss, baselines and mask files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from prune_cli.contexts import ContextVocab
from prune_cli.errors import CheckpointError
from prune_cli.gating.masks import MaskFile, layerdrop_mask, random_mask
from prune_cli.gating.predictor import ContextInputs, GatePredictor, LabelVocab, deterministic_gates, gumbel_straight_through, tau_at
from prune_cli.gating.sparsity import SparsitySpec
from prune_cli.model.s2t import ModelDims, SpeechModel

DIMS = ModelDims(80, 40, 32, 4, 3, 4, 64, 64, 5, 3, 8, 0.0, 32)
VOCAB = ContextVocab(("asr", "st"), ("en", "de", "fr", "es", "it"))
LABELS = LabelVocab(("s1", "s2"), ("clean", "snr10"))


def ctx_batch(b: int = 4) -> ContextInputs:
    feats = torch.randn(b, 50, 80)
    lens = torch.full((b,), 50)
    return ContextInputs.build(["asr", "st", "asr", "st"][:b], ["de", "de", "fr", "en"][:b], ["de", "en", "fr", "fr"][:b],
                               ["s1", "s2", "s1", "s3"][:b], ["clean", "snr10", "snr10", "snr0"][:b], feats, lens,
                               LABELS, VOCAB)


def test_straight_through_gradients_reach_the_predictor() -> None:
    model = SpeechModel(DIMS)
    pred = GatePredictor(model.n_modules, ["task", "source_lang", "target_lang"], 8, 16, 80, LABELS, 2.0, 2, 5)
    logits = pred(ctx_batch())
    keep = gumbel_straight_through(logits, 1.0, torch.Generator().manual_seed(0))
    assert set(keep.detach().unique().tolist()) <= {0.0, 1.0}  # hard in the forward pass
    spec = SparsitySpec.build(model.modules_list, "both", {"encoder": 0.3, "decoder": 0.6}, None)
    x = torch.randn(4, 60, 80)
    out, _, _ = model(x, torch.full((4,), 60), torch.randint(11, 40, (4, 5)), scale=keep)
    loss = out.pow(2).mean() + spec.loss(keep, 1.0, 1.0)[0]
    loss.backward()
    grads = [p.grad for p in pred.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_eval_gates_are_deterministic_and_context_dependent() -> None:
    torch.manual_seed(0)
    pred = GatePredictor(30, ["task", "source_lang", "target_lang"], 8, 16, 80, LABELS, 0.0, 2, 5).eval()
    c = ctx_batch()
    a, b = deterministic_gates(pred(c)), deterministic_gates(pred(c))
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # different contexts, different (random-init) gates


def test_gumbel_noise_comes_from_the_seed() -> None:
    logits = torch.zeros(3, 10, 2)
    a = gumbel_straight_through(logits, 0.5, torch.Generator().manual_seed(42))
    b = gumbel_straight_through(logits, 0.5, torch.Generator().manual_seed(42))
    c = gumbel_straight_through(logits, 0.5, torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert tau_at(0, 100, 1.0, 0.1) == 1.0 and abs(tau_at(99, 100, 1.0, 0.1) - 0.1) < 1e-9


def test_sparsity_loss_formula_and_scopes() -> None:
    model = SpeechModel(DIMS)
    spec = SparsitySpec.build(model.modules_list, "decoder", {"encoder": 0.0, "decoder": 0.5}, None)
    keep = torch.ones(2, model.n_modules)
    dec = [i for i, m in enumerate(model.modules_list) if m.part == "decoder"]
    keep[:, dec[:3]] = 0.0  # 3 of 12 decoder modules skipped: s = 0.25
    loss, logs = spec.loss(keep, alpha=2.0, warm=1.0)
    assert logs["sparsity_decoder"] == pytest.approx(0.25)
    assert float(loss) == pytest.approx(2.0 * (0.25 + 0.25**2))
    forced = spec.force_ungated(torch.zeros(1, model.n_modules))
    assert forced[0, : 3 * 4].eq(1).all() and forced[0, dec].eq(0).all()  # encoder is out of scope: always runs
    flops = {m.name: (10 if m.kind == "ffn" else 1) for m in model.modules_list}
    w = SparsitySpec.build(model.modules_list, "decoder", {"encoder": 0.0, "decoder": 0.5}, flops)
    k = torch.ones(1, model.n_modules)
    k[0, [i for i, m in enumerate(model.modules_list) if m.kind == "ffn"]] = 0
    assert float(w.sparsity(k)["decoder"]) == pytest.approx(40 / 48)


def test_per_context_sparsity_loss_holds_each_context_to_the_target() -> None:
    model = SpeechModel(DIMS)
    spec = SparsitySpec.build(model.modules_list, "decoder", {"encoder": 0.0, "decoder": 0.5}, None)
    dec = [i for i, m in enumerate(model.modules_list) if m.part == "decoder"]
    gated = torch.ones(4, model.n_modules)
    gated[:2, dec] = 0.0  # context 0 (rows 0, 1) skips its whole decoder, context 1 (rows 2, 3) none of it
    gated.requires_grad_(True)
    batch_loss, logs = spec.loss(gated, alpha=1.0, warm=1.0)
    assert logs["sparsity_decoder"] == pytest.approx(0.5) and float(batch_loss.detach()) == 0.0  # the batch mean is on target
    per_ctx, _ = spec.loss(gated, alpha=1.0, warm=1.0, groups=torch.tensor([7, 7, 3, 3]))
    assert float(per_ctx.detach()) == pytest.approx(0.5 + 0.25)  # each context is 0.5 off: |d| + d^2
    per_ctx.backward()
    assert gated.grad is not None
    assert (gated.grad[:2, dec] < 0).all()  # the over-pruned context is pushed to keep modules,
    assert (gated.grad[2:, dec] > 0).all()  # the unpruned one to skip them
    # Uneven group sizes: each context counts once, whatever its share of the batch.
    uneven, _ = spec.loss(gated.detach()[[0, 2, 3]], alpha=1.0, warm=1.0, groups=torch.tensor([0, 1, 1]))
    assert float(uneven) == pytest.approx(0.75)


def test_random_and_layerdrop_baselines_hit_the_target() -> None:
    mods = SpeechModel(DIMS).modules_list
    r = random_mask(mods, {"decoder": 0.5}, seed=1)
    dec = [k for k, m in zip(r, mods) if m.part == "decoder"]
    assert sum(1 - k for k in dec) == 6 and all(k for k, m in zip(r, mods) if m.part == "encoder")
    assert r == random_mask(mods, {"decoder": 0.5}, seed=1)
    ld = layerdrop_mask(mods, {"decoder": 0.5})
    dropped = {m.layer for k, m in zip(ld, mods) if m.part == "decoder" and not k}
    assert len(dropped) == 2
    for layer in dropped:  # whole layers
        assert all(not k for k, m in zip(ld, mods) if m.part == "decoder" and m.layer == layer)


def test_mask_file_roundtrip_and_wrong_model_rejected(tmp_path: Path) -> None:
    model = SpeechModel(DIMS)
    names = [m.name for m in model.modules_list]
    mf = MaskFile(names, model.arch_hash(), model.weights_hash(), {"context": {"asr:de": [1] * len(names)}})
    mf.save(tmp_path / "masks.json")
    loaded = MaskFile.load(tmp_path / "masks.json")
    loaded.check_model(names, model.arch_hash(), model.weights_hash(), tmp_path / "masks.json")
    assert loaded.keep("context", "asr:de") == (True,) * len(names)
    other = SpeechModel(ModelDims(80, 40, 32, 4, 2, 2, 64, 64, 5, 3, 8, 0.0, 32))
    with pytest.raises(CheckpointError, match="another architecture"):
        loaded.check_model([m.name for m in other.modules_list], other.arch_hash(), other.weights_hash(), tmp_path / "m")
    torch.manual_seed(9)
    retrained = SpeechModel(DIMS)
    with pytest.raises(CheckpointError, match="base weights"):
        loaded.check_model(names, retrained.arch_hash(), retrained.weights_hash(), tmp_path / "m")
    (tmp_path / "bad.json").write_text('{"modules": [1, 2')
    with pytest.raises(CheckpointError, match="not a readable mask file"):
        MaskFile.load(tmp_path / "bad.json")


def test_per_utterance_predictor_uses_features() -> None:
    torch.manual_seed(0)
    pred = GatePredictor(30, ["task", "pooled_features"], 8, 16, 80, LabelVocab(), 0.0, 2, 5).eval()
    assert pred.per_utterance
    c = ctx_batch()
    c2 = replace(c, pooled=c.pooled + 5.0)
    assert not torch.equal(pred(c), pred(c2))


def test_exact_sparsity_calibration_hits_target_in_training_units() -> None:
    from prune_cli.gating.sparsity import exact_sparsity_gates

    model = SpeechModel(DIMS)
    logits = torch.randn(5, model.n_modules, 2, generator=torch.Generator().manual_seed(3))
    spec = SparsitySpec.build(model.modules_list, "both", {"encoder": 0.25, "decoder": 0.5}, None)
    sp = spec.sparsity(exact_sparsity_gates(logits, spec))
    assert torch.allclose(sp["encoder"], torch.tensor(0.25)) and torch.allclose(sp["decoder"], torch.tensor(0.5))
    flops = {m.name: (40 if m.kind in ("ffn1", "ffn2", "ffn") else 10) for m in model.modules_list}
    wspec = SparsitySpec.build(model.modules_list, "decoder", {"encoder": 0.0, "decoder": 0.5}, flops)
    keep = exact_sparsity_gates(logits, wspec)
    half_max = 0.5 * float(wspec.weights.max()) / float(wspec.weights[wspec.scope_mask["decoder"]].sum())
    assert ((wspec.sparsity(keep)["decoder"] - 0.5).abs() <= half_max + 1e-6).all()
    assert keep[:, : 3 * 4].eq(1).all()  # the encoder is outside the scope
    # Where argmax already meets the target, calibration returns the argmax mask.
    agree = deterministic_gates(logits)
    dec_sparsity = float(spec.sparsity(spec.force_ungated(agree))["decoder"][0])
    agree_spec = SparsitySpec.build(model.modules_list, "decoder", {"encoder": 0.0, "decoder": dec_sparsity}, None)
    assert torch.equal(exact_sparsity_gates(logits[:1], agree_spec)[0, 12:], agree[0, 12:])


def test_cross_attention_floor_trades_a_module_and_keeps_the_sparsity() -> None:
    from prune_cli.gating.sparsity import keep_cross_attention

    model = SpeechModel(DIMS)  # 3 encoder layers x 4 modules, then 4 decoder layers x (self_attn, src_attn, ffn)
    names = [m.name for m in model.modules_list]
    cross = [names.index(f"decoder.{i}.src_attn") for i in range(4)]
    spec = SparsitySpec.build(model.modules_list, "both", {"encoder": 0.25, "decoder": 0.75}, None, 1)
    logits = torch.zeros(3, model.n_modules, 2)
    margin = torch.arange(model.n_modules, dtype=torch.float) / 10  # skip margin: later modules rank higher
    logits[..., 0] = margin
    keep = torch.ones(3, model.n_modules)
    keep[0, 12:] = 0
    keep[0, names.index("decoder.0.ffn")] = keep[0, names.index("decoder.1.self_attn")] = 1  # no cross-attention
    keep[1, 12:21] = 0  # keeps decoder.3.*, among them a cross-attention: left alone
    keep[2, 12:] = 0  # keeps no decoder module at all: the cross-attention comes back at no other's expense
    out = keep_cross_attention(keep, logits, spec)
    # row 0: the cross-attention with the smallest skip margin (layer 0) returns and the kept module of another kind
    # with the largest skip margin (decoder.1.self_attn) goes, so the decoder still skips 10 of 12
    want = keep[0].clone()
    want[cross[0]], want[names.index("decoder.1.self_attn")] = 1, 0
    assert torch.equal(out[0], want)
    assert torch.equal(spec.sparsity(out[:1])["decoder"], spec.sparsity(keep[:1])["decoder"])
    assert torch.equal(out[1], keep[1])
    assert out[2, cross].tolist() == [1, 0, 0, 0] and int(out[2, 12:].sum()) == 1
    # with the floor at 0 (the paper's masks, and mask files from before it) nothing changes
    spec.min_cross_attention = 0
    assert torch.equal(keep_cross_attention(keep, logits, spec), keep)
    # two required: row 0 gets layers 0 and 1 back and gives up its two other decoder modules
    spec.min_cross_attention = 2
    two = keep_cross_attention(keep, logits, spec)
    assert two[0, cross].tolist() == [1, 1, 0, 0] and int(two[0, 12:].sum()) == 2


def test_gates_switch_to_the_exported_masks_once_the_predictor_is_frozen(tmp_path: Path) -> None:
    from prune_cli.data.batching import Batch
    from prune_cli.engine.objectives import GUMBEL_SALT, GateObjective
    from prune_cli.engine.session import Session
    from prune_cli.gating.sparsity import exact_sparsity_gates
    from prune_cli.recipe import build_recipe
    from prune_cli.runs import RunDir, derived_generator

    recipe = build_recipe({"gates": {"steps": 10}})
    session = Session(recipe, RunDir(tmp_path, recipe), torch.device("cpu"))
    model = SpeechModel(DIMS)
    torch.manual_seed(0)
    pred = GatePredictor(model.n_modules, [], 8, 16, 80, LabelVocab(), 0.3, 2, 5)
    spec = SparsitySpec.build(model.modules_list, "both", {"encoder": 0.25, "decoder": 0.5}, None)
    b = 3
    batch = Batch(torch.randn(b, 40, 80), torch.full((b,), 40), torch.ones(b, 4, dtype=torch.long),
                  torch.ones(b, 4, dtype=torch.long), torch.ones(b, 2, dtype=torch.long), torch.full((b,), 2),
                  ["asr"] * b, ["en"] * b, ["en"] * b, ["s"] * b, [""] * b, list(range(b)))
    obj = GateObjective(model, pred, spec, session, LabelVocab(), 10, 7, VOCAB, calibrated=True, frozen_from=5)
    logits = pred(ContextInputs.build(["asr"] * b, ["en"] * b, ["en"] * b, ["s"] * b, [""] * b, batch.feats, batch.feat_lens,
                                      LabelVocab(), VOCAB))
    exported = spec.force_ungated(exact_sparsity_gates(logits, spec))
    assert all(torch.allclose(v, torch.tensor(t)) for v, t in
               ((spec.sparsity(exported)[s], spec.targets[s]) for s in spec.targets))
    for step in (5, 9, None):  # frozen phase and evaluation: the mask that will be exported
        assert torch.equal(obj.gates(batch, step), exported)
    # before the predictor is frozen it still learns through Gumbel straight-through samples, drawn from the gate seed
    sampled = obj.gates(batch, 0)
    g = recipe.gates
    tau = tau_at(0, 10, g.tau_start, g.tau_end)
    want = gumbel_straight_through(logits, tau, derived_generator(7, GUMBEL_SALT, 0), noise_scale=tau / g.tau_start)
    assert torch.equal(sampled, spec.force_ungated(want)) and sampled.requires_grad
    # the context-aware predictor (not calibrated) exports, and so trains the frozen phase under, the argmax
    ctx_obj = GateObjective(model, pred, spec, session, LabelVocab(), 10, 7, VOCAB, calibrated=False, frozen_from=5)
    assert torch.equal(ctx_obj.gates(batch, 5), spec.force_ungated(deterministic_gates(logits)))


def test_calibration_shift_meets_the_target_in_the_mean_and_is_idempotent() -> None:
    from prune_cli.gating.sparsity import calibration_shift

    model = SpeechModel(DIMS)
    spec = SparsitySpec.build(model.modules_list, "both", {"encoder": 0.25, "decoder": 0.5}, None)
    g = torch.Generator().manual_seed(3)
    contexts = torch.randn(3, model.n_modules, 2, generator=g) + torch.tensor([0.0, 1.5])  # mostly "keep"
    logits = contexts[torch.tensor([0] * 5 + [1] * 3 + [2] * 8)]  # one row per utterance, contexts unequally common
    before = spec.sparsity(deterministic_gates(logits))
    shift = calibration_shift(logits, spec)
    shifted = logits.clone()
    shifted[..., 0] += shift
    after = spec.sparsity(deterministic_gates(shifted))
    for scope, target in spec.targets.items():
        n = int(spec.scope_mask[scope].sum())
        assert abs(float(after[scope].mean()) - target) <= 1 / n + 1e-6
        assert abs(float(after[scope].mean()) - target) <= abs(float(before[scope].mean()) - target)
    assert abs(float(before["decoder"].mean()) - 0.5) > 1 / 12  # the check has something to fix
    # per context, the ranking of modules by skip margin is unchanged within a scope
    for row in range(3):
        for scope in spec.targets:
            idx = torch.nonzero(spec.scope_mask[scope]).flatten()
            m0 = (contexts[row, idx, 0] - contexts[row, idx, 1])
            assert torch.equal(torch.argsort(m0), torch.argsort(m0 + shift[idx]))
    assert torch.allclose(calibration_shift(shifted, spec), torch.zeros(model.n_modules))


def test_predictor_shift_moves_the_skip_logits_of_both_kinds() -> None:
    for inputs in (["task", "source_lang", "target_lang"], []):
        pred = GatePredictor(10, inputs, 8, 16, 80, LABELS, 2.0, 2, 5)
        ctx = ctx_batch()
        before = pred(ctx).detach().clone()
        shift = torch.linspace(-1, 1, 10)
        pred.shift_skip_logits(shift)
        after = pred(ctx).detach()
        assert torch.allclose(after[..., 0] - before[..., 0], shift.expand(4, 10))
        assert torch.equal(after[..., 1], before[..., 1])


def test_distillation_loss_is_the_kl_to_the_teacher_over_target_tokens() -> None:
    from prune_cli.data.batching import IGNORE, Batch
    from prune_cli.engine.objectives import distill_loss

    torch.manual_seed(0)
    labels = torch.tensor([[5, 6, IGNORE], [7, IGNORE, IGNORE]])
    batch = Batch(torch.zeros(2, 4, 80), torch.full((2,), 4), labels, labels, labels, torch.zeros(2, dtype=torch.long),
                  ["asr"] * 2, ["en"] * 2, ["en"] * 2, ["s"] * 2, [""] * 2, [0, 1])
    teacher = torch.randn(2, 3, 10)
    student = torch.randn(2, 3, 10, requires_grad=True)
    assert float(distill_loss(teacher, teacher, batch)) == pytest.approx(0.0, abs=1e-6)
    kd = distill_loss(student, teacher, batch)
    p, q = teacher.log_softmax(-1), student.detach().log_softmax(-1)
    tokens = [(0, 0), (0, 1), (1, 0)]  # padding positions do not count
    want = sum(float((p[i, j].exp() * (p[i, j] - q[i, j])).sum()) for i, j in tokens) / len(tokens)
    assert float(kd.detach()) == pytest.approx(want, rel=1e-5) and want > 0
    kd.backward()
    assert student.grad is not None and float(student.grad[0, 2].abs().sum()) == 0.0


def test_condition_labels_come_from_the_training_vocabulary_and_unseen_ones_share_id_0() -> None:
    ctx = ctx_batch()
    assert ctx.condition.tolist() == [1, 2, 2, 0] and ctx.speaker.tolist() == [1, 2, 1, 0]
    pred = GatePredictor(10, ["task", "condition"], 8, 16, 80, LABELS, 0.0, 2, 5)
    assert pred.per_utterance and pred.embeds["condition"].num_embeddings == 3
    logits = pred(ctx)
    assert not torch.allclose(logits[0], logits[2])  # both asr; clean vs snr10
    assert LabelVocab.from_blob(LABELS.to_blob()) == LABELS and LabelVocab.from_blob({"speakers": ["a"]}).conditions == ()


def test_always_run_modules_are_never_skipped_and_the_targets_fall_on_the_others() -> None:
    from prune_cli.gating.sparsity import calibration_shift, exact_sparsity_gates

    model = SpeechModel(DIMS)
    names = [m.name for m in model.modules_list]
    first = [i for i, n in enumerate(names) if n.startswith("encoder.0.")]
    logits = torch.randn(64, model.n_modules, 2, generator=torch.Generator().manual_seed(5))
    logits[:, first, 0] += 10.0  # the predictor would rather skip the first encoder layer than anything else
    free = SparsitySpec.build(model.modules_list, "both", {"encoder": 0.25, "decoder": 0.5}, None)
    assert exact_sparsity_gates(logits, free)[:, first].eq(0).sum(-1).eq(3).all()  # the encoder's 3 skips all land there
    spec = SparsitySpec.build(model.modules_list, "both", {"encoder": 0.25, "decoder": 0.5}, None,
                              always_run=["encoder.0.*"])
    assert spec.gated.sum() == model.n_modules - len(first) and not spec.gated[first].any()
    keep = spec.deployed_gates(logits, exact=True)
    assert keep[:, first].eq(1).all()
    sp = spec.sparsity(keep)
    assert torch.allclose(sp["encoder"], torch.tensor(0.25)) and torch.allclose(sp["decoder"], torch.tensor(0.5))
    # the calibrated argmax also leaves them alone and meets the scope's target with the other modules
    shifted = logits.clone()
    shifted[..., 0] += calibration_shift(logits, spec)
    argmax = spec.force_ungated(deterministic_gates(shifted))
    assert argmax[:, first].eq(1).all() and abs(float(spec.sparsity(argmax)["encoder"].mean()) - 0.25) < 0.05
    again = SparsitySpec.for_targets(model.modules_list, spec.targets, None, 0, ["encoder.0.*"])
    assert torch.equal(again.gated, spec.gated)
