"""Manifests: JSONL (NeMo-compatible names) and Kaldi/ESPnet data dirs, read into typed utterances.

Problems are reported as `file:line: message`, one per line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from prune_cli.contexts import context_key, language_problem, task_problem
from prune_cli.data.config import ContextDefaults
from prune_cli.errors import DataError


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    audio: Path
    duration: float
    text: str
    task: str
    source_lang: str
    target_lang: str
    speaker: str
    source_text: str | None
    where: str  # file:line, for error messages
    condition: str = ""  # the acoustic condition the manifest names (`condition`: clean, snr10, ...), if any
    context_defaulted: bool = False  # task or source language came from the defaults, not from the data

    @property
    def context(self) -> str:
        return context_key(self.task, self.source_lang, self.target_lang)


NO_CONTEXT = "names no task or source language"


def collapse_missing_context(path: Path, problems: list[str]) -> list[str]:
    """One line for every utterance that names no context and was given none, not one per utterance."""
    missing = [p for p in problems if p.endswith(NO_CONTEXT)]
    if not missing:
        return problems
    first = missing[0][: -len(NO_CONTEXT) - 2]
    return [p for p in problems if not p.endswith(NO_CONTEXT)] + [
        f"{path}: {len(missing)} utterance(s) name no task or source language (first: {first}); give the context: "
        "--context TASK:LANG (e.g. asr:de, st:de-en), the recipe's data.defaults, or utt2task/utt2lang in a Kaldi dir"]


def _context_problems(task: object, src: object, tgt: object) -> list[str]:
    """Any task label and any ISO 639 code are accepted by form; the run's vocabulary is read from its training data."""
    if not all(isinstance(x, str) for x in (task, src, tgt)):
        return [f"task, source_lang and target_lang must be strings, got {task!r}, {src!r}, {tgt!r}"]
    probs = [f"task {p}" for p in [task_problem(task)] if p]
    probs += [f"{name} {p}" for name, lang in (("source_lang", src), ("target_lang", tgt)) for p in [language_problem(lang)] if p]
    if task == "asr" and src != tgt and not probs:
        probs.append(f"asr utterance with source_lang {src!r} != target_lang {tgt!r}")
    if task == "st" and src == tgt and not probs:
        probs.append(f"st utterance with the same source and target language {src!r} (that is asr)")
    return probs


def parse_row(row: object, where: str, base: Path, defaults: ContextDefaults) -> tuple[Utterance | None, list[str]]:
    if not isinstance(row, dict):
        return None, [f"{where}: expected a JSON object, got {type(row).__name__}"]
    probs: list[str] = []
    for key in ("audio_filepath", "text"):
        if key not in row:
            probs.append(f"{where}: missing required field {key!r}")
    if probs:
        return None, probs
    text = row["text"]
    if not isinstance(text, str) or not text.strip():
        probs.append(f"{where}: empty or whitespace-only text")
    task = row.get("task", defaults.task)
    src = row.get("source_lang", defaults.source_lang)
    tgt = row.get("target_lang") or defaults.target_lang or src
    if task is None or src is None:
        return None, probs + [f"{where}: {NO_CONTEXT}"]
    if task == "st" and not (row.get("target_lang") or defaults.target_lang):  # a translation's target is never implied
        return None, probs + [f"{where}: an st utterance names no target_lang (the language its text is in); "
                              "add the field, or give data.defaults.target_lang / --context TASK:SRC-TGT"]
    probs += [f"{where}: {p}" for p in _context_problems(task, src, tgt)]
    duration = row.get("duration")
    if duration is not None and (not isinstance(duration, (int, float)) or duration <= 0):
        probs.append(f"{where}: bad duration {duration!r}")
    audio = Path(row["audio_filepath"])
    if not audio.is_absolute():
        audio = base / audio
    if probs:
        return None, probs
    utt = Utterance(
        utt_id=str(row.get("utt_id") or row.get("id") or f"{Path(where.split(':')[0]).stem}-{where.rsplit(':', 1)[1]}"),
        audio=audio, duration=float(duration or 0.0), text=" ".join(text.split()), task=task,
        source_lang=src, target_lang=tgt, speaker=str(row.get("speaker", "unknown")),
        source_text=row.get("source_text"), where=where, condition=str(row.get("condition") or ""),
        context_defaulted="task" not in row or "source_lang" not in row,
    )
    return utt, []


