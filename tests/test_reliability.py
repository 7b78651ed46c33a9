"""The hostile probe's 21 failure causes, one test each: exit codes, one-line messages, and run dirs left intact."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import tomllib
import torch

from conftest import ROOT, cli
from prune_cli.atomic import append_jsonl, atomic_savefig, atomic_write_json, atomic_write_text, dumps
from prune_cli.data.check import check_manifest
from prune_cli.data.config import ContextDefaults
from prune_cli.errors import CheckpointError, DataError, DiskFullError, RunDirInUse
from prune_cli.gating.masks import MaskFile
from prune_cli.recipe import load_recipe
from prune_cli.runs import RunDir


def _strict(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("sweep", ".lock"))
    return dst


def _wav(path: Path, seconds: float, sr: int = 16000) -> Path:
    rng = np.random.default_rng(0)
    sf.write(path, (0.1 * rng.standard_normal(int(seconds * sr))).astype("float32"), sr, subtype="PCM_16")
    return path


def _manifest(path: Path, rows: list[dict], raw_lines: dict[int, bytes] | None = None) -> Path:
    lines = [json.dumps(r).encode() for r in rows]
    for i, raw in (raw_lines or {}).items():
        lines.insert(i, raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# ---------------------------------------------------------------- numeric faults


def test_01_non_finite_loss_stops_training_unsaved_and_unmarked(tmp_path: Path, smoke_corpus: list[str]) -> None:
    run = tmp_path / "nan"
    # probe: prune-cli train ci_smoke --stage base base.lr=1.0e+9
    r = cli("train", "ci_smoke", *smoke_corpus, "--stage", "base", "--run-dir", str(run), "base.lr=1.0e+9", "base.warmup_steps=1")
    assert r.returncode == 1, r.stderr
    assert "non-finite" in r.stderr and "at step" in r.stderr
    assert not (run / "checkpoints" / "base.pt").exists() and not (run / "stages" / "base.json").exists()
    for p in (run / "checkpoints" / "base").glob("*.pt"):  # what resume could load is never a diverged model
        blob = torch.load(p, weights_only=True)
        assert all(bool(torch.isfinite(t).all()) for t in blob["modules"]["model"].values() if t.is_floating_point())


@pytest.mark.parametrize("override,message", [
    ("base.steps=-5", "base.steps: must be > 0, got -5"), ("base.steps=0", "base.steps: must be > 0, got 0"),
    ("base.lr=0", "base.lr: must be > 0"), ("gates.lr=-1e-3", "gates.lr: must be > 0"),
    ("data.max_frames_per_batch=0", "data.max_frames_per_batch: must be > 0"),
])
def test_02_nonsense_values_fail_validation(override: str, message: str) -> None:
    r = cli("recipe", "validate", "ci_smoke", override)  # probe: prune-cli train ci_smoke base.steps=-5
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_03_scientific_notation_is_a_float(tmp_path: Path) -> None:
    r = cli("recipe", "show", "ci_smoke", "base.lr=1e-3", "gates.lr=3e-4", "gates.base_lr=1.0e9", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["base"]["lr"], d["gates"]["lr"], d["gates"]["base_lr"]) == (1e-3, 3e-4, 1e9)
    (tmp_path / "r.yaml").write_text(f"include: {ROOT / 'recipes' / 'ci_smoke.yaml'}\nbase:\n  lr: 3e-4\n")
    assert load_recipe(str(tmp_path / "r.yaml"))[0].base.lr == 3e-4


def test_04_json_outputs_never_hold_nan_or_infinity(tmp_path: Path) -> None:
    r = cli("recipe", "show", "ci_smoke", "check.wer=.nan", "check.bleu=.inf", "--json")
    assert r.returncode == 0, r.stderr
    d = _strict(r.stdout)
    assert d["check"]["wer"] is None and d["check"]["bleu"] is None
    atomic_write_json(tmp_path / "m.json", {"loss": float("nan"), "xs": [1.0, float("-inf")]})
    assert _strict((tmp_path / "m.json").read_text()) == {"loss": None, "xs": [1.0, None]}
    append_jsonl(tmp_path / "log.jsonl", {"loss": float("inf")})
    assert _strict((tmp_path / "log.jsonl").read_text()) == {"loss": None}
    assert dumps({"a": float("nan")}, indent=None) == '{"a": null}'


# ---------------------------------------------------------------- one owner per run dir


def test_05_a_second_process_on_a_run_dir_in_use_fails_at_once(tmp_path: Path, smoke_run: Path, smoke_corpus: list[str]) -> None:
    run = _copy_run(smoke_run, tmp_path / "busy")
    config = (run / "config.yaml").read_bytes()
    holder = RunDir(run, load_recipe("ci_smoke")[0])
    holder.lock()  # this test process owns it, as a concurrent `run` would
    r = cli("prune", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "gates.alpha=9")
    assert r.returncode == 1, r.stderr
    assert f"run dir in use by PID {os.getpid()} (started " in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (run / "config.yaml").read_bytes() == config  # the loser wrote nothing
    with pytest.raises(RunDirInUse):
        RunDir(run, holder.recipe).lock()


def test_05_a_crashed_owner_leaves_no_stale_lock(tmp_path: Path) -> None:
    run = tmp_path / "crashed"
    code = (f"import time; from prune_cli.runs import RunDir; from prune_cli.recipe import load_recipe; "
            f"r = RunDir(__import__('pathlib').Path({str(run)!r}), load_recipe('ci_smoke')[0]); r.lock(); print('locked', flush=True); "
            "time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirInUse, match=f"PID {p.pid}"):
        RunDir(run, load_recipe("ci_smoke")[0]).lock()
    p.send_signal(signal.SIGKILL)
    p.wait()
    RunDir(run, load_recipe("ci_smoke")[0]).lock()  # recovered: the kernel released the dead owner's lock
    assert "PID" in (run / ".lock").read_text()


# ---------------------------------------------------------------- atomic writes


def test_06_plots_are_written_atomically(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "plots" / "masks_context.png"
    fig = plt.figure()
    atomic_savefig(fig, path)
    before = path.read_bytes()

    class Killed(Exception):
        pass

    def dies_half_way(target, **kwargs):  # noqa: ANN001, ANN003
        Path(target).write_bytes(b"\x89PNG partial")
        raise Killed

    fig.savefig = dies_half_way
    with pytest.raises(Killed):
        atomic_savefig(fig, path)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == [path.name]
    plt.close(fig)
    # every PNG the package writes goes through the atomic writer
    offenders = [p for p in (ROOT / "prune_cli").rglob("*.py") if ".savefig(" in p.read_text() and p.name != "atomic.py"]
    assert not offenders, offenders


def test_07_disk_full_names_the_cause_and_the_path_and_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "eval" / "summary.json"
    atomic_write_json(path, {"ok": 1})

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError) as e:
        atomic_write_json(path, {"ok": 2})
    assert e.value.problems == [f"no space left on device: {path}"] and e.value.exit_code == 1
    assert json.loads(path.read_text()) == {"ok": 1} and len(list(path.parent.iterdir())) == 1


# ---------------------------------------------------------------- checkpoints and masks


def test_08_no_pickle_loading_and_a_malicious_checkpoint_runs_nothing(tmp_path: Path) -> None:
    offenders = [str(p) for p in (ROOT / "prune_cli").rglob("*.py") if "weights_only=False" in p.read_text()]
    assert not offenders
    from prune_cli.model.checkpoint import load_model

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {marker}",))

    torch.save({"kind": "prune-cli/model", "dims": {}, "removed": [], "state_dict": Evil()}, tmp_path / "base.pt")
    with pytest.raises(CheckpointError, match=r"refused: the checkpoint holds a Python object \(posix.system\)"):
        load_model(tmp_path / "base.pt")
    assert not marker.exists()


def test_09_a_checkpoint_of_another_architecture_is_an_error(tmp_path: Path, smoke_run: Path, smoke_corpus: list[str]) -> None:
    run = _copy_run(smoke_run, tmp_path / "arch")
    summary = (run / "eval" / "summary.json").read_bytes()
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "model.d_model=32")
    assert r.returncode == 1, r.stderr
    assert "d_model 64 (recipe: 32)" in r.stderr and "base" in r.stderr
    masks = (run / "masks.json").read_bytes()
    r = cli("prune", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "gates.hidden=32")
    assert r.returncode == 1 and "gates.pt: the gate predictor does not match the recipe" in r.stderr, r.stderr
    assert (run / "eval" / "summary.json").read_bytes() == summary and (run / "masks.json").read_bytes() == masks


def test_10_masks_json_has_one_source_of_truth(tmp_path: Path, smoke_run: Path) -> None:
    d = json.loads((smoke_run / "masks.json").read_text())
    ctx = sorted(d["masks"])[0]
    edited = json.loads(json.dumps(d))
    edited["masks"][ctx] = [1 - v for v in edited["masks"][ctx]]
    (tmp_path / "a.json").write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match=f"disagree for {ctx}"):
        MaskFile.load(tmp_path / "a.json")
    for bad in ([2] * len(d["modules"]), [1] * (len(d["modules"]) - 1)):
        edited = json.loads(json.dumps(d))
        edited["masks"][ctx] = bad
        edited["variants"]["context"][ctx] = bad
        (tmp_path / "b.json").write_text(json.dumps(edited))
        with pytest.raises(CheckpointError, match=f"masks.{ctx}: expected {len(d['modules'])} values"):
            MaskFile.load(tmp_path / "b.json")
    assert MaskFile.load(smoke_run / "masks.json").variants["context"] == d["masks"]


# ---------------------------------------------------------------- data


def test_11_a_truncated_wav_is_caught_without_a_duration(tmp_path: Path) -> None:
    wav = _wav(tmp_path / "a.wav", 2.0)
    wav.write_bytes(wav.read_bytes()[: 44 + 16000])  # half a second of the two the header declares
    m = _manifest(tmp_path / "m.jsonl", [{"audio_filepath": "a.wav", "text": "one"}])
    n, problems, *_ = check_manifest(m, 16000, 0.05, ContextDefaults("asr", "en"))
    assert n == 1 and problems == [f"{m}:1: WAV header declares 32000 samples but the file holds 8000 (truncated file)"]


def test_12_non_utf8_lines_are_named_skipped_and_other_manifests_still_reported(tmp_path: Path, smoke_corpus: list[str]) -> None:
    _wav(tmp_path / "a.wav", 1.0)
    good = {"audio_filepath": "a.wav", "text": "one", "duration": 1.0}
    bad = _manifest(tmp_path / "bad.jsonl", [good, {**good, "utt_id": "x2"}], {1: b'{"audio_filepath": "a.wav", "text": "\xff\xfe"}'})
    fine = _manifest(tmp_path / "fine.jsonl", [good])
    r = cli("data", "check", str(bad), str(fine), "--context", "asr:en")
    assert r.returncode == 1
    problems = [line for line in r.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert problems == [f"{bad}:2: not valid UTF-8"]
    assert f"{bad}: 2 utterances, 1 problem(s)" in r.stdout and f"{fine}: 1 utterances, 0 problem(s)" in r.stdout
    from prune_cli.data.batching import SplitSpec, load_split

    spec = SplitSpec(bad, ContextDefaults("asr", "en"), 16000, 80, "skip")
    assert len(load_split(spec)) == 2


def test_13_utterances_longer_than_the_model_takes_are_caught_before_training(tmp_path: Path) -> None:
    from prune_cli.data.batching import SplitSpec, load_split
    from prune_cli.model.s2t import max_input_frames

    _wav(tmp_path / "short.wav", 1.0)
    _wav(tmp_path / "long.wav", 170.0)  # past the positional table (about 164 s)
    m = _manifest(tmp_path / "m.jsonl", [{"audio_filepath": "short.wav", "text": "one"},
                                         {"audio_filepath": "long.wav", "text": "two"}])
    r = cli("data", "check", str(m), "--context", "asr:en")
    assert r.returncode == 1 and f"{m}:2: 170.0 s is longer than the model takes (163.9 s)" in r.stderr, r.stderr
    spec = SplitSpec(m, ContextDefaults("asr", "en"), 16000, 80, "fail", max_input_frames())
    with pytest.raises(DataError) as e:
        load_split(spec)
    assert e.value.problems[0].startswith(f"{m}:2: 170.0 s is longer than the model takes")
    kept = load_split(SplitSpec(m, ContextDefaults("asr", "en"), 16000, 80, "skip", max_input_frames()))
    assert [u.utt_id for u in kept.utts] == ["m-1"] and kept.skipped == 1


def test_14_duplicate_utterance_ids_are_reported_and_rejected(tmp_path: Path) -> None:
    from prune_cli.data.batching import SplitSpec, load_split

    _wav(tmp_path / "a.wav", 1.0)
    row = {"audio_filepath": "a.wav", "text": "one", "utt_id": "u1"}
    m = _manifest(tmp_path / "m.jsonl", [row, row])
    n, problems, *_ = check_manifest(m, 16000, 0.05, ContextDefaults("asr", "en"))
    assert problems == [f"{m}:2: duplicate utterance id 'u1' (first at {m}:1)"]
    with pytest.raises(DataError, match="duplicate utterance id 'u1'"):
        load_split(SplitSpec(m, ContextDefaults("asr", "en"), 16000, 80, "fail"))


# ---------------------------------------------------------------- command-line contract


def test_15_eval_of_an_unknown_context_exits_2_and_touches_nothing(tmp_path: Path, smoke_run: Path, smoke_corpus: list[str]) -> None:
    run = _copy_run(smoke_run, tmp_path / "ctx")
    before = {p: p.read_bytes() for p in (run / "eval").rglob("*") if p.is_file()}
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--contexts", "asr:xx")
    assert r.returncode == 2 and "--contexts: no 'asr:xx' utterances in the test split" in r.stderr, r.stderr
    assert {p: p.read_bytes() for p in (run / "eval").rglob("*") if p.is_file()} == before


def test_16_empty_run_dir_and_unsafe_recipe_names_exit_2() -> None:
    r = cli("prune", "ci_smoke", "--run-dir", "")
    assert r.returncode == 2 and "--run-dir: empty path" in r.stderr
    for name in ("../escape", "a/b", ".."):
        r = cli("recipe", "validate", "ci_smoke", f"name={name}")
        assert r.returncode == 2 and "must be a plain folder name" in r.stderr, (name, r.stderr)


def test_17_an_empty_recipe_exits_2(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    r = cli("recipe", "validate", str(tmp_path / "empty.yaml"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'empty.yaml'}: empty recipe"


@pytest.mark.parametrize("args", [["train"], ["train", "ci_smoke", "--bogus"], ["run", "ci_smoke", "--stages"], ["nosuch"]])
def test_18_usage_errors_are_one_line(args: list[str]) -> None:
    r = cli(*args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert "╭" not in r.stderr and r.stdout == ""


# ---------------------------------------------------------------- ecosystem hygiene


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_19_run_dir_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "config.yaml", "x")
        append_jsonl(tmp_path / "logs.jsonl", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == mode
    assert (tmp_path / "logs.jsonl").stat().st_mode & 0o777 == mode


def test_19_a_run_dir_has_one_file_mode(smoke_run: Path) -> None:
    modes = {p.relative_to(smoke_run).as_posix(): p.stat().st_mode & 0o777 for p in smoke_run.rglob("*")
             if p.is_file() and p.name != ".lock"}
    assert len(set(modes.values())) == 1, modes


def test_20_dependencies_are_ranges_and_ci_uses_the_pinned_set() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        assert "==" not in dep and ">=" in dep and "<" in dep, dep
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["torch"] == "2.14.1" and pins["torchaudio"] == "2.11.0"
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


def test_21_tensorboard_is_an_optional_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("tensorboard") for d in extras["tensorboard"])
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e '.[tensorboard]'" in readme and "tensorboard/<loop>/" in readme
    import builtins

    from prune_cli.engine.loop import _tensorboard

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert _tensorboard(tmp_path / "tb") is None  # the JSONL logs carry on without it
