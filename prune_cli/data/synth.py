"""Demo corpus: multilingual spoken numbers from eSpeak NG (driven with ctypes), texts from num2words.

Every random choice (numbers, splits, voices, rate, pitch, noise, rooms) is drawn up front from the recipe seed,
so two builds with the same seed give identical manifests and identical audio bytes, however many workers run.
Training variation (`synth.augment`) is rendered into the audio here, not applied on the fly: features are computed
once per utterance and cached, and a corpus on disk is one that can be listened to and checked.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from prune_cli.atomic import atomic_write_text
from prune_cli.data.config import VOICE_VARIANTS, RobustSetConfig, SynthConfig
from prune_cli.data.degrade import babble, colored_noise, mix_at_snr, reverberate
from prune_cli.data.neural_voice import PIPER_LANGUAGE, PIPER_VOICE
from prune_cli.errors import DataError

# bump when the same plan would render different audio or text
# (2: segmented de/it compounds; 3: fresh process per chunk; 4: Italian spelling fixes; 5: hashed number splits;
# 6: chunks never straddle splits, noise types, babble, reverberation)
SYNTH_VERSION = 6
# Utterances per worker process. eSpeak NG keeps state between syntheses (its RNG and waveform state) that neither
# espeak_Terminate/espeak_Initialize nor espeak_ng_SetRandSeed resets: the same text rendered twice in one process
# differs. So every fixed chunk of the plan renders in a fresh process with a seeded RNG, and an utterance's audio
# depends on the plan alone, not on how chunks were scheduled over workers.
SYNTH_CHUNK = 400
ESPEAK_RATE, ESPEAK_PITCH = 1, 3
AUDIO_OUTPUT_SYNCHRONOUS, POS_CHARACTER, CHARS_UTF8 = 2, 1, 1


@dataclass
class UttSpec:
    utt_id: str
    split: str
    task: str
    source_lang: str
    target_lang: str
    form: str
    number: int
    voice: str
    rate: int
    pitch: int
    noise_seed: int
    noise: str = "none"  # none or one of NOISES
    snr_db: float | None = None
    rt60: float = 0.0  # reverberation time of a synthetic room, seconds; 0 = dry
    talkers: int = 0  # babble: how many other utterances are mixed

    @property
    def condition(self) -> str:
        """The acoustic condition as a coarse label: clean, or the 10-dB SNR band, and +reverb."""
        label = "clean" if self.snr_db is None else f"snr{int(min(30, max(0, self.snr_db)) // 10 * 10)}"
        return label + ("+reverb" if self.rt60 > 0 else "")


@lru_cache(maxsize=1)
def voice_variants() -> tuple[str, ...]:
    """Every eSpeak NG voice variant (voices/!v), read from the installed data."""
    import espeakng_loader

    root = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
    return tuple(sorted(p.name for p in root.iterdir() if p.is_file() and re.fullmatch(r"[A-Za-z0-9_]+", p.name)))


@lru_cache(maxsize=1)
def supported_languages() -> tuple[str, ...]:
    """Languages the demo corpus can speak: an eSpeak NG dictionary and voice, and num2words number words.
    Read from the installed libraries, so a new release's languages come with it."""
    import espeakng_loader
    from num2words import CONVERTER_CLASSES

    data = Path(espeakng_loader.get_data_path())
    dicts = {p.name[: -len("_dict")] for p in data.glob("*_dict")}
    voices = {p.name for p in (data / "lang").rglob("*") if p.is_file()}
    return tuple(sorted(c for c in dicts & voices & set(CONVERTER_CLASSES) if re.fullmatch(r"[a-z]{2,3}", c)))


@lru_cache(maxsize=None)
def form_supported(lang: str, form: str) -> bool:
    """Whether num2words writes this form of number in this language."""
    try:
        return bool(number_text(1984 if form == "year" else 21, lang, form))
    except (NotImplementedError, KeyError, AttributeError, TypeError, ValueError, OverflowError):
        return False


def number_text(n: int, lang: str, form: str) -> str:
    from num2words import num2words

    text = num2words(n, lang=lang, to=form)
    if lang == "it":
        text = fix_italian_spelling(text)
    return " ".join(text.replace(",", " ").split())


