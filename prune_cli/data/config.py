"""The data layer's settings as plain dataclasses: what the recipe's `data` and `features` sections hold.

Defined here, below the recipe, so that the data code never imports the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

# The demo corpus's default languages and translation directions (any pair of supported_languages() works).
DEMO_LANGUAGES = ("en", "de", "fr", "es", "it")
DEMO_ST_PAIRS = ("de-en", "fr-en", "es-en", "it-en", "en-de", "en-fr")
FORMS = ("cardinal", "ordinal", "year")
VOICE_VARIANTS = ("m1", "f1", "m3", "f3", "m7", "f4", "m2", "f2", "m4", "f5")  # the clean splits' voices, in order
# eSpeak NG variants kept out of train and dev, for the unseen-voices test set: male, female, klatt and named voices.
HELDOUT_VOICES = ("m6", "f5", "klatt4", "Andy", "belinda", "john", "max", "steph2")
NOISES = ("white", "pink", "brown", "babble")


@dataclass
class AugmentConfig:
    """Variation of the training split, rendered into its audio at synthesis (seeded): voices, rate, pitch, noise, rooms."""

    clean_share: float = 0.3  # share of training utterances drawn as the clean test split is (its voices, rate, pitch, no noise)
    rate_range: list[int] = field(default_factory=lambda: [100, 240])  # words per minute, for the other utterances
    pitch_range: list[int] = field(default_factory=lambda: [5, 95])
    noise_share: float = 0.8  # of the other utterances: additive noise at a random SNR
    snr_range: list[float] = field(default_factory=lambda: [0.0, 30.0])  # dB, uniform
    noises: list[str] = field(default_factory=lambda: list(NOISES))  # white, pink, brown, babble (other utterances)
    babble_talkers: int = 3
    reverb_share: float = 0.2  # of the other utterances: a synthetic room impulse response
    rt60_range: list[float] = field(default_factory=lambda: [0.2, 0.8])  # seconds


@dataclass
class RobustSetConfig:
    """A robustness test set written beside test.jsonl as <name>.jsonl; its numbers are test numbers."""

    name: str = "test_noise"
    # the clean test split's voices, synth.heldout_voices, or Piper's neural English voice (English contexts only)
    voices: Literal["test", "heldout", "neural"] = "test"
    snr_db: Optional[float] = None  # additive noise at exactly this SNR; null = clean
    noises: list[str] = field(default_factory=lambda: list(NOISES))  # drawn evenly per utterance
    rate_range: Optional[list[int]] = None  # null: synth.rate_range
    pitch_range: Optional[list[int]] = None  # null: synth.pitch_range
    per_context: int = 40


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
    snr_db: Optional[float] = None  # white noise on every utterance (older recipes); see augment for training variation
    heldout_voices: list[str] = field(default_factory=lambda: list(HELDOUT_VOICES))  # never in train or dev
    augment: Optional[AugmentConfig] = None  # null: train sounds like test
    test_sets: list[RobustSetConfig] = field(default_factory=list)
    audio_format: Literal["flac", "wav"] = "flac"
    workers: int = 2


@dataclass
class ContextDefaults:
    """Context fields for manifests that lack them (plain NeMo manifests, Kaldi dirs without utt2lang/utt2task).

    None: the data must name it. A context is never guessed: an utterance without one is an error unless given."""

    task: Optional[str] = None
    source_lang: Optional[str] = None
    target_lang: Optional[str] = None


@dataclass
class SpecAugmentConfig:
    freq_masks: int = 2
    freq_width: int = 15
    time_masks: int = 2
    time_width: int = 20
