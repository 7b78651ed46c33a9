"""Run directory: its layout, resolved config, environment record, metrics, stage hashes, seeding.

Stage markers are read here and written only by the stage runner (engine/runner.py)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from prune_cli import __version__
from prune_cli.atomic import atomic_write_json, atomic_write_text
from prune_cli.data.manifest import split_fingerprint
from prune_cli.errors import RunDirInUse
from prune_cli.recipe import to_yaml
from prune_cli.recipe_schema import Recipe
from prune_cli.variants import VARIANTS

if TYPE_CHECKING:  # torch is imported where it is used: `run`'s argument checks stay fast
    import torch

# Which recipe sections each stage's output depends on. A stage is complete when its marker holds this hash.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "synth": ("data",),
    "base": ("seed", "data", "features", "tokenizer", "model", "base"),
    "gates": ("seed", "data", "features", "tokenizer", "model", "base", "gates"),
    "prune": ("seed", "data", "features", "tokenizer", "model", "base", "gates", "prune"),
    "eval": ("seed", "data", "features", "tokenizer", "model", "base", "gates", "prune", "eval"),
    "profile": ("seed", "data", "features", "tokenizer", "model", "base", "gates", "prune", "profile"),
}
# The data splits each stage reads: a changed manifest redoes the stage even when the recipe did not change.
STAGE_SPLITS: dict[str, tuple[str, ...]] = {
    "base": ("train", "dev"), "gates": ("train", "dev"), "prune": ("train", "dev"),
    "eval": ("train", "dev", "test"), "profile": ("train", "dev", "test"),
}
STAGES = ("synth", "base", "gates", "prune", "eval", "profile", "report")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def derived_generator(seed: int, *salt: int) -> torch.Generator:
    """A generator for one purpose (SpecAugment at step k, Gumbel noise at step k, ...), reproducible on resume."""
    import torch

    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + sum((i + 1) * 7919 * s for i, s in enumerate(salt))) % (2**63))
    return g


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=False
        )
        commit = out.stdout.strip()
        if not commit:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name: torch's CPU kernels, hence the last bits of every result, depend on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The env.json fields that decide whether a rerun can be bit-identical (`run --check-against` names them).
BITWISE_ENV_KEYS: tuple[str, ...] = ("torch", "device", "device_name", "cpu_model", "cpu_capability", "torch_threads")


def env_info(device: str, seed: int) -> dict[str, Any]:
    import numpy as np
    import torch
    import torchaudio

    info: dict[str, Any] = {
        "prune_cli": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torchaudio": torchaudio.__version__,
        "numpy": np.__version__,
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "git_commit": git_commit(),
        "command": sys.argv,
    }
    for mod in ("jiwer", "sacrebleu", "sentencepiece", "num2words", "espeakng_loader", "typer"):
        try:
            info[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            from importlib.metadata import PackageNotFoundError, version

            try:
                info[mod] = version(mod.replace("_", "-"))
            except PackageNotFoundError:
                info[mod] = None
    return info


class RunDir:
    """A run directory. Every stage reads what earlier stages wrote here."""

    def __init__(self, path: Path, recipe: Recipe):
        self.path = path
        self.recipe = recipe
        self._lock: IO[str] | None = None
        self.device = "cpu"

    # layout
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def base_ckpt(self) -> Path:
        return self.path / "checkpoints" / "base.pt"

    def finetuned_ckpt_for(self, variant: str) -> Path:
        """The copy of the base a variant adapts under gates.finetune_base (rule variants use another's)."""
        v = VARIANTS[variant]
        own = v.own_base or VARIANTS[v.runs_on or ""].own_base
        return self.checkpoints / str(own)

    def predictor_ckpt(self, variant: str) -> Path:
        return self.checkpoints / str(VARIANTS[variant].predictor_ckpt)

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def cmvn(self) -> Path:
        return self.path / "cmvn.pt"

    @property
    def masks(self) -> Path:
        return self.path / "masks.json"

    def lock(self) -> None:
        """Own the run dir for this process's lifetime: an advisory lock, released on exit, also after a crash.

        Under torchrun only rank 0 locks (the other ranks work for it)."""
        if int(os.environ.get("RANK", "0")) != 0 or self._lock is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / ".lock", "a+")  # noqa: SIM115 - held open until the process ends
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise RunDirInUse(f"{self.path}: run dir in use by {owner}") from None
        f.seek(0)
        f.truncate()
        f.write(f"PID {os.getpid()} (started {datetime.now().astimezone().isoformat(timespec='seconds')})\n")
        f.flush()
        self._lock = f

    def open(self, device: str) -> None:
        """Own the run dir for this command; nothing is written to it until a stage completes."""
        self.device = device
        self.lock()

    def record(self) -> None:
        """The resolved config and the environment of the stage that just completed: a command that fails, or only
        reads (an eval of another test set), leaves the run's record as it was."""
        atomic_write_text(self.path / "config.yaml", to_yaml(self.recipe))
        atomic_write_json(self.path / "env.json", env_info(self.device, self.recipe.seed))

    # stage bookkeeping
    def stage_hash(self, stage: str) -> str:
        if stage not in STAGE_SECTIONS:
            return ""
        d = self.recipe.data
        data = "".join(split_fingerprint(d.manifest_dir, d.kaldi_dir, sp) for sp in STAGE_SPLITS.get(stage, ()))
        return self.recipe.section_hash(*STAGE_SECTIONS[stage]) + "-" + hashlib.sha256(data.encode()).hexdigest()[:8]

    def marker(self, stage: str) -> Path:
        return self.path / "stages" / f"{stage}.json"

    def stage_complete(self, stage: str) -> bool:
        marker = self.marker(stage)
        if not marker.is_file():
            return False
        try:
            return json.loads(marker.read_text()).get("hash") == self.stage_hash(stage)
        except (OSError, json.JSONDecodeError):
            return False

    def update_metrics(self, section: str, values: dict[str, Any]) -> None:
        path = self.path / "metrics.json"
        current: dict[str, Any] = {}
        if path.is_file():
            try:
                current = json.loads(path.read_text())
            except json.JSONDecodeError:
                current = {}
        current[section] = values
        atomic_write_json(path, current)