def fix_italian_spelling(text: str) -> str:
    """Two num2words (0.5.x) Italian slips, fixed so one sound has one spelling.

    A compound ending in "tre" is written "tré" (23 "ventitré", but 123 "centoventitre"), and "cento" + "diciotto"
    loses an "i" (118 "centodicotto", 2118 "...centodicottesimo"). They touch 2.7% of the demo's Italian utterances,
    but 4 of the 30 Italian ASR errors of one demo base (seed 4321) were "-tre" vs "-tré".
    """
    text = re.sub(r"(?<=\w)tre\b", "tré", text)
    return text.replace("dicott", "diciott")


# eSpeak reads an unsegmented compound numeral as one word: one stress, and word-internal sound rules
# (it "millesettecento..." -> [millezet:etSento...], the 's' of "sette" voiced), unlike its own reading of the
# digits ("1737" -> [m'ille set:etS'Ento ...]). So German and Italian compounds are spoken with a
# space after each thousands/hundreds morpheme, as eSpeak says the digits; the transcript keeps the spelling.
_SPOKEN_SPLITS = {
    "de": re.compile(r"(tausend|hundert)(?=(ein|zwei|drei|vier|fünf|sechs|sieb|acht|neun|zehn|elf|zwölf|zwanzig|dreißig))"),
    "it": re.compile(r"(mila|mille|cento)(?=(un|due|tre|quattr|cinqu|sei|sed|sett|ott|nov|dieci|dici|dod|quin|vent|trent"
                     r"|quarant|cinquant|sessant|settant|ottant|novant|cent))"),
}


def spoken_text(text: str, lang: str) -> str:
    """What eSpeak is given to say `text`: the same words, compounds segmented where eSpeak needs it."""
    split = _SPOKEN_SPLITS.get(lang)
    return split.sub(r"\1 ", text) if split else text


