"""Featurized splits, length-bucketed batches bounded by total frames, rank sharding, and collation."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from prune_cli.atomic import atomic_torch_save
from prune_cli.data.audio import load_audio
from prune_cli.data.config import ContextDefaults
from prune_cli.data.features import apply_cmvn, fbank
from prune_cli.data.manifest import Utterance, read_any
from prune_cli.data.owsm_features import owsm_frames
from prune_cli.data.tokenizer import Tokenizer
from prune_cli.data.whisper_features import whisper_frames
from prune_cli.errors import DataError, MissingInputError
from prune_cli.progress import log, progress, warn

IGNORE = -100


@dataclass
class Split:
    """A split with its features computed once (fp16, before CMVN)."""

    utts: list[Utterance]
    feats: list[torch.Tensor]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.utts)


@dataclass(frozen=True)
class SplitSpec:
    """What to read for a split and how to featurize it: plain values, no recipe."""

    path: Path  # a JSONL manifest or a Kaldi data dir
    defaults: ContextDefaults
    sample_rate: int
    n_mels: int
    on_error: str  # fail | skip
    max_frames: int | None = None  # the longest input the model takes, in 10 ms frames
    frontend: str = "fbank"  # fbank (kaldi, then CMVN) | whisper (Whisper's log-mel) | owsm (ESPnet's log-mel)


# Stored features per front end (the 30-s ones stored short: see whisper_frames, owsm_frames).
FRONTENDS: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    "fbank": fbank,
    "whisper": lambda wav, sample_rate, n_mels: whisper_frames(wav, n_mels),
    "owsm": lambda wav, sample_rate, n_mels: owsm_frames(wav, n_mels),
}


def load_split(spec: SplitSpec, cache: Path | None = None) -> Split:
    """Read, validate and featurize a split. Bad utterances stop the run, or are skipped with data.on_error=skip."""
    if cache is not None and cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            utts = [Utterance(**{**u, "audio": Path(u["audio"])}) for u in blob["utts"]]
            return Split(utts, blob["feats"], blob["skipped"])
        except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt, never trusted
            cache.unlink(missing_ok=True)
    if not spec.path.exists():
        if spec.path.suffix != ".jsonl":
            raise MissingInputError(f"{spec.path}: Kaldi data dir not found; data.kaldi_dir needs train/ dev/ test/ "
                                    "subdirs, each with wav.scp and text")
        raise MissingInputError(f"{spec.path}: manifest not found; build the demo corpus with `prune-cli data synth RECIPE` "
                                "or point data.manifest_dir / data.kaldi_dir at your data")
    utts, problems = read_any(spec.path, spec.defaults)
    fail = spec.on_error == "fail"
    name = spec.path.stem if spec.path.is_file() else spec.path.name
    if problems and fail:
        raise DataError(problems + [f"{len(problems)} problem(s) in the {name} manifest (data.on_error=skip skips them)"])
    good: list[Utterance] = []
    feats: list[torch.Tensor] = []
    too_long: list[str] = []
    bad: list[str] = []  # what on_error=skip skipped, for the warning
    off_duration: list[str] = []
    skipped = len(problems)
    with progress(f"features {name}", total=len(utts)) as bar:
        for u in utts:
            bar.advance()
            try:
                wav = load_audio(u.audio, spec.sample_rate)
            except DataError as e:
                if fail:
                    raise DataError(f"{u.where}: {e.problems[0]}") from None
                bad.append(f"{u.where}: {e.problems[0]}")
                skipped += 1
                continue
            actual = wav.shape[0] / spec.sample_rate
            if u.duration and abs(u.duration - actual) > 0.1 * actual:
                off_duration.append(f"{u.where}: duration {u.duration:g} s, the audio is {actual:.2f} s")
            f = FRONTENDS[spec.frontend](wav, spec.sample_rate, spec.n_mels)
            if f.shape[0] < 8:
                if fail:
                    raise DataError(f"{u.where}: audio too short ({wav.shape[0]} samples)")
                skipped += 1
                continue
            if spec.max_frames is not None and f.shape[0] > spec.max_frames:
                too_long.append(f"{u.where}: {f.shape[0] / 100:.1f} s is longer than the model takes "
                                f"({spec.max_frames / 100:.1f} s)")
                skipped += 1
                continue
            good.append(u)
            feats.append(f.to(torch.float16))
    if too_long and fail:  # all of them, before any training step
        raise DataError(too_long + [f"{len(too_long)} utterance(s) too long in the {name} manifest "
                                    "(data.on_error=skip skips them)"])
    if skipped:
        log(f"{name}: skipped {skipped} bad utterance(s) (data.on_error=skip)")
    for line in bad[:3]:
        warn(f"skipped {line}")
    if off_duration:  # the audio is what is decoded; a wrong duration misleads whoever reads the manifest
        warn(f"{spec.path}: {len(off_duration)} utterance(s) whose manifest duration is more than 10% off the audio, "
             f"e.g. {off_duration[0]}")
    defaulted = sum(u.context_defaulted for u in good)
    if defaulted:
        d = spec.defaults
        given = ", ".join(f"{k} {v}" for k, v in vars(d).items() if v)
        warn(f"{spec.path}: {defaulted} of {len(good)} utterances have no task or source language and took the default "
             f"context ({given}; data.defaults or --context)")
    if not good:
        raise DataError(f"{name}: no usable utterances")
    out = Split(good, feats, skipped)
    if cache is not None:
        plain = [{**asdict(u), "audio": str(u.audio)} for u in good]  # plain data: the cache loads with weights_only
        atomic_torch_save(cache, {"utts": plain, "feats": feats, "skipped": skipped})
    return out


def make_batches(
    lengths: list[int], max_frames: int, seed: int, epoch: int, shuffle: bool = True
) -> list[list[int]]:
    """Sort by length, cut into batches whose padded size stays under `max_frames`, then shuffle batch order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and new_max * (len(cur) + 1) > max_frames:
            batches.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    if shuffle:
        random.Random(seed * 7919 + epoch).shuffle(batches)
    return batches


