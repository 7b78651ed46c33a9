"""Training: resume after a kill reaches the same weights, DDP smoke run, checkpoint errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import ROOT, cli, read_json


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_killed_training_resumes_to_identical_weights(smoke_root: Path, smoke_corpus: list[str]) -> None:
    straight = smoke_root / "resume_straight"
    r = cli("train", "ci_smoke", "--stage", "base", *smoke_corpus, "--run-dir", str(straight), "--quiet")
    assert r.returncode == 0, r.stderr

    killed = smoke_root / "resume_killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prune_cli", "train", "ci_smoke", "--stage", "base", *smoke_corpus, "--run-dir", str(killed)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    last = killed / "checkpoints" / "base" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists(), "training never wrote a checkpoint"
    assert not (killed / "checkpoints" / "base.pt").exists(), "the run finished before it could be killed"
    killed_at = torch.load(last, weights_only=True)["step"]
    assert 0 < killed_at < 40

    r = cli("train", "ci_smoke", "--stage", "base", *smoke_corpus, "--run-dir", str(killed))
    assert r.returncode == 0, r.stderr
    assert f"resumed from {last} at step {killed_at}/40" in r.stderr
    a, b = _state(straight / "checkpoints" / "base.pt"), _state(killed / "checkpoints" / "base.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"
    # No temp files are left behind by atomic writes.
    assert not list(killed.rglob("*.tmp"))


def test_ddp_two_process_gloo_smoke(smoke_root: Path, smoke_corpus: list[str]) -> None:
    run_dir = smoke_root / "ddp"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m", "prune_cli",
         "train", "ci_smoke", "--stage", "base", *smoke_corpus, "--run-dir", str(run_dir), "--set", "base.steps=6",
         "--set", "base.val_every=3", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "checkpoints" / "base.pt").is_file()
    logs = [line for line in (run_dir / "logs" / "base.jsonl").read_text().splitlines() if '"event": "val"' in line]
    assert len(logs) == 2  # rank 0 alone writes the run directory
    assert read_json(run_dir / "metrics.json")["base"]["step"] == 6


def test_gates_without_base_checkpoint_names_the_command(tmp_path: Path, smoke_corpus: list[str]) -> None:
    r = cli("train", "ci_smoke", "--stage", "gates", *smoke_corpus, "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 1
    assert "checkpoint not found; produce it with `prune-cli train RECIPE --stage base`" in r.stderr


def test_corrupt_base_checkpoint_is_a_clear_error(tmp_path: Path, smoke_run: Path, smoke_corpus: list[str]) -> None:
    run_dir = tmp_path / "corrupt"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "base.pt").write_bytes(b"garbage" * 100)
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(run_dir), "--variants", "dense")
    assert r.returncode == 1
    assert "unreadable checkpoint" in r.stderr and "Traceback" not in r.stderr