class ESpeak:
    """Minimal ctypes binding to the libespeak-ng shipped in the espeakng-loader wheel."""

    def __init__(self) -> None:
        import espeakng_loader

        data = espeakng_loader.get_data_path()
        if len(data) > 150:  # espeak-ng keeps its data path in a 160-byte buffer
            short = Path(tempfile.gettempdir()) / "prune-cli-espeak-data"
            if not short.exists():
                shutil.copytree(data, short)
            data = str(short)
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        self.sample_rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), 0)
        if self.sample_rate <= 0:
            raise DataError(f"eSpeak NG failed to initialise with data at {data}")
        self._chunks: list[np.ndarray] = []
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._cb = proto(self._collect)  # keep a reference: the library calls it
        self.lib.espeak_SetSynthCallback(self._cb)

    def _collect(self, wav, n, _events) -> int:  # noqa: ANN001 (ctypes types)
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def synth(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise DataError(f"eSpeak NG has no voice {voice!r}")
        self.lib.espeak_SetParameter(ESPEAK_RATE, rate, 0)
        self.lib.espeak_SetParameter(ESPEAK_PITCH, pitch, 0)
        self._chunks = []
        data = text.encode()
        self.lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
        self.lib.espeak_Synchronize()
        if not self._chunks:
            raise DataError(f"eSpeak NG produced no audio for {text!r}")
        return np.concatenate(self._chunks)


def _sample_number(rng: np.random.Generator, form: str, max_number: int) -> int:
    if form == "year":
        return int(rng.integers(1100, 2100))
    if form == "ordinal":
        return int(rng.integers(1, min(max_number, 1000) + 1))
    # A mix of magnitudes, so short and long numbers are both common.
    top = min(max_number, [99, 999, max_number][int(rng.choice(3, p=[0.25, 0.3, 0.45]))])
    return int(rng.integers(0, top + 1))


def number_split(seed: int, form: str, n: int, shares: tuple[float, float]) -> str:
    """The split that owns (form, n): test below shares[0] of a seeded uniform hash, dev below shares[1], else train."""
    digest = hashlib.blake2b(f"{seed}:{form}:{n}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return "test" if u < shares[0] else "dev" if u < shares[1] else "train"


def synth_contexts(cfg: SynthConfig) -> list[tuple[str, str, str]]:
    """(task, source, target) of every context the corpus speaks: ASR in each language, ST from a spoken language."""
    contexts = [("asr", lang, lang) for lang in cfg.languages]
    return contexts + [("st", *pair.split("-")) for pair in cfg.st_pairs if pair.split("-")[0] in cfg.languages]


def plan_corpus(cfg: SynthConfig, seed: int) -> list[UttSpec]:
    """Decide every utterance. Splits are by (form, number): test numbers never occur in train, in any language.

    Each (form, number) belongs to one split by a seeded hash, with each split's share of the utterances, so a held-out
    split never takes more than its share of a small number space. (Until SYNTH_VERSION 5 the held-out splits drew
    first and kept every number they drew: with 3300 test utterances, test and dev held 95 of the 100 two-digit
    cardinals and most ordinals, and the model, never having heard plain "trentaquattro", wrote "centoventiquattro".)
    """
    rng = np.random.default_rng(seed)
    contexts = synth_contexts(cfg)
    sizes = {"train": cfg.n_train, "dev": cfg.n_dev, "test": cfg.n_test}
    total = sum(sizes.values())
    shares = (sizes["test"] / total, (sizes["test"] + sizes["dev"]) / total)
    specs: list[UttSpec] = []
    # Ownership is by number_split, not draw order; this order only fixes how the seeded RNG is consumed.
    for split in ("test", "dev", "train"):
        per_ctx = [sizes[split] // len(contexts) + (1 if i < sizes[split] % len(contexts) else 0)
                   for i in range(len(contexts))]
        for (task, src, tgt), count in zip(contexts, per_ctx):
            made = 0
            attempts = 0
            while made < count:
                attempts += 1
                if attempts > 200 * count + 1000:
                    raise DataError(f"corpus plan: cannot find {count} numbers owned by {split}; raise max_number")
                form = cfg.forms[int(rng.integers(len(cfg.forms)))]
                n = _sample_number(rng, form, cfg.max_number)
                if number_split(seed, form, n, shares) != split:
                    continue
                voices = clean_voices(cfg)
                variant = voices[int(rng.integers(len(voices)))]
                specs.append(UttSpec(
                    utt_id=f"{split}-{task}-{src}{tgt}-{made:05d}", split=split, task=task, source_lang=src,
                    target_lang=tgt, form=form, number=n, voice=f"{src}+{variant}",
                    rate=int(rng.integers(cfg.rate_range[0], cfg.rate_range[1] + 1)),
                    pitch=int(rng.integers(cfg.pitch_range[0], cfg.pitch_range[1] + 1)),
                    noise_seed=int(rng.integers(2**31)),
                ))
                made += 1
    if cfg.snr_db is not None:  # the older, global setting: white noise on every utterance
        specs = [replace(sp, noise="white", snr_db=float(cfg.snr_db)) for sp in specs]
    if cfg.augment is not None:
        specs = _augment_training(specs, cfg, seed)
    for k, ts in enumerate(cfg.test_sets):
        specs += _plan_test_set(ts, k, contexts, cfg, seed, shares)
    return specs


def clean_voices(cfg: SynthConfig) -> list[str]:
    """The variants of the clean splits (and of train without augment): the first voices_per_lang."""
    return list(VOICE_VARIANTS[: cfg.voices_per_lang])


def training_voices(cfg: SynthConfig) -> list[str]:
    """The variants train may use: with augment, every eSpeak NG variant but the held-out ones."""
    if cfg.augment is None:
        return clean_voices(cfg)
    return [v for v in voice_variants() if v not in cfg.heldout_voices]


def _augment_training(specs: list[UttSpec], cfg: SynthConfig, seed: int) -> list[UttSpec]:
    """Redraw the training utterances' voice, rate, pitch, noise and room (a stream of its own: dev and test keep theirs)."""
    aug = cfg.augment
    assert aug is not None
    rng = np.random.default_rng([seed, 34])
    voices = training_voices(cfg)
    out = []
    for sp in specs:
        if sp.split != "train" or rng.random() < aug.clean_share:
            out.append(sp)
            continue
        voice = voices[int(rng.integers(len(voices)))]
        rate = int(rng.integers(aug.rate_range[0], aug.rate_range[1] + 1))
        pitch = int(rng.integers(aug.pitch_range[0], aug.pitch_range[1] + 1))
        noisy = rng.random() < aug.noise_share
        noise = aug.noises[int(rng.integers(len(aug.noises)))] if noisy else "none"
        snr = round(float(rng.uniform(*aug.snr_range)), 2) if noisy else None
        rt60 = round(float(rng.uniform(*aug.rt60_range)), 3) if rng.random() < aug.reverb_share else 0.0
        out.append(replace(sp, voice=f"{sp.source_lang}+{voice}", rate=rate, pitch=pitch, noise=noise, snr_db=snr,
                           rt60=rt60, talkers=aug.babble_talkers if noise == "babble" else 0))
    return out


def _plan_test_set(ts: RobustSetConfig, k: int, contexts: list[tuple[str, str, str]], cfg: SynthConfig, seed: int,
                   shares: tuple[float, float]) -> list[UttSpec]:
    """A robustness set: test numbers only (never in train), per_context utterances per context, noise types in turn."""
    rng = np.random.default_rng([seed, 1000 + k])
    voices = list(cfg.heldout_voices) if ts.voices == "heldout" else clean_voices(cfg)
    if ts.voices == "neural":  # Piper's English voice: the contexts spoken in English
        contexts = [c for c in contexts if c[1] == PIPER_LANGUAGE]
    rate_range = ts.rate_range or cfg.rate_range
    pitch_range = ts.pitch_range or cfg.pitch_range
    specs = []
    for task, src, tgt in contexts:
        for j in range(ts.per_context):
            for _ in range(10_000):
                form = cfg.forms[int(rng.integers(len(cfg.forms)))]
                n = _sample_number(rng, form, cfg.max_number)
                if number_split(seed, form, n, shares) == "test":
                    break
            else:
                raise DataError(f"corpus plan: {ts.name}: cannot find test numbers; raise max_number")
            noise = ts.noises[j % len(ts.noises)] if ts.snr_db is not None else "none"
            specs.append(UttSpec(
                utt_id=f"{ts.name}-{task}-{src}{tgt}-{j:05d}", split=ts.name, task=task, source_lang=src, target_lang=tgt,
                form=form, number=n,
                voice=PIPER_VOICE if ts.voices == "neural" else f"{src}+{voices[int(rng.integers(len(voices)))]}",
                rate=int(rng.integers(rate_range[0], rate_range[1] + 1)),
                pitch=int(rng.integers(pitch_range[0], pitch_range[1] + 1)), noise_seed=int(rng.integers(2**31)),
                noise=noise, snr_db=ts.snr_db, talkers=3 if noise == "babble" else 0,
            ))
    return specs


def degrade(audio: np.ndarray, spec: UttSpec, others: list[np.ndarray], sample_rate: int) -> np.ndarray:
    """The spec's room and noise applied to its clean audio; `others`: clean utterances of its chunk, for babble."""
    rng = np.random.default_rng(spec.noise_seed)
    if spec.rt60 > 0:
        audio = reverberate(audio, spec.rt60, sample_rate, rng)
    if spec.noise != "none" and spec.snr_db is not None:
        noise = (babble(audio.shape[0], others, spec.talkers, rng) if spec.noise == "babble" and others
                 else colored_noise("pink" if spec.noise == "babble" else spec.noise, audio.shape[0], rng))
        audio = mix_at_snr(audio, noise, spec.snr_db)
    return audio


_ENGINE: ESpeak | None = None


def _clean(spec: UttSpec, sample_rate: int, piper=None) -> np.ndarray:  # noqa: ANN001
    """The utterance as eSpeak NG (or, for the neural voice, Piper) says it, at the target rate."""
    import torch
    import torchaudio.functional as AF

    text = spoken_text(number_text(spec.number, spec.source_lang, spec.form), spec.source_lang)
    if spec.voice == PIPER_VOICE:
        wav, rate = torch.from_numpy(piper.synth(text, spec.rate)), piper.sample_rate
    else:
        assert _ENGINE is not None, "rendered outside _render_chunk"
        wav, rate = torch.from_numpy(_ENGINE.synth(text, spec.voice, spec.rate, spec.pitch).astype(np.float32) / 32768.0), _ENGINE.sample_rate
    if rate != sample_rate:
        wav = AF.resample(wav, rate, sample_rate)
    return wav.numpy()


def _write(audio: np.ndarray, spec: UttSpec, out_dir: str, sample_rate: int, fmt: str) -> None:
    import soundfile as sf

    path = Path(out_dir) / spec.split / f"{spec.utt_id}.{fmt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp.{fmt}")
    sf.write(tmp, np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16", format=fmt.upper())
    os.replace(tmp, path)


def _render_chunk(args: tuple[int, list[UttSpec], str, int, str]) -> list[tuple[str, int]]:
    """Render one chunk of the plan in this (fresh) worker process (see SYNTH_CHUNK); returns (utt_id, samples).

    The chunk's clean utterances are rendered first: babble mixes the others of the same chunk (one split)."""
    rng_seed, specs, out_dir, sample_rate, fmt = args
    global _ENGINE
    import torch

    torch.set_num_threads(1)
    piper = None
    if any(sp.voice == PIPER_VOICE for sp in specs):  # a fresh, seeded session per chunk, as eSpeak's state below
        from prune_cli.data.neural_voice import Piper

        piper = Piper(rng_seed)
    if _ENGINE is None and any(sp.voice != PIPER_VOICE for sp in specs):
        _ENGINE = ESpeak()
    if _ENGINE is not None:
        _ENGINE.lib.espeak_ng_SetRandSeed(ctypes.c_long(rng_seed))
    clean = [_clean(sp, sample_rate, piper) for sp in specs]
    out = []
    for i, sp in enumerate(specs):
        audio = degrade(clean[i], sp, clean[:i] + clean[i + 1 :], sample_rate)
        _write(audio, sp, out_dir, sample_rate, fmt)
        out.append((sp.utt_id, int(audio.shape[0])))
    return out


def build_corpus(
    cfg: SynthConfig, manifest_dir: Path, sample_rate: int, seed: int, progress_cb=None,  # noqa: ANN001
    chunk: int = SYNTH_CHUNK, specs: list[UttSpec] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Render the corpus and write manifests. Returns {split: {context_key: {utts, hours}}}.
    specs: plan_corpus(cfg, seed), when the caller has it already (for a progress total)."""
    from prune_cli.contexts import context_key

    specs = plan_corpus(cfg, seed) if specs is None else specs
    out_dir = Path(cfg.out_dir).resolve()
    splits = list(dict.fromkeys(s.split for s in specs))
    tasks = []
    for split in splits:  # a chunk holds one split: babble never mixes another split's audio in
        first = next(i for i, s in enumerate(specs) if s.split == split)
        members = [s for s in specs if s.split == split]
        tasks += [((seed * 100_003 + first + start) % 2**31, members[start : start + chunk], str(out_dir), sample_rate,
                   cfg.audio_format) for start in range(0, len(members), chunk)]
    n_samples: dict[str, int] = {}
    workers = max(1, min(cfg.workers, os.cpu_count() or 1, len(tasks)))
    # maxtasksperchild=1: each chunk gets a fresh process, whatever the worker count (1 included).
    with mp.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
        for rendered in pool.imap_unordered(_render_chunk, tasks):
            n_samples.update(rendered)
            if progress_cb:
                progress_cb(len(rendered))
    manifest_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for split in ["train", "dev", "test"] + [ts.name for ts in cfg.test_sets]:
        rows = []
        for s in (s for s in specs if s.split == split):
            audio = out_dir / split / f"{s.utt_id}.{cfg.audio_format}"
            duration = round(n_samples[s.utt_id] / sample_rate, 4)
            source_text = number_text(s.number, s.source_lang, s.form)
            rows.append({
                "audio_filepath": os.path.relpath(audio, manifest_dir.resolve()),
                "duration": duration,
                "text": number_text(s.number, s.target_lang, s.form) if s.task == "st" else source_text,
                "source_text": source_text,
                "task": s.task,
                "source_lang": s.source_lang,
                "target_lang": s.target_lang,
                "speaker": s.voice,
                "condition": s.condition,
                "utt_id": s.utt_id,
                "meta": {**{k: v for k, v in asdict(s).items() if k in ("form", "number", "rate", "pitch", "noise", "snr_db", "rt60")},
                         "spoken": spoken_text(source_text, s.source_lang)},
            })
            key = context_key(s.task, s.source_lang, s.target_lang)
            entry = summary.setdefault(split, {}).setdefault(key, {"utts": 0, "hours": 0.0})
            entry["utts"] += 1
            entry["hours"] += duration / 3600
        atomic_write_text(manifest_dir / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return summary