def read_jsonl(path: Path, defaults: ContextDefaults) -> tuple[list[Utterance], list[str]]:
    """Parse a manifest. Returns the good utterances and one message per problem line."""
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    utts: list[Utterance] = []
    problems: list[str] = []
    base = path.resolve().parent
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"{where}: not valid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: invalid JSON: {e.msg} (column {e.colno})")
                continue
            utt, probs = parse_row(row, where, base, defaults)
            problems += probs
            if utt is not None:
                utts.append(utt)
    return utts, collapse_missing_context(path, problems)


def _read_table(path: Path, problems: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"{path}:{lineno}: not valid UTF-8")
            continue
        parts = line.strip().split(maxsplit=1)
        if parts:
            out[parts[0]] = parts[1] if len(parts) > 1 else ""
    return out


def read_kaldi_dir(d: Path, defaults: ContextDefaults) -> tuple[list[Utterance], list[str]]:
    """Kaldi/ESPnet data dir: wav.scp, text, utt2spk; optional utt2lang, utt2task, utt2tgtlang, text.src.

    wav.scp entries must be plain paths (no pipes); they are resolved relative to the data dir.
    """
    wav_scp = d / "wav.scp"
    if not wav_scp.is_file() or not (d / "text").is_file():
        raise DataError(f"{d}: not a Kaldi data dir (needs wav.scp and text)")
    problems: list[str] = []
    wavs, texts = _read_table(wav_scp, problems), _read_table(d / "text", problems)
    spk, lang, task, tgt = (_read_table(d / n, problems) for n in ("utt2spk", "utt2lang", "utt2task", "utt2tgtlang"))
    src_text = _read_table(d / "text.src", problems)
    durs = _read_table(d / "utt2dur", problems)
    utts: list[Utterance] = []
    for lineno, (uid, wav) in enumerate(wavs.items(), 1):
        where = f"{wav_scp}:{lineno}"
        if wav.endswith("|"):
            problems.append(f"{where}: piped wav.scp entries are not supported; convert to files first")
            continue
        if uid not in texts:
            problems.append(f"{where}: utterance {uid} has no entry in text")
            continue
        row = {"audio_filepath": wav, "text": texts[uid], "utt_id": uid, "speaker": spk.get(uid, "unknown")}
        if uid in task:
            row["task"] = task[uid]
        if uid in lang:
            row["source_lang"] = lang[uid]
        if uid in tgt:
            row["target_lang"] = tgt[uid]
        if uid in src_text:
            row["source_text"] = src_text[uid]
        if uid in durs:
            row["duration"] = float(durs[uid])
        utt, probs = parse_row(row, where, d.resolve(), defaults)
        problems += probs
        if utt is not None:
            utts.append(utt)
    return utts, collapse_missing_context(d, problems)


def read_any(path: Path, defaults: ContextDefaults) -> tuple[list[Utterance], list[str]]:
    """A JSONL manifest or a Kaldi dir: its utterances (a repeated id keeps its first line) and one line per problem."""
    utts, problems = read_kaldi_dir(path, defaults) if path.is_dir() else read_jsonl(path, defaults)
    first: dict[str, Utterance] = {}
    unique: list[Utterance] = []
    for u in utts:
        if u.utt_id in first:
            problems.append(f"{u.where}: duplicate utterance id {u.utt_id!r} (first at {first[u.utt_id].where})")
        else:
            first[u.utt_id] = u
            unique.append(u)
    return unique, problems


def split_path(manifest_dir: str, kaldi_dir: str | None, split: str) -> Path:
    if kaldi_dir:
        return Path(kaldi_dir) / split
    return Path(manifest_dir) / f"{split}.jsonl"


def split_fingerprint(manifest_dir: str, kaldi_dir: str | None, split: str) -> str:
    """Hash of a split's manifest (or Kaldi dir files): it changes when the data does, so caches and stages redo."""
    return fingerprint(split_path(manifest_dir, kaldi_dir, split))


def fingerprint(path: Path) -> str:
    """Hash of a manifest, or of a Kaldi dir's files (names and bytes): it changes when the data does."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.is_file() else b"<missing>")
    return h.hexdigest()[:16]
