"""Reproducibility: compare a run's results and masks with another run's, and name what differs between their machines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prune_cli.recipe_schema import CheckConfig
from prune_cli.runs import BITWISE_ENV_KEYS


def env_differences(run_dir: Path, other: Path) -> list[str]:
    """The env.json fields, among those that decide bit-identical results, on which two runs differ."""
    envs = []
    for d in (run_dir, other):
        try:
            envs.append(json.loads((d / "env.json").read_text()))
        except (OSError, ValueError):
            envs.append({})
    a, b = envs
    return [f"{k} {a.get(k, 'not recorded')!r} vs {b.get(k, 'not recorded')!r}" for k in BITWISE_ENV_KEYS if a.get(k) != b.get(k)]


def check_against(run_dir: Path, other: Path, tol: dict[str, float]) -> list[str]:
    """Differences beyond tolerance between two runs' eval summaries and masks, one line each."""
    problems: list[str] = []
    for rel in ("eval/summary.json", "masks.json"):
        for d in (run_dir, other):
            if not (d / rel).is_file():
                problems.append(f"{d / rel}: missing")
    if problems:
        return problems
    a = json.loads((run_dir / "eval" / "summary.json").read_text())
    b = json.loads((other / "eval" / "summary.json").read_text())
    for v in sorted(set(a["variants"]) | set(b["variants"])):
        ta, tb = a["variants"].get(v, {}), b["variants"].get(v, {})
        for ctx in sorted(set(ta) | set(tb)):
            if ctx not in ta or ctx not in tb:
                problems.append(f"eval {v} {ctx}: present in only one run")
                continue
            for m in sorted(set(ta[ctx]) | set(tb[ctx])):
                if m == "n":
                    if ta[ctx].get("n") != tb[ctx].get("n"):
                        problems.append(f"eval {v} {ctx}: n {ta[ctx].get('n')} != {tb[ctx].get('n')}")
                    continue
                x, y = ta[ctx].get(m), tb[ctx].get(m)
                if x is None or y is None or abs(x - y) > tol.get(m, 0.0):
                    problems.append(f"eval {v} {ctx} {m}: {x} vs {y} (tolerance {tol.get(m, 0.0)})")
    ma = json.loads((run_dir / "masks.json").read_text())
    mb = json.loads((other / "masks.json").read_text())
    if ma["modules"] != mb["modules"]:
        problems.append("masks: different module lists")
    for v in sorted(set(ma["variants"]) | set(mb["variants"])):
        for ctx in sorted(set(ma["variants"].get(v, {})) | set(mb["variants"].get(v, {}))):
            x, y = ma["variants"].get(v, {}).get(ctx), mb["variants"].get(v, {}).get(ctx)
            if x != y:
                diff = "missing" if x is None or y is None else f"{sum(p != q for p, q in zip(x, y))} module(s) differ"
                problems.append(f"masks {v} {ctx}: {diff}")
    return problems


def check_report(run_dir: Path, other: Path, tol: CheckConfig) -> dict[str, Any]:
    """`run --check-against`: the differences beyond the recipe's tolerances, and the env fields the machines differ in."""
    problems = check_against(run_dir, other, {"wer": tol.wer, "cer": tol.cer, "bleu": tol.bleu, "chrf": tol.chrf})
    return {"against": str(other), "ok": not problems, "differences": problems,
            "env_differences": env_differences(run_dir, other)}


def check_messages(check: dict[str, Any]) -> list[str]:
    """One line per difference, then why a rerun elsewhere may not match to the last bit."""
    lines = list(check["differences"])
    if lines and check["env_differences"]:
        lines.append(f"note: the runs differ in {'; '.join(check['env_differences'])}; results are bit-identical only on the "
                     "same kernels and thread count, so set tolerances (check.wer, check.bleu, ...) across machines")
    return lines
