"""The data layer's settings as plain dataclasses: what the recipe's `data` and `features` sections hold.

Defined here, below the recipe, so that the data code never imports the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from prune_cli.data.synth import DEMO_LANGUAGES, DEMO_ST_PAIRS


@dataclass
class SynthConfig:
    """Demo corpus builder (eSpeak NG + num2words)."""

    out_dir: str = "corpora/demo"  # audio; git-ignored
    n_train: int = 10000
    n_dev: int = 300
    n_test: int = 600
    languages: list[str] = field(default_factory=lambda: list(DEMO_LANGUAGES))  # ASR in each; any eSpeak NG + num2words language
    st_pairs: list[str] = field(default_factory=lambda: list(DEMO_ST_PAIRS))  # SRC-TGT
    max_number: int = 9999
    forms: list[str] = field(default_factory=lambda: ["cardinal", "ordinal", "year"])
    voices_per_lang: int = 4
    rate_range: list[int] = field(default_factory=lambda: [150, 210])
    pitch_range: list[int] = field(default_factory=lambda: [35, 65])
    snr_db: Optional[float] = None
    audio_format: Literal["flac", "wav"] = "flac"
    workers: int = 2


@dataclass
class ContextDefaults:
    """Context fields for manifests that lack them (plain NeMo manifests)."""

    task: str = "asr"
    source_lang: str = "en"
    target_lang: Optional[str] = None


@dataclass
class SpecAugmentConfig:
    freq_masks: int = 2
    freq_width: int = 15
    time_masks: int = 2
    time_width: int = 20
