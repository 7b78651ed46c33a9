"""Model: real skipping matches the multiplicative reference, KV-cache decoding, FLOPs, materialized checkpoints."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prune_cli.errors import CheckpointError
from prune_cli.model.checkpoint import load_model, save_model
from prune_cli.model.decoding import DecodeOptions, decode
from prune_cli.model.flops import count_flops, per_module_flops
from prune_cli.model.layers import MultiHeadAttention
from prune_cli.model.s2t import ModelDims, SpeechModel

DIMS = ModelDims(n_mels=80, vocab=40, d_model=32, heads=4, enc_layers=2, dec_layers=2, ffn_dim=64, cgmlp_dim=64,
                 cgmlp_kernel=5, merge_kernel=3, frontend_channels=8, dropout=0.0, max_len=32)


def tiny(seed: int = 0) -> SpeechModel:
    torch.manual_seed(seed)
    return SpeechModel(DIMS).eval()


def inputs(b: int = 3, t: int = 90):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, t, 80, generator=g)
    lens = torch.tensor([t - 7 * i for i in range(b)])
    y = torch.randint(11, 40, (b, 6), generator=g)
    return x, lens, y


def random_keeps(n: int, k: int) -> list[tuple[bool, ...]]:
    rng = random.Random(0)
    return [tuple(rng.random() < 0.5 for _ in range(n)) for _ in range(k)] + [(False,) * n, (True,) * n]


def test_skipping_equals_reference_y_plus_g_times_f() -> None:
    model = tiny()
    x, lens, y = inputs()
    for keep in random_keeps(model.n_modules, 12):
        skipped, _, _ = model(x, lens, y, keep=keep)
        scale = torch.tensor([float(k) for k in keep]).expand(x.shape[0], -1)
        reference, _, _ = model(x, lens, y, scale=scale)  # every module runs, output multiplied by its gate
        torch.testing.assert_close(skipped, reference, rtol=1e-5, atol=1e-5)


def test_skipped_modules_are_not_executed() -> None:
    model = tiny()
    calls: list[str] = []
    for m in model.modules_list:
        part, i, kind = m.name.split(".")
        getattr(getattr(model, part).layers[int(i)], kind).register_forward_hook(lambda *_, n=m.name: calls.append(n))
    keep = tuple(i % 3 != 0 for i in range(model.n_modules))
    x, lens, y = inputs()
    model(x, lens, y, keep=keep)
    assert set(calls) == {m.name for m, k in zip(model.modules_list, keep) if k}


def test_module_drop_skips_a_seeded_subset_in_training_only() -> None:
    from prune_cli.data.batching import Batch
    from prune_cli.engine.objectives import BaseObjective

    model = tiny().train()
    calls: list[str] = []
    for m in model.modules_list:
        part, i, kind = m.name.split(".")
        getattr(getattr(model, part).layers[int(i)], kind).register_forward_hook(lambda *_, n=m.name: calls.append(n))
    obj = BaseObjective(model, smoothing=0.1, ctc_weight=0.3, module_drop=0.3, seed=7)
    keeps = [obj.keep(step) for step in range(20)]
    assert keeps[3] == obj.keep(3) and len({tuple(k) for k in keeps}) > 1  # a function of (seed, step)
    dropped = sum(not k for keep in keeps for k in keep) / (20 * model.n_modules)
    assert 0.2 < dropped < 0.4
    assert obj.keep(None) is None and BaseObjective(model, 0.1, 0.3).keep(5) is None  # validation and default: dense
    x, lens, y = inputs()
    batch = Batch(x, lens, y[:, :-1], y[:, 1:], y[:, :3], torch.tensor([3, 3, 0]), ["asr"] * 3, ["en"] * 3, ["en"] * 3, ["s"] * 3, [""] * 3,
                  [0, 1, 2])
    loss, _ = obj(batch, 3)
    assert set(calls) == {m.name for m, k in zip(model.modules_list, obj.keep(3)) if k}
    loss.backward()  # the skipped modules simply get no gradient


def test_cached_decoding_equals_uncached() -> None:
    model = tiny(3)
    x, lens, _ = inputs(4)
    prompt = [1, 7, 5, 6]
    for keep in [None, *random_keeps(model.n_modules, 3)[:3]]:
        for beam in (1, 3):
            a = decode(model, x, lens, prompt, keep, DecodeOptions(beam_size=beam, use_cache=True))
            b = decode(model, x, lens, prompt, keep, DecodeOptions(beam_size=beam, use_cache=False))
            assert a == b


def test_tiny_model_overfits_a_handful() -> None:
    torch.manual_seed(0)
    model = SpeechModel(DIMS)
    x, lens, _ = inputs(4, 60)
    targets = [[11, 12, 13], [14, 15], [16, 17, 18, 19], [20]]
    prompt = [1, 7, 4, 7]
    dec_in = torch.full((4, 8), 2)
    dec_out = torch.full((4, 8), -100)
    for i, t in enumerate(targets):
        seq = prompt + t
        dec_in[i, : len(seq)] = torch.tensor(seq)
        dec_out[i, len(prompt) - 1 : len(seq)] = torch.tensor(t + [2])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        logits, _, _ = model(x, lens, dec_in)
        loss = F.cross_entropy(logits.transpose(1, 2), dec_out, ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.05
    assert decode(model, x, lens, prompt, None, DecodeOptions()) == targets


def test_linear_and_attention_flops_match_formula() -> None:
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(5, 10, 64)
    assert count_flops(lambda: lin(x)).total == 2 * 5 * 10 * 64 * 48
    b, t, s, d, h = 2, 7, 11, 32, 4
    attn = MultiHeadAttention(d, h, 0.0, cross=True).eval()
    q, mem = torch.randn(b, t, d), torch.randn(b, s, d)
    expected = 2 * b * t * d * d * 2 + 2 * b * s * d * d * 2 + 2 * b * h * t * s * (d // h) * 2
    with torch.no_grad():
        assert count_flops(lambda: attn(q, mem=mem)).total == expected


def test_skipping_cuts_flops_by_exactly_the_skipped_modules() -> None:
    model = tiny()
    x, lens, y = inputs(1)
    names = [m.name for m in model.modules_list]
    with torch.no_grad():
        dense = count_flops(lambda: model(x, lens, y))
        per = per_module_flops(dense.by_module, names)
        for keep in random_keeps(model.n_modules, 6):
            masked = count_flops(lambda: model(x, lens, y, keep=keep))
            saved = dense.total - masked.total
            expect = sum(per[n] for n, k in zip(names, keep) if not k)
            # The encoder merge is shared by attn and cgMLP; when only one runs, its own half stays.
            assert saved == expect, (keep, saved, expect)
    with torch.no_grad():
        one = tuple(n != "decoder.1.ffn" for n in names)
        masked = count_flops(lambda: model(x, lens, y, keep=one))
    assert masked.by_module.get("decoder.layers.1.ffn", 0) == 0


def test_materialized_model_matches_masked(tmp_path: Path) -> None:
    model = tiny()
    x, lens, y = inputs()
    keep = random_keeps(model.n_modules, 1)[0]
    removed = [m.name for m, k in zip(model.modules_list, keep) if not k]
    pruned = SpeechModel(DIMS, removed=removed)
    pruned.load_state_dict({k: v for k, v in model.state_dict().items() if k in pruned.state_dict()})
    save_model(tmp_path / "p.pt", pruned)
    save_model(tmp_path / "d.pt", model)
    loaded, _ = load_model(tmp_path / "p.pt")
    loaded.eval()
    assert (tmp_path / "p.pt").stat().st_size < (tmp_path / "d.pt").stat().st_size
    a, _, _ = model(x, lens, y, keep=keep)
    b, _, _ = loaded(x, lens, y)
    torch.testing.assert_close(a, b)
    prompt = [1, 7, 5, 6]
    assert decode(model, x, lens, prompt, keep, DecodeOptions()) == decode(loaded, x, lens, prompt, None, DecodeOptions())


def test_unreadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "base.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        load_model(bad)
    with pytest.raises(Exception, match="checkpoint not found"):
        load_model(tmp_path / "nope.pt")


def test_module_names_are_stable() -> None:
    names = [m.name for m in tiny().modules_list]
    assert names[:4] == ["encoder.0.ffn1", "encoder.0.attn", "encoder.0.cgmlp", "encoder.0.ffn2"]
    assert names[-3:] == ["decoder.1.self_attn", "decoder.1.src_attn", "decoder.1.ffn"]
    assert len(set(itertools.chain(names))) == len(names) == 2 * 4 + 2 * 3


def _alignment_log_prob(lp: torch.Tensor, accept) -> float:  # noqa: ANN001
    """log of the summed probability of every CTC alignment (over all frames of lp) whose output passes accept."""
    import math

    def collapse(path: tuple[int, ...]) -> list[int]:
        out = [c for i, c in enumerate(path) if i == 0 or c != path[i - 1]]
        return [c for c in out if c != 0]

    total = sum(math.exp(sum(float(lp[i, c]) for i, c in enumerate(p)))
                for p in itertools.product(range(lp.shape[1]), repeat=lp.shape[0]) if accept(collapse(p)))
    return math.log(total) if total > 0 else float("-inf")


def boost_eos(model: SpeechModel, amount: float) -> list[int]:
    """Make the decoder favour EOS (an untrained model never ends a hypothesis); returns a list that counts its calls."""
    from prune_cli.data.tokenizer import EOS

    decode_logits, calls = model.decode_logits, []

    def boosted(*args, **kwargs) -> torch.Tensor:
        calls.append(1)
        logits = decode_logits(*args, **kwargs)
        logits[..., EOS] += amount
        return logits

    model.decode_logits = boosted  # type: ignore[method-assign]
    return calls


def test_ctc_prefix_scores_equal_sums_over_alignments() -> None:
    from prune_cli.data.tokenizer import EOS
    from prune_cli.model.ctc_prefix import CTCPrefixScorer

    g = torch.Generator().manual_seed(0)
    vocab, lens = 5, torch.tensor([5, 3])  # the second utterance is padded: its last 2 frames must not count
    logits = torch.randn(2, 5, vocab, generator=g)
    lp = logits.log_softmax(-1)
    scorer = CTCPrefixScorer(logits, lens, specials=1)
    state, prefix = scorer.initial(), []
    for tok in (3, 3, 1, 4):  # a repeated label needs a blank between its two emissions
        cand = torch.tensor([[tok, EOS, 0]] * 2)
        psi, r = scorer.score(state, cand)
        for n in range(2):
            frames = lp[n, : int(lens[n])]
            want_prefix = _alignment_log_prob(frames, lambda out: out[: len(prefix) + 1] == prefix + [tok])
            want_full = _alignment_log_prob(frames, lambda out: out == prefix)
            assert psi[n, 0].item() == pytest.approx(want_prefix, abs=1e-4), (n, prefix, tok)
            assert psi[n, 1].item() == pytest.approx(want_full, abs=1e-4), (n, prefix)  # EOS: P_ctc(prefix)
            assert psi[n, 2].item() == float("-inf")  # the blank (and any special below `specials`) is not text
        state = scorer.select(r, psi, cand, torch.tensor([0, 1]), torch.tensor([0, 0]))
        prefix.append(tok)
    assert psi[1, 0].item() == float("-inf")  # 4 labels with a repeat cannot fit into 3 frames


def test_joint_ctc_attention_beam_scores_its_hypotheses_exactly() -> None:
    from prune_cli.data.tokenizer import EOS
    from prune_cli.model.decoding import _beam, _step_limits

    model = tiny(5)
    # An untrained model never ends a hypothesis: favour EOS in the decoder and blanks (short outputs) in CTC.
    boost_eos(model, 4.0)
    with torch.no_grad():
        model.ctc.bias[0] += 3.0
    x, lens, _ = inputs(3)
    prompt, k = [1, 7, 4, 7], 4  # short hypotheses (max_len_ratio 0.3), so CTC can align them
    plain = decode(model, x, lens, prompt, None, DecodeOptions(beam_size=k, max_len_ratio=0.3))
    assert decode(model, x, lens, prompt, None, DecodeOptions(beam_size=k, max_len_ratio=0.3, ctc_weight=0.0)) == plain
    with torch.inference_mode():
        mem, mem_lens, mem_mask = model.encode(x, lens)
        ctc_lp = model.ctc(mem).float().log_softmax(-1)
    checked = 0
    for w in (0.5, 1.0):
        opts = DecodeOptions(beam_size=k, max_len_ratio=0.3, ctc_weight=w, ctc_pre_beam=DIMS.vocab, n_specials=11)
        with torch.inference_mode():
            seqs, scores, _ = _beam(model, mem, mem_lens, mem_mask, prompt, None, opts)
            limits = _step_limits(model, mem_lens, len(prompt), opts).tolist()
            for i, (seq, score) in enumerate(zip(seqs, scores.view(-1).tolist())):
                u = i // k
                if score == float("-inf") or len(seq) == limits[u]:
                    continue  # not a finished hypothesis
                tokens = torch.tensor([prompt + seq])
                att_lp = model.decode_logits(tokens, mem[u : u + 1], mem_mask[u : u + 1], None).float().log_softmax(-1)
                att = sum(att_lp[0, len(prompt) - 1 + j, t].item() for j, t in enumerate(seq + [EOS]))
                ctc = -F.ctc_loss(ctc_lp[u, : int(mem_lens[u])][:, None], torch.tensor([seq]), mem_lens[u : u + 1],
                                  torch.tensor([len(seq)]), reduction="sum").item()
                assert score == pytest.approx((1 - w) * att + w * ctc, abs=1e-3), (w, i, seq)
                checked += 1
        best = decode(model, x, lens, prompt, None, opts)
        assert best == [seqs[u * k + j] for u, j in enumerate(scores.view(-1, k).argmax(-1).tolist())]
        if w == 1.0:
            assert best != plain  # this model's CTC head disagrees with its decoder, so the check has teeth
    assert checked >= 6


def test_depthwise_conv_time_equals_conv1d_values_and_gradients() -> None:
    from prune_cli.model.layers import depthwise_conv_time

    torch.manual_seed(0)
    for k, bias in ((15, True), (3, False)):
        conv = torch.nn.Conv1d(24, 24, k, padding=k // 2, groups=24, bias=bias)
        x = torch.randn(3, 37, 24, requires_grad=True)
        ref = conv(x.transpose(1, 2)).transpose(1, 2)
        (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
        out = depthwise_conv_time(x, conv.weight, conv.bias, k // 2)
        (g_out,) = torch.autograd.grad(out.square().sum(), x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_out, g_ref, atol=1e-4, rtol=1e-4)


def test_beam_stops_once_settled_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    from prune_cli.model import decoding

    model = tiny(5)
    calls = boost_eos(model, 2.5)  # the best beams end early, some others never do
    x, lens, _ = inputs(3)
    prompt = [1, 7, 4, 7]
    for w in (0.0, 0.5):
        opts = DecodeOptions(beam_size=4, max_len_ratio=1.0, ctc_weight=w, n_specials=11)
        calls.clear()
        early = decode(model, x, lens, prompt, None, opts)
        n_early = len(calls)
        with monkeypatch.context() as m:
            m.setattr(decoding, "_settled", lambda *_: False)
            calls.clear()
            assert decode(model, x, lens, prompt, None, opts) == early
            assert n_early < len(calls), (w, n_early, len(calls))
