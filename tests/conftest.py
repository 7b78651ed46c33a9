"""Shared fixtures: a tiny synthesized corpus and one complete ci_smoke run, built once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


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
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smoke")


@pytest.fixture(scope="session")
def smoke_corpus(smoke_root: Path) -> list[str]:
    """The ci_smoke corpus (440 utterances, 11 contexts); returns the --set flags that point a recipe at it."""
    sets = corpus_sets(smoke_root)
    r = cli("data", "synth", "ci_smoke", *sets, "--quiet")
    assert r.returncode == 0, r.stderr
    return sets


@pytest.fixture(scope="session")
def smoke_run(smoke_root: Path, smoke_corpus: list[str]) -> Path:
    """A complete ci_smoke pipeline run (all stages)."""
    run_dir = smoke_root / "run_a"
    r = cli("run", "ci_smoke", *smoke_corpus, "--run-dir", str(run_dir), "--json")
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)
    return run_dir


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
