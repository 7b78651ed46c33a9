"""The README's results script: mask-structure summary (pure Python), and its output on the smoke run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pruning_ratios.py"


def _script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("pruning_ratios", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mask_structure_counts_distinct_masks_and_skips_by_task_and_kind(capsys: pytest.CaptureFixture[str]) -> None:
    modules = ["encoder.0.ffn1", "encoder.0.attn", "decoder.0.self_attn", "decoder.0.src_attn",
               "decoder.1.self_attn", "decoder.1.src_attn"]
    context = {"asr:de": [1, 0, 1, 0, 1, 0], "asr:en": [1, 0, 0, 0, 1, 1], "st:de-en": [1, 0, 0, 1, 1, 1]}
    stats = {ctx: {"sparsity_encoder": 0.5, "sparsity_decoder": (4 - sum(v[2:])) / 4} for ctx, v in context.items()}
    _script().print_mask_structure({"modules": modules, "variants": {"context": context}, "stats": {"context": stats}})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("context masks: mean sparsity enc / dec asr 0.500 / 0.500, st 0.500 / 0.250; "
                      "distinct masks: encoder 1, decoder 3 of 3 contexts")
    # asr: cross-attention skipped 2 + 1 times over 2 contexts, self-attention 0 + 1; st: one self-attention
    assert out[1] == "  asr contexts, modules skipped per context by kind: decoder.self_attn 0.50, decoder.src_attn 1.50, encoder.attn 1.00"
    assert out[2] == "  st contexts, modules skipped per context by kind: decoder.self_attn 1.00, encoder.attn 1.00"
    meta = {"cross_attention_restored": {"context": ["asr:de"], "static": []}}
    _script().print_mask_structure({"modules": modules, "variants": {"context": context}, "stats": {"context": stats},
                                    "meta": meta})
    assert capsys.readouterr().out.splitlines()[1] == "  gates.min_cross_attention restored cross-attention in asr:de"


def test_results_script_prints_quality_cost_and_the_bootstrap_intervals(smoke_run: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    _script().main(smoke_run)
    out = capsys.readouterr().out
    ev = json.loads((smoke_run / "eval" / "summary.json").read_text())
    wer = next(p for p in ev["comparisons"]["pairs"] if (p["a"], p["b"]) == ("context", "static"))["metrics"]["wer"]
    line = next(x for x in out.splitlines() if x.startswith("context - static, 95% interval, p: "))
    assert f"WER {wer['diff']:+.2f} [{wer['ci95'][0]:+.2f}, {wer['ci95'][1]:+.2f}] p {wer['p']:.3f}" in line
    assert "| context |" in out and "FLOPs -" in out


def test_results_script_without_a_profile_prints_quality_only(tmp_path: Path, smoke_run: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    shutil.copytree(smoke_run / "eval", tmp_path / "eval")  # a run stopped after eval: no profile, no masks
    _script().main(tmp_path)
    out = capsys.readouterr().out
    assert out.startswith("no profile/summary.json: quality only") and "| static |" in out
    assert "FLOPs" not in out and "context - static, 95% interval" in out
