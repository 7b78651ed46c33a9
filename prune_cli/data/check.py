"""`data check`: validate manifests line by line, including the audio each line points to."""

from __future__ import annotations

from pathlib import Path

from prune_cli.data.audio import load_audio, probe
from prune_cli.data.manifest import read_any
from prune_cli.errors import DataError
from prune_cli.recipe import ContextDefaults


def check_manifest(path: Path, sample_rate: int, tolerance_s: float, defaults: ContextDefaults) -> tuple[int, list[str]]:
    """Returns (utterances checked, problems as `file:line: message`)."""
    try:
        utts, problems = read_any(path, defaults)
    except DataError as e:
        return 0, e.problems
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
        if frames != wav.shape[0]:
            problems.append(f"{u.where}: header says {frames} samples but {wav.shape[0]} decode (truncated file?)")
        if u.duration and abs(actual - u.duration) > tolerance_s:
            problems.append(f"{u.where}: duration {u.duration:.3f}s in manifest, audio is {actual:.3f}s")
    problems.sort(key=_line_order)
    return len(utts), problems


def _line_order(msg: str) -> tuple[str, int]:
    parts = msg.split(":")
    try:
        return parts[0], int(parts[1])
    except (IndexError, ValueError):
        return parts[0], 0
