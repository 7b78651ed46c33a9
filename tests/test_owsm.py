"""The OWSM importer against ESPnet itself: a random OWSM built with ESPnet's own classes and saved as ESPnet ships
one, imported, and compared on corpus utterances: features, encoder output, decoder and CTC logits, skipped modules
against zeroed outputs, greedy decoding against ESPnet's beam search at beam 1, and the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import owsm_reference as ref
import pytest
import torch

from prune_cli.data.audio import load_audio
from prune_cli.data.owsm_features import OWSM_FRAMES, SPEECH_SAMPLES, owsm_frames, owsm_log_mel
from prune_cli.data.owsm_tokenizer import OwsmTokenizer
from prune_cli.model.decoding import DecodeOptions, decode
from prune_cli.model.owsm_import import find_files, read_owsm

pytest.importorskip("espnet2", reason="ESPnet is the reference implementation here (make setup installs it)")


def _corpus(root: Path, n: int, split: str = "test") -> list[dict]:
    rows = [json.loads(x) for x in (root / "corpus" / "manifests" / f"{split}.jsonl").read_text().splitlines()]
    picked, seen = [], set()
    for r in rows:  # one utterance per context first: several languages and both tasks
        key = (r["task"], r["source_lang"], r["target_lang"])
        if key not in seen:
            seen.add(key)
            picked.append(r)
    picked += [r for r in rows if r not in picked]
    for r in picked:
        r["audio"] = (root / "corpus" / "manifests" / r["audio_filepath"]).resolve()
    return picked[:n]


@pytest.fixture(scope="module")
def corpus(smoke_root: Path, smoke_corpus: list[str]) -> list[dict]:
    return _corpus(smoke_root, 6)


@pytest.fixture(scope="module", params=[False, True], ids=["abs_pos", "rel_pos"])
def owsm(request, tmp_path_factory, smoke_root: Path, smoke_corpus: list[str]):
    """(ESPnet's model, ours, our tokenizer files, the download dir): OWSM v3.1's absolute positions, and ESPnet's
    default relative-position attention."""
    texts = [json.loads(x)["text"] for x in (smoke_root / "corpus" / "manifests" / "train.jsonl").read_text().splitlines()]
    r = ref.build(tmp_path_factory.mktemp("owsm"), texts, rel_pos=request.param)
    model, tok = read_owsm(find_files(r.root))
    return r, model, tok


def _speech(rows: list[dict]) -> torch.Tensor:
    """The utterances as Speech2Text feeds them: zero-padded to 30 s."""
    wavs = [load_audio(r["audio"], 16000) for r in rows]
    return torch.stack([torch.nn.functional.pad(w, (0, SPEECH_SAMPLES - w.shape[0])) for w in wavs])


def _feats(rows: list[dict]) -> torch.Tensor:
    return torch.stack([owsm_log_mel(load_audio(r["audio"], 16000)) for r in rows])


def test_features_and_mvn_equal_espnets_frontend(owsm, corpus):
    r, model, _ = owsm
    speech = _speech(corpus)
    lens = torch.full((len(corpus),), SPEECH_SAMPLES)
    with torch.no_grad():
        theirs, theirs_lens = r.model._extract_feats(speech, lens)
        normed, _ = r.model.normalize(theirs.clone(), theirs_lens)  # GlobalMVN works in place
    ours = _feats(corpus)
    assert ours.shape == theirs.shape == (len(corpus), OWSM_FRAMES, 80)
    assert (ours - theirs).abs().max() < 1e-4
    ours_normed = (ours - model.encoder.mvn_mean) / model.encoder.mvn_std
    assert (ours_normed - normed).abs().max() < 1e-4
    # Stored short, padded back with the last frame: exactly the 30-s features.
    for row, full in zip(corpus, ours):
        short = owsm_frames(load_audio(row["audio"], 16000))
        assert short.shape[0] < 400
        assert torch.equal(torch.cat([short, short[-1:].expand(OWSM_FRAMES - short.shape[0], -1)]), full)


def _teacher_forced(corpus, tok: OwsmTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [tok.prompt(r["task"], r["source_lang"], r["target_lang"]) + tok.encode(r["text"]) for r in corpus]
    lens = torch.tensor([len(s) for s in seqs])
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True, padding_value=tok.eos), lens


def _tokenizer(tok_files) -> OwsmTokenizer:
    from prune_cli.contexts import ContextVocab

    return OwsmTokenizer(tok_files.sp_model, tok_files.token_list, ContextVocab(("asr", "st"), ("en", "de")),
                         tok_files.notime, tok_files.first_time, tok_files.last_time)


def test_encoder_decoder_and_ctc_equal_espnet(owsm, corpus):
    r, model, tok_files = owsm
    tok = _tokenizer(tok_files)
    speech, feats = _speech(corpus), _feats(corpus)
    ys, ys_lens = _teacher_forced(corpus, tok)
    with torch.no_grad():
        enc, enc_lens = r.model.encode(speech, torch.full((len(corpus),), SPEECH_SAMPLES))
        logits, _ = r.model.decoder(enc, enc_lens, ys, ys_lens)
        ctc = r.model.ctc.ctc_lo(enc)
        mem, mem_lens, mem_mask = model.encode(feats, torch.full((len(corpus),), feats.shape[1]))
        ours = model.decode_logits(ys, mem, mem_mask)
    assert enc.shape == mem.shape and torch.equal(enc_lens, mem_lens)
    assert (enc - mem).abs().max() < 1e-4
    assert (ctc - model.ctc(mem)).abs().max() < 1e-4
    valid = torch.arange(ys.shape[1])[None, :] < ys_lens[:, None]
    assert (logits - ours).abs().amax(-1)[valid].max() < 1e-4
    assert logits.abs().max() > 0.5  # a real comparison, not of two near-zero tensors


# Each of our module kinds, with the ESPnet submodule whose output it is.
ESPNET_MODULE = {"ffn1": "feed_forward_macaron", "attn": "attn", "cgmlp": "cgmlp", "ffn2": "feed_forward",
                 "self_attn": "self_attn", "src_attn": "src_attn", "ffn": "feed_forward"}


def _zero_output(module, inputs, output):  # noqa: ANN001
    if isinstance(output, tuple):  # cgMLP passes the positional encoding through
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


@pytest.mark.parametrize("skipped", [("ffn1",), ("attn",), ("cgmlp",), ("ffn2",), ("attn", "cgmlp"),
                                     ("self_attn",), ("src_attn",), ("ffn",)])
def test_a_skipped_module_equals_espnet_with_its_output_zeroed(owsm, corpus, skipped):
    """Layer 0 of the stack runs without the module(s); the reference is ESPnet with their outputs zeroed."""
    r, model, tok_files = owsm
    rows = corpus[:3]
    tok = _tokenizer(tok_files)
    part = "decoder" if skipped[0] in model.dec_kinds else "encoder"
    keep = [not (m.part == part and m.layer == 0 and m.kind in skipped) for m in model.modules_list]
    layers = r.model.decoder.decoders if part == "decoder" else r.model.encoder.encoders
    hooks = [getattr(layers[0], ESPNET_MODULE[k]).register_forward_hook(_zero_output) for k in skipped]
    speech, feats = _speech(rows), _feats(rows)
    ys, ys_lens = _teacher_forced(rows, tok)
    try:
        with torch.no_grad():
            enc, enc_lens = r.model.encode(speech, torch.full((len(rows),), SPEECH_SAMPLES))
            theirs, _ = r.model.decoder(enc, enc_lens, ys, ys_lens)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        mem, _, mem_mask = model.encode(feats, torch.full((len(rows),), feats.shape[1]), keep)
        ours = model.decode_logits(ys, mem, mem_mask, keep)
        dense = model.decode_logits(ys, *model.encode(feats, torch.full((len(rows),), feats.shape[1]))[::2])
    valid = torch.arange(ys.shape[1])[None, :] < ys_lens[:, None]
    assert (theirs - ours).abs().amax(-1)[valid].max() < 1e-4
    assert (dense - ours).abs().amax(-1)[valid].max() > 1e-3  # the skip changed the output, by 10x the tolerance


def test_greedy_decoding_equals_espnets_beam_search_at_beam_1(owsm, corpus):
    """ESPnet's BatchBeamSearch, primed as Speech2Text primes it (<sos> <lang> <task> <notimestamps>), at beam 1 with
    the decoder's score alone: the same tokens as our batched greedy decoding with its KV cache."""
    from espnet.nets.batch_beam_search import BatchBeamSearch

    r, model, tok_files = owsm
    tok = _tokenizer(tok_files)
    rows = corpus[:4]
    model = model.double()
    esp = r.model.double()
    max_tokens = 24
    try:
        for row in rows:
            prompt = tok.prompt(row["task"], row["source_lang"], row["target_lang"])
            search = BatchBeamSearch(scorers={"decoder": esp.decoder}, weights={"decoder": 1.0}, beam_size=1,
                                     vocab_size=len(tok_files.token_list), sos=tok.sos, eos=tok.eos,
                                     token_list=tok_files.token_list, pre_beam_score_key="full")
            search.set_hyp_primer(prompt)
            with torch.no_grad():
                enc, _ = esp.encode(_speech([row]).double(), torch.tensor([SPEECH_SAMPLES]))
                best = search(x=enc[0], maxlenratio=-max_tokens)[0]
            theirs = best.yseq.tolist()[len(prompt):]
            theirs = theirs[:-1] if theirs and theirs[-1] == tok.eos else theirs
            feats = _feats([row]).double()
            opts = DecodeOptions(beam_size=1, eos=tok.eos, max_len_ratio=0.05)  # up to 39 tokens from 749 frames
            with torch.no_grad():
                ours = decode(model, feats, torch.tensor([feats.shape[1]]), prompt, None, opts)[0]
            assert theirs, "ESPnet decoded nothing"
            assert ours[: len(theirs)] == theirs  # ESPnet stops at max_tokens; ours may run on
            assert len(ours) == len(theirs) or len(theirs) == max_tokens
    finally:
        model.float()
        esp.float()


def test_tokenizer_equals_espnets(owsm, corpus):
    from espnet2.text.sentencepiece_tokenizer import SentencepiecesTokenizer
    from espnet2.text.token_id_converter import TokenIDConverter

    r, _, tok_files = owsm
    tok = _tokenizer(tok_files)
    files = find_files(r.root)
    sp, conv = SentencepiecesTokenizer(str(files.bpe)), TokenIDConverter(tok_files.token_list)
    texts = [c["text"] for c in corpus] + ["ÿ unseen ✓ characters"]
    for text in texts:
        assert tok.encode(text) == conv.tokens2ids(sp.text2tokens(text))
        # Speech2Text's text_nospecial: the tokens that are not <...> specials (<unk> included), as text
        nospecial = [t for t in conv.ids2tokens(tok.encode(text)) if not (t[0] == "<" and t[-1] == ">")]
        assert tok.decode(tok.encode(text)) == sp.tokens2text(nospecial).strip()
    assert tok.prompt("asr", "de", "de") == [tok_files.token_list.index(t) for t in ("<sos>", "<deu>", "<asr>", "<notimestamps>")]
    assert tok.prompt("st", "de", "en")[2] == tok_files.token_list.index("<st_eng>")
    assert [tok_files.token_list[i] for i in tok.suppress] == ref.TIMES  # no timestamps without <notimestamps>' rule


@pytest.mark.slow
def test_owsm_v31_base_dimensions_equal_espnet(tmp_path, smoke_root: Path, smoke_corpus: list[str]):
    """OWSM v3.1 base's shape (its published config: size384_e6_d6, 50000 tokens; 6 heads and 1536-wide
    feed-forwards and cgMLP assumed), random weights: encoder, logits with and without a skipped module, greedy tokens."""
    from espnet.nets.batch_beam_search import BatchBeamSearch

    rows = _corpus(smoke_root, 3)
    texts = [json.loads(x)["text"] for x in (smoke_root / "corpus" / "manifests" / "train.jsonl").read_text().splitlines()]
    r = ref.build(tmp_path, texts, d=384, heads=6, enc_layers=6, dec_layers=6, ffn=1536, cgmlp=1536, cgmlp_kernel=31,
                  merge_kernel=31, dec_ffn=1536, vocab=50000)
    model, tok_files = read_owsm(find_files(r.root))
    assert model.dims.vocab == 50000 and 90e6 < sum(p.numel() for p in model.parameters()) < 120e6  # "101M parameters"
    tok = _tokenizer(tok_files)
    speech, feats = _speech(rows), _feats(rows)
    ys, ys_lens = _teacher_forced(rows, tok)
    keep = [m.name != "encoder.2.cgmlp" and m.name != "decoder.3.src_attn" for m in model.modules_list]
    with torch.no_grad():
        enc, enc_lens = r.model.encode(speech, torch.full((len(rows),), SPEECH_SAMPLES))
        logits, _ = r.model.decoder(enc, enc_lens, ys, ys_lens)
        hooks = [r.model.encoder.encoders[2].cgmlp.register_forward_hook(_zero_output),
                 r.model.decoder.decoders[3].src_attn.register_forward_hook(_zero_output)]
        skipped_enc, _ = r.model.encode(speech, torch.full((len(rows),), SPEECH_SAMPLES))
        skipped, _ = r.model.decoder(skipped_enc, enc_lens, ys, ys_lens)
        for h in hooks:
            h.remove()
        lens = torch.full((len(rows),), feats.shape[1])
        mem, _, mem_mask = model.encode(feats, lens)
        ours = model.decode_logits(ys, mem, mem_mask)
        mem_k, _, mask_k = model.encode(feats, lens, keep)
        ours_k = model.decode_logits(ys, mem_k, mask_k, keep)
    valid = torch.arange(ys.shape[1])[None, :] < ys_lens[:, None]
    assert (enc - mem).abs().max() < 1e-4
    assert (logits - ours).abs().amax(-1)[valid].max() < 1e-4
    assert (skipped - ours_k).abs().amax(-1)[valid].max() < 1e-4
    prompt = tok.prompt(rows[0]["task"], rows[0]["source_lang"], rows[0]["target_lang"])
    search = BatchBeamSearch(scorers={"decoder": r.model.decoder}, weights={"decoder": 1.0}, beam_size=1, vocab_size=50000,
                             sos=tok.sos, eos=tok.eos, token_list=tok_files.token_list, pre_beam_score_key="full")
    search.set_hyp_primer(prompt)
    with torch.no_grad():
        theirs = search(x=enc[0], maxlenratio=-8)[0].yseq.tolist()[len(prompt):]
        got = decode(model, feats[:1], lens[:1], prompt, None, DecodeOptions(beam_size=1, eos=tok.eos, max_len_ratio=0.02))[0]
    theirs = theirs[:-1] if theirs[-1] == tok.eos else theirs
    assert theirs and got[: len(theirs)] == theirs