def shard(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """Each rank takes every world-th batch; the tail is trimmed so all ranks step together under DDP."""
    if world == 1:
        return batches
    n = len(batches) // world * world
    return batches[rank:n:world]


@dataclass
class Batch:
    feats: torch.Tensor  # (B, T, F) normalized
    feat_lens: torch.Tensor  # (B,)
    dec_in: torch.Tensor  # (B, U) prompt + target tokens
    dec_out: torch.Tensor  # (B, U) next-token labels, IGNORE on prompt/pad
    ctc_targets: torch.Tensor  # (B, S) padded source transcript tokens
    ctc_lens: torch.Tensor  # (B,) 0 where no source transcript is known
    task: list[str]
    source_lang: list[str]
    target_lang: list[str]
    speaker: list[str]
    condition: list[str]
    index: list[int]

    def to(self, device: torch.device) -> "Batch":
        for name in ("feats", "feat_lens", "dec_in", "dec_out", "ctc_targets", "ctc_lens"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        return self


@dataclass(frozen=True)
class InputSpec:
    """How stored features become the model's input."""

    cmvn: dict[str, torch.Tensor] | None  # fbank: global mean/variance normalization
    pad_to: int | None = None  # Whisper's 30-s input: every utterance padded to this many frames with its silence frame


def model_inputs(split: Split, idx: Sequence[int], spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, F) padded input and (B,) true lengths of the utterances `idx`."""
    feats = [split.feats[i].float() for i in idx]
    if spec.cmvn is not None:
        feats = [apply_cmvn(f, spec.cmvn) for f in feats]
    lens = torch.tensor([f.shape[0] for f in feats])
    if spec.pad_to is not None:  # a Whisper utterance ends with a frame of the padding's (silence) value
        feats = [torch.cat([f, f[-1:].expand(spec.pad_to - f.shape[0], -1)]) for f in feats]
    return torch.nn.utils.rnn.pad_sequence(feats, batch_first=True), lens


def collate(split: Split, idx: list[int], tok: Tokenizer, inputs: InputSpec, max_len: int) -> Batch:
    x, lens = model_inputs(split, idx, inputs)
    eos = tok.eos
    seqs_in, seqs_out, ctc = [], [], []
    for i in idx:
        u = split.utts[i]
        prompt = tok.prompt(u.task, u.source_lang, u.target_lang)
        y = tok.encode(u.text)[: max_len - len(prompt) - 1]
        seqs_in.append(torch.tensor(prompt + y))
        seqs_out.append(torch.tensor([IGNORE] * (len(prompt) - 1) + y + [eos]))
        src = u.text if u.task == "asr" else (u.source_text or "")
        ctc.append(torch.tensor(tok.encode(src) if src else [], dtype=torch.long))
    dec_in = torch.nn.utils.rnn.pad_sequence(seqs_in, batch_first=True, padding_value=eos)
    dec_out = torch.nn.utils.rnn.pad_sequence(seqs_out, batch_first=True, padding_value=IGNORE)
    ctc_lens = torch.tensor([len(c) for c in ctc])
    ctc_targets = torch.nn.utils.rnn.pad_sequence(ctc, batch_first=True, padding_value=0) if ctc_lens.sum() else torch.zeros(len(idx), 1, dtype=torch.long)
    us = [split.utts[i] for i in idx]
    return Batch(
        x, lens, dec_in, dec_out, ctc_targets, ctc_lens, [u.task for u in us], [u.source_lang for u in us],
        [u.target_lang for u in us], [u.speaker for u in us], [u.condition for u in us], list(idx),
    )
