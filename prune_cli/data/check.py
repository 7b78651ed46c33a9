"""`data check`: validate manifests line by line, including the audio each line points to."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from prune_cli.data.audio import load_audio, probe, wav_header_frames
from prune_cli.data.config import ContextDefaults
from prune_cli.data.manifest import read_any
from prune_cli.errors import DataError


class ManifestReport(NamedTuple):
    utterances: int
    problems: list[str]  # `file:line: message`, in line order
    contexts: dict[str, dict[str, float]]  # context key -> {"utterances", "hours"} of the audio that decoded
    defaulted: int  # utterances whose context came from the defaults


def check_manifest(path: Path, sample_rate: int, tolerance_s: float, defaults: ContextDefaults,
                   max_seconds: float | None = None) -> ManifestReport:
    """Every line and the audio it points to: problems (duplicate ids and over-long audio included), and the contexts found."""
    try:
        utts, problems = read_any(path, defaults)
    except DataError as e:
        return ManifestReport(0, e.problems, {}, 0)
    contexts: dict[str, dict[str, float]] = {}
    for u in utts:
        try:
            sr, frames = probe(u.audio)
            wav = load_audio(u.audio, sr)  # decodes the whole file: catches truncation the header hides
        except DataError as e:
            problems.append(f"{u.where}: {e.problems[0]}")
            continue
        if sr != sample_rate:
            problems.append(f"{u.where}: sample rate {sr} Hz, expected {sample_rate} Hz (it would be resampled)")
        actual = wav.shape[0] / sr
        c = contexts.setdefault(u.context, {"utterances": 0, "hours": 0.0})
        c["utterances"] += 1
        c["hours"] += actual / 3600
        declared = wav_header_frames(u.audio)
        if declared is not None and declared != frames:
            problems.append(f"{u.where}: WAV header declares {declared} samples but the file holds {frames} (truncated file)")
        elif frames != wav.shape[0]:
            problems.append(f"{u.where}: header says {frames} samples but {wav.shape[0]} decode (truncated file?)")
        if max_seconds is not None and actual > max_seconds:
            problems.append(f"{u.where}: {actual:.1f} s is longer than the model takes ({max_seconds:.1f} s)")
        if u.duration and abs(actual - u.duration) > tolerance_s:
            problems.append(f"{u.where}: duration {u.duration:.3f}s in manifest, audio is {actual:.3f}s")
    problems.sort(key=_line_order)
    contexts = {k: {"utterances": v["utterances"], "hours": round(v["hours"], 4)} for k, v in sorted(contexts.items())}
    return ManifestReport(len(utts), problems, contexts, sum(u.context_defaulted for u in utts))


def _line_order(msg: str) -> tuple[str, int]:
    parts = msg.split(":")
    try:
        return parts[0], int(parts[1])
    except (IndexError, ValueError):
        return parts[0], 0
