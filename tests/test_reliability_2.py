"""The second hostile probe (imported weights, broken audio, empty references, late checks): one test per cause,
numbered as the probe listed them, each reproducing its trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cli
from prune_cli.errors import CheckpointError
from prune_cli.model.whisper_import import load_pretrained

transformers = pytest.importorskip("transformers", reason="transformers writes the reference checkpoints")

TINY = dict(vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_source_positions=16,
            max_target_positions=24)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hf")
    transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**TINY)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ct2_dir(hf_dir: Path, tmp_path_factory) -> Path:
    ct2 = pytest.importorskip("ctranslate2.converters", reason="ctranslate2 writes the reference model.bin")
    from test_whisper import _processor

    _processor(hf_dir)
    out = tmp_path_factory.mktemp("ct2") / "m"
    ct2.TransformersConverter(str(hf_dir)).convert(str(out))
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_01_a_config_that_disagrees_with_the_weights_is_an_error_naming_both(hf_dir: Path, tmp_path: Path) -> None:
    d = _copy(hf_dir, tmp_path / "lying")
    cfg = json.loads((d / "config.json").read_text())
    cfg["encoder_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: the config disagrees with the weights: encoder_layers 1 "
                                              r"\(the weights have 2\)"):
        load_pretrained(d)
    r = cli("model", "import", str(d), "--out", str(tmp_path / "x.pt"))
    assert r.returncode == 1 and "encoder_layers 1 (the weights have 2)" in r.stderr and not (tmp_path / "x.pt").exists()


def test_01_every_tensor_of_the_file_is_used(hf_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    d = _copy(hf_dir, tmp_path / "extra")
    sd = load_file(str(d / "model.safetensors"))
    sd["model.encoder.layers.0.extra_adapter.weight"] = torch.zeros(4, 4)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="1 tensor.* does not use: model.encoder.layers.0.extra_adapter.weight"):
        load_pretrained(d)
    del sd["model.encoder.layers.0.extra_adapter.weight"], sd["model.decoder.layers.1.fc2.bias"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 tensor.*model.decoder.layers.1.fc2.bias"):
        load_pretrained(d)


def test_01_a_ctranslate2_variable_left_over_is_an_error(ct2_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from prune_cli.model import ct2_whisper

    load_pretrained(ct2_dir)  # the converter's own file reads, every variable used
    real = ct2_whisper.read_ct2_variables
    monkeypatch.setattr(ct2_whisper, "read_ct2_variables",
                        lambda *a: {**real(*a), "encoder/layer_0/adapter/weight": torch.ones(3, 3)})
    with pytest.raises(CheckpointError, match="1 variable.* does not use: encoder/layer_0/adapter/weight"):
        load_pretrained(ct2_dir)


@pytest.mark.parametrize("keep", [0.5, 0.8])
def test_05_a_truncated_model_bin_names_the_file_and_the_variable(ct2_dir: Path, tmp_path: Path, keep: float) -> None:
    d = _copy(ct2_dir, tmp_path / "cut")
    data = (d / "model.bin").read_bytes()
    (d / "model.bin").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=rf"{d / 'model.bin'}: truncated: variable \S+ needs \d+ bytes, the file has \d+ left"):
        load_pretrained(d)


def test_05_random_bytes_as_safetensors_name_the_file(hf_dir: Path, tmp_path: Path) -> None:
    d = _copy(hf_dir, tmp_path / "noise")
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    with pytest.raises(CheckpointError, match=rf"{d / 'model.safetensors'}: not a readable safetensors file"):
        load_pretrained(d)


def test_05_an_unwritable_out_path_is_one_line_naming_it(hf_dir: Path) -> None:
    r = cli("model", "import", str(hf_dir), "--out", "/proc/x.pt")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "/proc/x.pt" in r.stderr and "Traceback" not in r.stderr


def test_07_bytes_after_the_end_of_model_bin_are_an_error(ct2_dir: Path, tmp_path: Path) -> None:
    d = _copy(ct2_dir, tmp_path / "tail")
    with open(d / "model.bin", "ab") as f:
        f.write(b"\0" * 1000)
    with pytest.raises(CheckpointError, match="1000 bytes after the end of the CTranslate2 model"):
        load_pretrained(d)


# ---------------------------------------------------------------- audio, references, durations


def _asr_en_rows(smoke_corpus: list[str], n: int) -> list[dict]:
    test = Path(smoke_corpus[1].split("=", 1)[1]) / "test.jsonl"
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    out = [r for r in rows if r["task"] == "asr" and r["source_lang"] == "en"][:n]
    return [{**r, "audio_filepath": str((test.parent / r["audio_filepath"]).resolve())} for r in out]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fill,message", [(float("nan"), "are not finite (NaN or Inf)"), (float("inf"), "are not finite"),
                                          (0.0, "every sample is zero")])
def test_02_broken_audio_is_an_error_naming_the_file_in_check_and_eval(
        tmp_path: Path, smoke_run: Path, smoke_corpus: list[str], fill: float, message: str) -> None:
    import numpy as np
    import soundfile as sf

    from prune_cli.data.check import check_manifest
    from prune_cli.data.config import ContextDefaults

    bad = tmp_path / "bad.wav"
    audio = np.full(16000, 0.1, np.float32)
    audio[100:200] = fill
    if fill == 0.0:
        audio[:] = 0.0
    sf.write(bad, audio, 16000, subtype="FLOAT")
    rows = _asr_en_rows(smoke_corpus, 2)
    m = _write(tmp_path / "m.jsonl", rows + [{**rows[0], "utt_id": "bad", "audio_filepath": str(bad)}])
    report = check_manifest(m, 16000, 0.05, ContextDefaults())
    assert report.problems == [f"{m}:3: {bad}: " + report.problems[0].split(f"{bad}: ", 1)[1]]
    assert message in report.problems[0]
    run = tmp_path / "run"
    import shutil

    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns(".lock", "sweep"))
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--manifest", str(m), "--name", "bad")
    assert r.returncode == 1 and f"{m}:3: {bad}" in r.stderr and message in r.stderr, r.stderr
    assert not (run / "eval" / "sets" / "bad").exists()
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--manifest", str(m), "--name", "bad",
            "data.on_error=skip", "--variants", "dense")
    assert r.returncode == 0 and f"skipped {m}:3: {bad}" in r.stderr, r.stderr
    assert json.loads((run / "eval" / "sets" / "bad" / "summary.json").read_text())["variants"]["dense"]["asr:en"]["n"] == 2


def test_03_and_04_an_empty_reference_is_refused_and_a_lying_duration_warned(
        tmp_path: Path, smoke_run: Path, smoke_corpus: list[str]) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns(".lock", "sweep"))
    rows = _asr_en_rows(smoke_corpus, 2)
    empty = _write(tmp_path / "empty.jsonl", [rows[0], {**rows[1], "text": "?! \U0001f600"}])
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--manifest", str(empty), "--name", "empty")
    assert r.returncode == 1 and f"{empty}:2: the reference '?! \U0001f600' is empty once normalized" in r.stderr, r.stderr
    assert not (run / "eval" / "sets" / "empty").exists()
    lying = _write(tmp_path / "lying.jsonl", [rows[0], {**rows[1], "duration": 500}])
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--manifest", str(lying), "--name", "lying",
            "--variants", "dense")
    assert r.returncode == 0, r.stderr
    assert "1 utterance(s) whose manifest duration is more than 10% off the audio" in r.stderr
    assert f"{lying}:2: duration 500 s, the audio is" in r.stderr


# ---------------------------------------------------------------- messages that say what is wrong


def test_06_a_d_model_mismatch_is_named_as_such(hf_dir: Path, tmp_path: Path) -> None:
    d = _copy(hf_dir, tmp_path / "dmodel")
    cfg = json.loads((d / "config.json").read_text())
    cfg["d_model"] = 32
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"d_model 32 \(the weights have 64\)") as e:
        load_pretrained(d)
    assert "FFN" not in str(e.value)


def test_06_a_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    from prune_cli.model.checkpoint import load_model, save_model
    from prune_cli.model.whisper import WhisperDims, WhisperModel

    model = WhisperModel(WhisperDims(n_mels=8, vocab=64, d_model=16, heads=2, enc_layers=1, dec_layers=1, n_audio_ctx=8, max_len=16))
    save_model(tmp_path / "m.pt", model)
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    blob["state_dict"]["decoder.layers.0.ffn.w1.weight"] = torch.zeros(32, 16)
    torch.save(blob, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) do not fit .*decoder\.layers\.0\.ffn\.w1\.weight: the file has "
                                              r"shape \[32, 16\], the model needs \[64, 16\]"):
        load_model(tmp_path / "m.pt")


def test_06_the_pickle_refusal_is_whole_and_quiet(tmp_path: Path) -> None:
    import os

    class Evil:  # unpickling it would run a shell command
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, evil)
    r = cli("model", "import", str(evil), "--out", str(tmp_path / "x.pt"))
    assert r.returncode == 1
    assert r.stderr == (f"error: {evil}: refused: the Whisper checkpoint holds a Python object (posix.system) that only "
                        "running code could rebuild; prune-cli reads plain tensors only\n")
    assert not (tmp_path / "pwned").exists()


def test_06_an_st_line_without_target_lang_says_so(tmp_path: Path) -> None:
    from prune_cli.data.config import ContextDefaults
    from prune_cli.data.manifest import parse_row

    row = {"audio_filepath": "a.wav", "text": "forty", "task": "st", "source_lang": "de"}
    utt, problems = parse_row(row, "m.jsonl:4", tmp_path, ContextDefaults())
    assert utt is None and problems == ["m.jsonl:4: an st utterance names no target_lang (the language its text is in); "
                                        "add the field, or give data.defaults.target_lang / --context TASK:SRC-TGT"]
    utt, problems = parse_row(row, "m.jsonl:4", tmp_path, ContextDefaults(target_lang="en"))
    assert problems == [] and utt is not None and utt.context == "st:de-en"


# ---------------------------------------------------------------- early checks and recorded paths


def test_07_a_missing_pretrained_model_fails_before_any_stage_and_leaves_nothing(tmp_path: Path) -> None:
    run = tmp_path / "w"
    r = cli("run", "whisper_base", "model.pretrained=/nonexistent", "--run-dir", str(run),
            "--set", f"data.manifest_dir={tmp_path / 'm'}", "--set", f"data.synth.out_dir={tmp_path / 'c'}")
    assert r.returncode == 1, r.stderr
    assert "model.pretrained: /nonexistent: not found" in r.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()  # synth never started
    assert not (run / "checkpoints").exists()


def test_07_a_sets_manifest_path_is_recorded_absolute(tmp_path: Path, smoke_run: Path, smoke_corpus: list[str]) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns(".lock", "sweep"))
    _write(tmp_path / "rel.jsonl", _asr_en_rows(smoke_corpus, 2))
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--manifest", "rel.jsonl", "--variants", "dense",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((run / "eval" / "sets" / "rel" / "summary.json").read_text())
    assert summary["set"]["manifest"] == str((tmp_path / "rel.jsonl").resolve())


def test_a_missing_eval_set_stops_run_before_any_training(tmp_path: Path) -> None:
    (tmp_path / "my_data").mkdir()
    run = tmp_path / "mine"
    r = cli("run", "scratch", f"data.manifest_dir={tmp_path / 'my_data'}", "--run-dir", str(run),
            "--stages", "base,gates,prune,eval,profile,report")
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if "eval.sets:" in line]
    assert len(lines) == 3 and all("not found" in line for line in lines)  # scratch's three robustness sets
    assert "test_unseen_voices" in lines[0] and not (run / "checkpoints").exists()
    # With synth in the stages the recipe's own synth sets are not missing: synth writes them first.
    from prune_cli.engine.runner import missing_eval_sets
    from prune_cli.recipe import load_recipe

    recipe = load_recipe("scratch", [f"data.manifest_dir={tmp_path / 'my_data'}", f"eval.sets=[test_noise_10db, {tmp_path / 'x.jsonl'}]"])[0]
    assert [m.split(":")[1].strip() for m in missing_eval_sets(recipe, synth_first=True)] == ["x"]
