"""Whisper's decoding safeguards (model/decoding.py): temperature fallback on a repetition loop or an unsure output,
and a length cap that follows each utterance's own audio."""

from __future__ import annotations

import torch

from prune_cli.model.decoding import DecodeOptions, compression_ratio, decode, decode_hypotheses
from prune_cli.model.whisper import WhisperDims, WhisperModel

EOS, LOOP = 50, 7  # end of text, and the token a broken decoder repeats
DIMS = WhisperDims(n_mels=8, vocab=64, d_model=16, heads=2, enc_layers=1, dec_layers=1, n_audio_ctx=32, max_len=96)
WHISPER = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def text_of(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def looping_model(loop: float = 5.0, eos: float = 3.0) -> WhisperModel:
    """A Whisper whose decoder always prefers LOOP, EOS second: greedy decoding repeats LOOP up to the length cap.
    model.calls counts the decoder's calls."""
    torch.manual_seed(0)
    model = WhisperModel(DIMS, padded_input=False).eval()
    model.calls = []  # type: ignore[attr-defined]

    def fixed(tokens, *args, **kwargs) -> torch.Tensor:  # noqa: ANN001
        model.calls.append(tokens.shape[0])  # type: ignore[attr-defined]
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], DIMS.vocab)
        logits[..., LOOP] = loop
        logits[..., EOS] = eos
        return logits

    model.decode_logits = fixed  # type: ignore[method-assign]
    return model


def batch(frames: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor(frames)
    return torch.randn(len(frames), max(frames), DIMS.n_mels, generator=torch.Generator().manual_seed(1)), lens


def opts(**kw) -> DecodeOptions:  # noqa: ANN003
    return DecodeOptions(max_len_ratio=1.5, eos=EOS, **kw)


def test_a_forced_repetition_triggers_the_fallback_and_the_loop_is_gone():
    model = looping_model()
    x, lens = batch([64, 64])
    plain = decode_hypotheses(model, x, lens, [1, 2], None, opts())
    assert all(h.tokens == [LOOP] * 50 for h in plain)  # 1.5 tokens per encoder frame (32) + 2: the cap
    assert all(h.compression_ratio == 0.0 and h.temperature == 0.0 for h in plain)  # no fallback asked: not measured
    assert compression_ratio(text_of(plain[0].tokens)) > 2.4

    kept = decode_hypotheses(model, x, lens, [1, 2], None, opts(temperatures=WHISPER), text_of)
    for h in kept:
        assert h.temperature > 0.0  # greedy's loop was refused
        assert h.compression_ratio <= 2.4 and len(h.tokens) < 50
        assert h.compression_ratio == compression_ratio(text_of(h.tokens))
    # The same seed decodes the same way; another seed samples differently.
    again = decode_hypotheses(model, x, lens, [1, 2], None, opts(temperatures=WHISPER), text_of)
    assert [h.tokens for h in again] == [h.tokens for h in kept]
    other = [decode_hypotheses(model, x, lens, [1, 2], None, opts(temperatures=WHISPER, seed=s), text_of) for s in (1, 2, 3)]
    assert any([h.tokens for h in o] != [h.tokens for h in kept] for o in other)


def test_a_confident_short_output_is_kept_at_temperature_zero():
    model = looping_model(loop=0.0, eos=9.0)  # EOS first: an empty, confident output
    x, lens = batch([64])
    (h,) = decode_hypotheses(model, x, lens, [1, 2], None, opts(temperatures=WHISPER), text_of)
    assert h.tokens == [] and h.temperature == 0.0 and h.avg_logprob > -1.0


def test_an_unsure_output_falls_back_on_log_probability_alone():
    model = looping_model(loop=0.5, eos=0.4)  # LOOP and EOS barely above 62 other tokens
    x, lens = batch([8])  # cap 8 tokens: too short for the compression test
    (greedy,) = decode_hypotheses(model, x, lens, [1, 2], None, opts())
    assert greedy.avg_logprob < -1.0
    n_greedy = len(model.calls)
    model.calls.clear()
    (h,) = decode_hypotheses(model, x, lens, [1, 2], None, opts(temperatures=WHISPER, compression_ratio_threshold=None), text_of)
    # Every temperature was tried (5 samples each); none was surer than greedy, whose average log-probability is the
    # best of all attempts, so it is kept (faster-whisper's rule when no attempt passes). The prompt's step runs once:
    # every attempt starts from its cache (the audio's cross-attention keys and values).
    assert sum(model.calls) == n_greedy + 5 * sum(1 for _ in WHISPER[1:]) * (n_greedy - 1)
    assert h.tokens == greedy.tokens and h.avg_logprob == greedy.avg_logprob
    model.calls.clear()
    (off,) = decode_hypotheses(model, x, lens, [1, 2], None, opts(temperatures=WHISPER, compression_ratio_threshold=None,
                                                                  logprob_threshold=None), text_of)
    assert len(model.calls) == n_greedy and off.tokens == greedy.tokens  # both tests off: greedy, once


def test_the_length_cap_follows_each_utterances_own_audio_in_a_batch():
    model = looping_model()
    x, lens = batch([64, 20])  # encoder frames 32 and 10: caps 1.5 * 32 + 2 = 50 and 1.5 * 10 + 2 = 17
    long, short = decode(model, x, lens, [1, 2], None, opts())
    assert len(long) == 50 and len(short) == 17
    sure = looping_model(eos=-20.0)  # a beam would otherwise settle on the empty output
    for beam in (2, 3):
        out = decode(sure, x, lens, [1, 2], None, opts(beam_size=beam))
        assert [len(t) for t in out] == [50, 17]
    # Under Whisper's 30-s padding the cap is the true audio's, not the padded input's.
    model.padded_input = True
    padded = torch.cat([x, x[:, -1:].expand(-1, 64 - x.shape[1], -1)], 1)
    assert [len(t) for t in decode(model, padded, lens, [1, 2], None, opts())] == [50, 17]


def test_fallback_needs_the_text_to_measure():
    import pytest

    model = looping_model()
    x, lens = batch([64])
    with pytest.raises(ValueError, match="text_of"):
        decode(model, x, lens, [1, 2], None, opts(temperatures=WHISPER))


def test_fallback_attempts_starting_from_the_shared_prompt_state_decode_what_a_fresh_start_decodes(monkeypatch):
    from prune_cli.model import decoding

    torch.manual_seed(3)
    model = WhisperModel(DIMS, padded_input=False).eval()  # random weights: unsure, so every temperature is tried
    x, lens = batch([64, 40, 24])
    o = opts(temperatures=WHISPER, seed=7)
    shared = decode_hypotheses(model, x, lens, [1, 2], None, o, text_of)
    assert {h.temperature for h in shared} - {0.0}  # some attempts sampled
    monkeypatch.setattr(decoding, "_prompt_state", lambda *a: None)  # each attempt runs the prompt itself
    fresh = decode_hypotheses(model, x, lens, [1, 2], None, o, text_of)
    assert [(h.tokens, h.temperature) for h in shared] == [(h.tokens, h.temperature) for h in fresh]
    assert all(abs(a.avg_logprob - b.avg_logprob) < 1e-5 for a, b in zip(shared, fresh))

