"""Shared fixtures: a tiny synthesized corpus and one complete ci_smoke run, built once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

ROOT = Path(__file__).resolve().parent.parent
# Under pytest-xdist each worker (and every command it starts) gets one of the cores: two busy processes with two
# threads each would oversubscribe a 2-core machine.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, (os.cpu_count() or 1) // WORKERS)
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)


def cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real command line in a subprocess: exit codes and stdout purity are what users see."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "prune_cli", *args], cwd=cwd or ROOT, capture_output=True, text=True,
        timeout=timeout, env=full_env,
    )


def corpus_sets(root: Path, name: str = "corpus") -> list[str]:
    return ["--set", f"data.manifest_dir={root / name / 'manifests'}", "--set", f"data.synth.out_dir={root / name / 'audio'}"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, THREADS))


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory) -> Path:
    """This session's scratch directory; `corpus/` in it is the ci_smoke corpus (see smoke_corpus)."""
    return tmp_path_factory.mktemp("smoke")


@pytest.fixture(scope="session")
def smoke_corpus(tmp_path_factory, smoke_root: Path) -> list[str]:
    """The ci_smoke corpus (440 utterances, 11 contexts); returns the --set flags that point a recipe at it.

    Tests only read it, so xdist workers share one copy: the first to ask synthesizes it, under a file lock."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base
    sets = corpus_sets(shared, "smoke_corpus")
    with FileLock(str(shared / "smoke_corpus.lock")):
        if not (shared / "smoke_corpus.done").exists():
            r = cli("data", "synth", "ci_smoke", *sets, "--quiet")
            assert r.returncode == 0, r.stderr
            (shared / "smoke_corpus.done").touch()
    if not (smoke_root / "corpus").exists():
        (smoke_root / "corpus").symlink_to(shared / "smoke_corpus")
    return sets


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, smoke_corpus: list[str]) -> Path:
    """A complete ci_smoke pipeline run (all stages)."""
    run_dir = tmp_path_factory.mktemp("smoke_run") / "run_a"
    r = cli("run", "ci_smoke", *smoke_corpus, "--run-dir", str(run_dir), "--json")
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)
    return run_dir


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `--dist loadgroup` the tests on the session's ci_smoke run go to one worker, which builds it once: some
    rerun stages in it, and a run dir takes one process at a time."""
    for item in items:
        if "smoke_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("smoke_run"))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
