"""The whole pipeline on ci_smoke: outputs, reproducibility, resumable stages, eval metrics, profile, sweep."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import jiwer
import numpy as np
import pytest
import sacrebleu

from conftest import cli, read_json
from prune_cli.data.normalize import normalize
from prune_cli.engine.compare import sign_flip_p
from prune_cli.engine.profile import Timer, measure_interleaved, stats_ms
from prune_cli.engine.runner import _share_base, mark_complete
from prune_cli.errors import CheckpointError
from prune_cli.gating.masks import MaskFile
from prune_cli.recipe import load_recipe
from prune_cli.recipe_yaml import RECIPES_DIR
from prune_cli.runs import RunDir


def test_run_writes_every_stage_output(smoke_run: Path, smoke_corpus: list[str]) -> None:
    for rel in ("config.yaml", "env.json", "metrics.json", "masks.json", "eval/summary.json", "profile/summary.json",
                "report.md", "plots/masks_context.png", "plots/cost.png", "checkpoints/base.pt", "checkpoints/gates.pt",
                "checkpoints/static.pt", "tokenizer/tokenizer.json", "cmvn.pt", "logs/base.jsonl", "logs/gates.jsonl"):
        assert (smoke_run / rel).is_file(), rel
    env = read_json(smoke_run / "env.json")
    for key in ("python", "torch", "torchaudio", "device", "git_commit", "seed", "torch_threads", "command"):
        assert key in env
    ev = read_json(smoke_run / "eval" / "summary.json")
    assert set(ev["variants"]) == {"dense", "context", "static"}
    for table in ev["variants"].values():
        assert len(table) == 11
        for ctx, sc in table.items():
            assert set(sc) == ({"n", "wer", "cer"} if ctx.startswith("asr") else {"n", "bleu", "chrf"})
    assert "BLEU" in ev["signatures"]["bleu"] or "nrefs" in ev["signatures"]["bleu"]
    pr = read_json(smoke_run / "profile" / "summary.json")
    assert pr["device"].startswith("cpu")
    for v in ("dense", "context", "static"):
        f = pr["variants"][v]["flops"]
        assert f["total"] == f["encoder"] + f["decoder"] + f["other"] and f["encoder"] > 0 and f["decoder"] > 0
        assert set(pr["variants"][v]["latency_ms"]) >= {"median", "p90"}
    assert set(pr["ratios"]) == {"context", "static"}
    masks = read_json(smoke_run / "masks.json")
    assert set(masks["variants"]) == {"context", "static", "random", "layerdrop"}
    assert len(masks["masks"]) == 11 and all(len(v) == len(masks["modules"]) for v in masks["masks"].values())
    # the cross-attention floor (on by default) holds in every learned mask, and masks.json says what it changed
    cross = [i for i, name in enumerate(masks["modules"]) if name.endswith(".src_attn")]
    assert masks["meta"]["min_cross_attention"] == 1 and set(masks["meta"]["cross_attention_restored"]) == {"context", "static"}
    assert all(sum(keep[i] for i in cross) >= 1 for v in ("context", "static") for keep in masks["variants"][v].values())
    report = (smoke_run / "report.md").read_text()
    assert "## Quality" in report and "## Cost" in report
    # translation rows carry BLEU and chrF, as the eval summary has them; each metric has its average row
    ev = read_json(smoke_run / "eval" / "summary.json")
    st = next(c for c in ev["variants"]["dense"] if c.startswith("st:") and c not in ev.get("bleu_unscorable", []))
    sc = ev["variants"]["dense"][st]
    assert f"| {st} | {sc['bleu']:.2f} / {sc['chrf']:.2f} |" in report
    assert f"| **avg chrF (st)** | {ev['averages']['dense']['chrf']:.2f} |" in report
    # the rerun commands carry the run's overrides and run dir, and nothing else (a list once leaked into them)
    rerun = report.split("## Rerun each stage", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    overrides = [x for x in smoke_corpus if x != "--set"]
    tail = [a for o in overrides for a in ("--set", o)] + ["--run-dir", str(smoke_run)]
    assert [shlex.split(line) for line in rerun] == [
        *(["prune-cli", "train", str(RECIPES_DIR / "ci_smoke.yaml"), "--stage", stage, *tail] for stage in ("base", "gates")),
        *(["prune-cli", cmd, str(RECIPES_DIR / "ci_smoke.yaml"), *tail] for cmd in ("prune", "eval", "profile")),
    ]


def test_run_scores_the_robustness_sets_and_reports_them_side_by_side(smoke_run: Path) -> None:
    ev = read_json(smoke_run / "eval" / "summary.json")
    report = (smoke_run / "report.md").read_text()
    assert "## Robustness: every test set" in report
    table = report.split("## Robustness: every test set", 1)[1].split("\n## ", 1)[0]
    for name, per_context in (("test_noise_10db", 2),):
        es = read_json(smoke_run / "eval" / "sets" / name / "summary.json")
        assert es["set"]["utterances"] == {ctx: per_context for ctx in ev["variants"]["dense"]}
        assert set(es["variants"]) == set(ev["variants"])
        wer = f"| {name} | avg WER | " + " | ".join(f"{es['averages'][v]['wer']:.2f}" for v in es["variants"]) + " |"
        assert wer in table, wer
        assert f"## Test set {name}" in report
    assert table.count("| test |") == 3  # the clean split: WER, BLEU, prunable FLOPs kept
    assert "context - static" in table
    # the masks eval decoded with: static has one mask, so its stats are masks.json's
    static = read_json(smoke_run / "masks.json")["stats"]["static"]
    assert ev["sparsity"]["static"]["prunable_flops_ratio"] == pytest.approx(next(iter(static.values()))["prunable_flops_ratio"], abs=1e-4)


def test_a_condition_aware_predictor_reads_the_manifests_condition(tmp_path: Path, smoke_run: Path,
                                                                    smoke_corpus: list[str]) -> None:
    import torch

    run_dir = tmp_path / "condition"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("sweep", "eval", "profile", "pruned"))
    r = cli("run", "ci_smoke", *smoke_corpus, "--run-dir", str(run_dir), "--stages", "gates,prune,eval",
            "--set", "gates.inputs=[task,source_lang,target_lang,condition]", "--set", "gates.train_static=false",
            "--set", "eval.variants=[dense,context]", "--set", "eval.sets=[test_noise_10db]")
    assert r.returncode == 0, r.stderr
    blob = torch.load(run_dir / "checkpoints" / "gates.pt", weights_only=True)
    train = [json.loads(x) for x in Path(smoke_corpus[1].split("=", 1)[1], "train.jsonl").read_text().splitlines()]
    assert blob["conditions"] == sorted({row["condition"] for row in train}) and "snr10" in blob["conditions"]
    assert read_json(run_dir / "masks.json")["meta"]["conditions"] == blob["conditions"]
    assert set(read_json(run_dir / "eval" / "sets" / "test_noise_10db" / "summary.json")["variants"]) == {"dense", "context"}


def test_static_is_calibrated_to_target_and_flops_follow_masks(smoke_run: Path) -> None:
    masks = read_json(smoke_run / "masks.json")
    targets = masks["meta"]["targets"]
    assert targets == {"encoder": 0.25, "decoder": 0.5}  # ci_smoke inherits demo's gates (scope both)
    for st in masks["stats"]["static"].values():
        assert st["sparsity_encoder"] == 0.25 and st["sparsity_decoder"] == 0.5
    # context-aware masks differ per context, and their thresholds were calibrated when the predictor froze:
    # the mean over contexts meets each target to within one module of the scope (2x4 encoder, 2x3 decoder)
    ctx = masks["stats"]["context"].values()
    for scope, n in (("encoder", 8), ("decoder", 6)):
        mean = sum(st[f"sparsity_{scope}"] for st in ctx) / len(ctx)
        assert abs(mean - targets[scope]) <= 1 / n + 1e-6, (scope, mean)
    events = [json.loads(x) for x in (smoke_run / "logs" / "gates.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "calibrate"] == [15]  # ci_smoke: 30 phased gate steps
    for st in masks["stats"]["layerdrop"].values():
        assert st["sparsity_decoder"] == 0.5  # whole layers: 1 of 2 (the encoder's 25% rounds to no whole layer)
    pr = read_json(smoke_run / "profile" / "summary.json")
    dense = pr["variants"]["dense"]["flops"]
    static = pr["variants"]["static"]["flops"]
    assert static["encoder"] < dense["encoder"]
    skipped_kinds = {n.split(".")[0] + "." + n.split(".")[2] for n, k in zip(masks["modules"], next(iter(masks["variants"]["static"].values()))) if not k}
    for kind, f in dense["by_kind"].items():
        if kind not in skipped_kinds:
            continue
        assert static["by_kind"].get(kind, 0) < f


def test_same_seed_gives_identical_summaries(smoke_root: Path, smoke_run: Path, smoke_corpus: list[str]) -> None:
    other = smoke_root / "run_b"
    r = cli("run", "ci_smoke", *smoke_corpus, "--run-dir", str(other), "--check-against", str(smoke_run), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["check"]["ok"] is True
    assert read_json(other / "eval" / "summary.json") == read_json(smoke_run / "eval" / "summary.json")
    assert read_json(other / "masks.json") == read_json(smoke_run / "masks.json")


def test_check_against_reports_differences(tmp_path: Path, smoke_run: Path, smoke_corpus: list[str]) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(smoke_run, tampered)
    ev = read_json(tampered / "eval" / "summary.json")
    ctx = sorted(ev["variants"]["dense"])[0]
    metric = "wer" if ctx.startswith("asr") else "bleu"
    ev["variants"]["dense"][ctx][metric] += 1.0
    (tampered / "eval" / "summary.json").write_text(json.dumps(ev))
    r = cli("run", "ci_smoke", *smoke_corpus, "--run-dir", str(smoke_run), "--check-against", str(tampered), "--quiet")
    assert r.returncode == 3
    assert f"check: eval dense {ctx} {metric}:" in r.stderr
    assert "check: note:" not in r.stderr  # same machine, same threads: nothing to explain the mismatch
    env = read_json(tampered / "env.json")
    assert env["cpu_capability"] and env["cpu_model"]
    env["cpu_capability"], env["torch_threads"] = "ELSEWHERE", env["torch_threads"] + 1
    (tampered / "env.json").write_text(json.dumps(env))
    r = cli("run", "ci_smoke", *smoke_corpus, "--run-dir", str(smoke_run), "--check-against", str(tampered), "--json", "--quiet")
    assert r.returncode == 3
    assert [d.split()[0] for d in json.loads(r.stdout)["check"]["env_differences"]] == ["cpu_capability", "torch_threads"]
    assert "check: note: the runs differ in cpu_capability" in r.stderr and "'ELSEWHERE'" in r.stderr
    r = cli("run", "ci_smoke", *smoke_corpus, "--run-dir", str(smoke_run), "--check-against", str(tampered),
            "--set", "check.wer=2", "--set", "check.bleu=2", "--quiet")
    assert r.returncode == 0, r.stderr


def test_rerun_skips_complete_stages_and_force_redoes(smoke_run: Path, smoke_corpus: list[str]) -> None:
    r = cli("run", "ci_smoke", *smoke_corpus, "--run-dir", str(smoke_run), "--stages", "base,gates,prune")
    assert r.returncode == 0
    assert "[base] up to date, skipped" in r.stderr and "[prune] up to date, skipped" in r.stderr
    before = (smoke_run / "masks.json").stat().st_mtime_ns
    r = cli("run", "ci_smoke", *smoke_corpus, "--run-dir", str(smoke_run), "--stages", "prune", "--force", "prune")
    assert r.returncode == 0 and "[prune] running" in r.stderr
    assert (smoke_run / "masks.json").stat().st_mtime_ns != before
    # A changed gates config makes the gates stage stale, not the base.
    r = cli("run", "ci_smoke", *smoke_corpus, "--run-dir", str(smoke_run), "--stages", "base", "--set", "gates.alpha=1.5")
    assert "[base] up to date" in r.stderr


def test_changed_data_makes_the_stages_that_read_it_stale(tmp_path: Path, smoke_root: Path, smoke_corpus: list[str]) -> None:
    manifests = tmp_path / "manifests"
    shutil.copytree(smoke_root / "corpus" / "manifests", manifests)
    recipe, _ = load_recipe("ci_smoke", [f"data.manifest_dir={manifests}"])
    run = RunDir(tmp_path / "run", recipe)
    for stage in ("base", "eval"):
        mark_complete(run, stage)
    test_lines = (manifests / "test.jsonl").read_text().splitlines(keepends=True)
    (manifests / "test.jsonl").write_text("".join(test_lines[:-1]))  # a smaller test set: eval redoes, base does not
    assert run.stage_complete("base") and not run.stage_complete("eval")
    train = (manifests / "train.jsonl").read_text()
    (manifests / "train.jsonl").write_text(train.replace('"text": "', '"text": "x', 1))
    assert not run.stage_complete("base")


def test_eval_metrics_equal_jiwer_and_sacrebleu_on_the_written_files(smoke_run: Path) -> None:
    ev = read_json(smoke_run / "eval" / "summary.json")
    for variant, table in ev["variants"].items():
        for ctx, sc in table.items():
            base = smoke_run / "eval" / variant / ctx.replace(":", "_")
            hyps = base.with_suffix(".hyp").read_text().splitlines()
            refs = base.with_suffix(".ref").read_text().splitlines()
            assert len(hyps) == len(refs) == sc["n"]
            if "wer" in sc:
                w = 100 * jiwer.wer([normalize(x) for x in refs], [normalize(x) for x in hyps])
                assert sc["wer"] == pytest.approx(w, abs=1e-3)
            else:
                b = sacrebleu.corpus_bleu(hyps, [refs]).score
                c = sacrebleu.corpus_chrf(hyps, [refs]).score
                assert sc["bleu"] == pytest.approx(b, abs=1e-3) and sc["chrf"] == pytest.approx(c, abs=1e-3)
                # Out of the BLEU average exactly where even the references themselves would score 0.
                assert (ctx in ev["bleu_unscorable"]) == (sacrebleu.corpus_bleu(refs, [refs]).score == 0)
    # ci_smoke's German references are single compound words: BLEU cannot score st:en-de.
    assert "st:en-de" in ev["bleu_unscorable"] and len(ev["bleu_unscorable"]) < 6
    for v, table in ev["variants"].items():
        bleus = [sc["bleu"] for ctx, sc in table.items() if "bleu" in sc and ctx not in ev["bleu_unscorable"]]
        assert ev["averages"][v]["bleu"] == pytest.approx(sum(bleus) / len(bleus), abs=2e-3)
    rows = [json.loads(x) for x in (smoke_run / "eval" / "utterances.jsonl").read_text().splitlines()]
    assert len(rows) == sum(sc["n"] for t in ev["variants"].values() for sc in t.values())


def _written(run: Path, variant: str) -> tuple[dict[str, str], dict[str, list[str]], dict[str, list[str]]]:
    """tasks, refs and hyps per context, read back from the files eval wrote."""
    tasks, refs, hyps = {}, {}, {}
    for hyp_file in sorted((run / "eval" / variant).glob("*.hyp")):
        ctx = hyp_file.stem.replace("_", ":", 1)
        tasks[ctx] = ctx.split(":")[0]
        refs[ctx] = hyp_file.with_suffix(".ref").read_text().splitlines()
        hyps[ctx] = hyp_file.read_text().splitlines()
    return tasks, refs, hyps


def test_paired_bootstrap_compares_the_averages_eval_reports(smoke_run: Path) -> None:
    from prune_cli.engine.compare import paired_bootstrap

    ev = read_json(smoke_run / "eval" / "summary.json")
    cmp = ev["comparisons"]
    assert [(p["a"], p["b"]) for p in cmp["pairs"]] == [("context", "dense"), ("static", "dense"), ("context", "static")]
    for pair in cmp["pairs"]:
        assert set(pair["metrics"]) == {"wer", "cer", "bleu", "chrf"}
        for metric, m in pair["metrics"].items():
            # The per-utterance statistics reproduce the corpus scores eval reports, averaged over contexts.
            assert m["a"] == pytest.approx(ev["averages"][pair["a"]][metric], abs=2e-3)
            assert m["b"] == pytest.approx(ev["averages"][pair["b"]][metric], abs=2e-3)
            assert m["ci95"][0] <= m["ci95"][1] and 0 < m["p"] <= 1
    tasks, refs, dense = _written(smoke_run, "dense")
    oracle = {ctx: list(r) for ctx, r in refs.items()}  # a perfect system: WER 0, BLEU 100
    hyps = {"dense": dense, "oracle": oracle}
    skip = set(ev["bleu_unscorable"])  # as eval passes it
    out = paired_bootstrap(tasks, refs, hyps, [("dense", "dense"), ("dense", "oracle")], 500, 7, skip)
    same, vs_oracle = (p["metrics"] for p in out["pairs"])
    for m in same.values():  # a variant against itself: no difference in any resample
        assert m["diff"] == 0 and m["ci95"] == [0, 0] and m["p"] == 1
    assert vs_oracle["wer"]["b"] == 0 and vs_oracle["bleu"]["b"] == pytest.approx(100)
    # The smoke model is far from perfect: the whole interval lies on the worse side.
    assert vs_oracle["wer"]["ci95"][0] > 0 and vs_oracle["bleu"]["ci95"][1] < 0 and vs_oracle["wer"]["p"] < 0.01
    assert paired_bootstrap(tasks, refs, hyps, [("dense", "oracle")], 500, 7, skip)["pairs"] == out["pairs"][1:]


def test_compare_across_runs_repeats_evals_bootstrap_and_rejects_another_test_set(tmp_path: Path, smoke_run: Path) -> None:
    ev = read_json(smoke_run / "eval" / "summary.json")
    other = tmp_path / "other"  # a second run on the same test set: a copy of this run's eval
    shutil.copytree(smoke_run / "eval", other / "eval")
    r = cli("compare", f"{smoke_run}:context", f"{other}:static", "--samples", str(ev["comparisons"]["samples"]), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (pair,) = doc["comparisons"]["pairs"]
    # Seeded by run a's config as eval is, on eval's utterance order: the same draws, the same numbers.
    expected = next(p for p in ev["comparisons"]["pairs"] if (p["a"], p["b"]) == ("context", "static"))
    assert pair["metrics"] == expected["metrics"]
    assert doc["utterances"] == sum(c["n"] for c in ev["variants"]["dense"].values())
    assert doc["bleu_unscorable"] == ev["bleu_unscorable"] and doc["b"] == {"run": str(other), "variant": "static"}
    # on a robustness set both scored: the same numbers as that set's own eval comparison
    es = read_json(smoke_run / "eval" / "sets" / "test_noise_10db" / "summary.json")
    r = cli("compare", f"{smoke_run}:context", f"{other}:static", "--test-set", "nosuch", "--json")
    assert r.returncode == 1 and "eval/sets/nosuch/utterances.jsonl: missing" in r.stderr, r.stderr
    r = cli("compare", f"{smoke_run}:context", f"{smoke_run}:static", "--test-set", "test_noise_10db", "--samples",
            str(es["comparisons"]["samples"]), "--json")
    assert r.returncode == 0, r.stderr
    (pair,) = json.loads(r.stdout)["comparisons"]["pairs"]
    assert pair["metrics"] == next(p for p in es["comparisons"]["pairs"] if (p["a"], p["b"]) == ("context", "static"))["metrics"]
    r = cli("compare", str(smoke_run), str(other), "--samples", "50")  # default variant: context in both
    assert r.returncode == 0 and "paired bootstrap" in r.stdout, r.stderr

    path = other / "eval" / "utterances.jsonl"
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    static = [x for x in rows if x["variant"] == "static"]
    dropped, edited = static[0], next(x for x in static if x["context"] != static[0]["context"])
    edited["ref"] += " extra"  # in place: `rows` holds the same dicts
    path.write_text("".join(json.dumps(x) + "\n" for x in rows if x is not dropped), encoding="utf-8")
    r = cli("compare", f"{smoke_run}:context", f"{other}:static")
    assert r.returncode == 2
    assert f"error: not the same test set: context {dropped['context']}: 1 utterance(s) only in {smoke_run}, 0 only" in r.stderr
    assert f"error: not the same test set: context {edited['context']}: 1 utterance(s) have different references" in r.stderr
    r = cli("compare", f"{smoke_run}:random", str(other))
    assert r.returncode == 2 and "no eval of variant 'random' (evaluated: context, dense, static)" in r.stderr
    r = cli("compare", str(tmp_path / "absent"), str(smoke_run))
    assert r.returncode == 1 and "utterances.jsonl: missing" in r.stderr


def test_sign_flip_p_over_runs_is_exact_and_floored_by_the_number_of_runs() -> None:
    assert sign_flip_p(np.array([1.0, 1.0, 1.0, 1.0]), 0) == 2 / 16  # 4 runs all ahead: no lower than 0.125
    assert sign_flip_p(np.array([3.0, 1.0, 1.0]), 0) == 2 / 8  # only +++ and --- reach |sum| 5
    assert sign_flip_p(np.array([0.6, 0.2, -0.2]), 0) == 6 / 8  # |sums| 0.6, 1.0, 0.2, 0.6 (each twice) vs 0.6
    assert sign_flip_p(np.array([0.5, -0.5]), 0) == 1.0
    assert sign_flip_p([3.0, 1.0, 1.0], 0) == 2 / 8  # a plain list, as the docs' pooled-seed command passes it
    many = np.linspace(0.1, 0.3, 20)  # beyond the exact limit, drawn from the seed: reproducible, never 0
    assert sign_flip_p(many, 7) == sign_flip_p(many, 7) == 1 / (2 ** 16 + 1)


def test_compare_replicated_over_runs_averages_each_runs_difference(tmp_path: Path, smoke_run: Path) -> None:
    ev = read_json(smoke_run / "eval" / "summary.json")
    rows = [json.loads(x) for x in (smoke_run / "eval" / "utterances.jsonl").read_text(encoding="utf-8").splitlines()]

    def replicate(name: str, keep=lambda r: True, oracle: str | None = None) -> Path:  # noqa: ANN001
        path = tmp_path / name / "eval" / "utterances.jsonl"
        path.parent.mkdir(parents=True)
        out = [r | {"hyp": r["ref"]} if r["variant"] == oracle else r for r in rows if keep(r)]
        path.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
        return path.parent.parent

    same, perfect = replicate("same"), replicate("perfect", oracle="context")  # a second seed; a perfect context
    n = ev["comparisons"]["samples"]
    r = cli("compare", f"{smoke_run}:context", f"{smoke_run}:static", "-r", str(same), "--replicate", str(perfect),
            "--samples", str(n), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    first = next(p for p in ev["comparisons"]["pairs"] if (p["a"], p["b"]) == ("context", "static"))
    assert doc["comparisons"]["pairs"][0]["metrics"] == first["metrics"]  # run a's own comparison, as eval drew it
    rep = doc["replicated"]
    assert rep["runs"] == 3 and doc["replicates"] == [str(same), str(perfect)]
    wer = rep["metrics"]["wer"]
    static_wer = ev["averages"]["static"]["wer"]
    d0 = first["metrics"]["wer"]["diff"]
    assert wer["per_run"][:2] == [d0, d0] and wer["per_run"][2] == pytest.approx(-static_wer, abs=2e-3)
    assert wer["diff"] == pytest.approx((2 * d0 - static_wer) / 3, abs=2e-3)
    assert wer["a"] == pytest.approx((2 * ev["averages"]["context"]["wer"]) / 3, abs=2e-3) and wer["b"] == pytest.approx(static_wer, abs=2e-3)
    assert wer["a_better_runs"] == 2 * (d0 < 0) + 1
    # Resampling the runs as well reaches the all-perfect draw: the interval reaches further down than over
    # utterances alone, where every resample averages the three runs.
    assert wer["ci95_runs"][0] < wer["ci95"][0] and 0 < wer["p_runs"] <= 1
    # Three runs, two of them one run twice: the sign-flip test sees only the per-run differences (never below 2/8).
    assert wer["p_signflip"] == pytest.approx(sign_flip_p(np.array(wer["per_run"]), 0), abs=1e-3) and wer["p_signflip"] >= 0.25
    r = cli("compare", f"{smoke_run}:context", f"{smoke_run}:static", "-r", str(same), "-r", str(perfect), "--samples", "50")
    assert r.returncode == 0 and "context vs static, mean over 3 runs" in r.stdout, r.stderr

    no_static = replicate("no_static", keep=lambda r: r["variant"] != "static")
    dropped = next(r for r in rows if r["variant"] == "static")
    shorter = replicate("shorter", keep=lambda r: r is not dropped)
    r = cli("compare", f"{smoke_run}:context", f"{smoke_run}:static", "-r", str(no_static), "-r", str(smoke_run))
    assert r.returncode == 2 and f"{smoke_run}:context given twice" in r.stderr, r.stderr
    r = cli("compare", f"{smoke_run}:context", f"{smoke_run}:static", "-r", str(no_static))
    assert r.returncode == 2 and "no eval of variant 'static' (evaluated: context, dense)" in r.stderr
    r = cli("compare", f"{smoke_run}:context", f"{smoke_run}:static", "-r", str(shorter))
    assert r.returncode == 2 and f"not the same test set: context {dropped['context']}: 1 utterance(s) only in {smoke_run}" in r.stderr


def test_quality_gate_exit_code_and_json_purity(smoke_run: Path, smoke_corpus: list[str]) -> None:
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(smoke_run), "--variants", "dense",
            "--contexts", "asr:en,st:de-en", "--max-wer", "-1", "--json")
    assert r.returncode == 3
    doc = json.loads(r.stdout)  # stdout holds exactly one JSON document
    assert set(doc["variants"]["dense"]) == {"asr:en", "st:de-en"}
    assert "quality gate: dense asr:en: WER" in r.stderr
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(smoke_run), "--variants", "dense,static",
            "--contexts", "asr:en", "--max-wer", "1000", "--quiet")
    assert r.returncode == 0
    assert "paired bootstrap" in r.stdout and "static vs dense" in r.stdout


def test_latency_harness_statistics() -> None:
    import torch

    lin = torch.nn.Linear(256, 256)
    x = torch.randn(64, 256)
    calls = {"big": lambda: [lin(x) for _ in range(20)], "small": lambda: lin(x[:1])}
    samples: dict[str, list[float]] = {"big": [], "small": []}
    for rep in range(8):
        for k, v in measure_interleaved(calls, Timer(torch.device("cpu")), 1, 1, rotate=rep).items():
            samples[k] += v
    st = {k: stats_ms(v) for k, v in samples.items()}
    for s in st.values():
        assert s["n"] == 8 and 0 < s["median"] <= s["p90"] and s["stdev"] >= 0
        assert min(samples["big"]) <= s["mean"] or s is st["small"]
    assert st["big"]["median"] > st["small"]["median"]


def test_profile_device_cuda_without_cuda_is_a_usage_error(smoke_run: Path, smoke_corpus: list[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = cli("profile", "ci_smoke", *smoke_corpus, "--run-dir", str(smoke_run), "--device", "cuda")
    assert r.returncode == 2 and "CUDA is not available" in r.stderr


# A sweep point's eval and profile, cut to what the sweep's table needs (no intervals, one batch size, one timed call).
QUICK_POINTS = ["--set", "eval.bootstrap=0", "--set", "profile.repeats=1", "--set", "profile.warmup=0",
                "--set", "profile.batch_sizes=[1]", "--set", "profile.utts_per_context=1"]


def test_sweeps_from_the_recipe_and_the_command_line_train_each_point_on_the_shared_base(
        smoke_root: Path, smoke_run: Path, smoke_corpus: list[str]) -> None:
    # the recipe's sweep (here set by an override): one point that sets two keys, run after the main stages
    r = cli("run", "ci_smoke", *smoke_corpus, *QUICK_POINTS, "--run-dir", str(smoke_run), "--stages", "sweep,report",
            "sweep=[{gates.target.decoder: 0.75, gates.alpha: 3.0}]", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)["stages"]) == {"report", "sweep"}
    high = smoke_run / "sweep" / "gates.target.decoder=0.75,gates.alpha=3.0"
    summary = read_json(smoke_run / "sweep" / "summary.json")
    assert summary["keys"] == ["gates.target.decoder", "gates.alpha"]
    assert [row["point"] for row in summary["rows"]] == [{"gates.target.decoder": 0.75, "gates.alpha": 3.0}]
    child = load_recipe(str(high / "config.yaml"))[0]
    assert (child.gates.target.decoder, child.gates.alpha, child.sweep) == (0.75, 3.0, [])
    report = (smoke_run / "report.md").read_text()
    assert "## Sweep" in report and f"| {high.name} | static |" in report  # the row names the point's directory
    # --sweep key=v1,...: the base, then each value; the recipe's own sweep is not run
    r = cli("run", "ci_smoke", *smoke_corpus, *QUICK_POINTS, "--run-dir", str(smoke_run), "--sweep", "gates.target.decoder=0.25",
            "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    summary = read_json(smoke_run / "sweep" / "summary.json")
    assert [row["value"] for row in summary["rows"]] == [0.25]
    low = smoke_run / "sweep" / "gates.target.decoder=0.25"
    for child_dir in (high, low):
        assert read_json(child_dir / "stages" / "base.json").get("shared_from") == str(smoke_run)
        assert {"dense", "context", "static"} <= set(read_json(child_dir / "eval" / "summary.json")["variants"])
    # each point's target reached its gate training: the static mask skips more of the decoder at 0.75
    dec = {d: read_json(d / "masks.json")["stats"]["static"] for d in (high, low)}
    assert min(c["sparsity_decoder"] for c in dec[high].values()) > max(c["sparsity_decoder"] for c in dec[low].values())
    assert (smoke_run / "plots" / "pareto.png").is_file()


def test_materialize_writes_smaller_checkpoints_that_decode_alike(smoke_run: Path, smoke_corpus: list[str]) -> None:
    import torch

    from prune_cli.model.checkpoint import load_model
    from prune_cli.model.decoding import DecodeOptions, decode

    r = cli("prune", "ci_smoke", *smoke_corpus, "--run-dir", str(smoke_run), "--materialize", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    masks = read_json(smoke_run / "masks.json")
    # materialized checkpoints are cut from the base the context masks run on (fine-tuned under them in ci_smoke)
    base, _ = load_model(smoke_run / "checkpoints" / "base_finetuned.pt")
    base.eval()
    assert masks["weights_hash"] == base.weights_hash()
    x = torch.randn(2, 120, 80)
    lens = torch.tensor([120, 100])
    for ctx, info in doc["materialized"].items():
        keep = tuple(bool(k) for k in masks["masks"][ctx])
        if all(keep):
            continue
        assert info["size_ratio"] < 1.0
        pruned, _ = load_model(smoke_run / info["path"])
        pruned.eval()
        prompt = [1, 6, 4, 6]
        assert decode(pruned, x, lens, prompt, None, DecodeOptions()) == decode(base, x, lens, prompt, keep, DecodeOptions())


def test_joint_finetuning_saves_the_finetuned_base_used_downstream(tmp_path: Path, smoke_run: Path,
                                                                     smoke_corpus: list[str]) -> None:
    import torch

    run_dir = tmp_path / "ft"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("sweep", "eval", "profile", "pruned"))
    (run_dir / "logs" / "gates.jsonl").unlink()
    sets = [*smoke_corpus, "gates.finetune_base=true", "gates.finetune_schedule=phased", "gates.steps=6", "gates.base_lr=0.01",
            "gates.log_every=1", "gates.predictor_share=0.34", "gates.anneal_over=predictor"]
    r = cli("run", "ci_smoke", *sets, "--run-dir", str(run_dir), "--stages", "base,gates,prune", "--quiet")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (run_dir / "logs" / "gates.jsonl").read_text().splitlines()]
    rows = [x for x in rows if "lr_base" in x]
    # phased: the predictor learns in steps 1-2 (a share of 0.34 of 6) on the frozen base, then only the base learns
    assert [x["lr"] > 0 for x in rows] == [True] * 2 + [False] * 4
    assert [x["lr_base"] > 0 for x in rows] == [False] * 2 + [True] * 4
    # the Gumbel temperature anneals over the predictor's two steps, ending at tau_end when it stops learning
    assert [x.get("tau") for x in rows] == [1.0, pytest.approx(0.1)] + [None] * 4
    base = torch.load(run_dir / "checkpoints" / "base.pt", weights_only=True)["state_dict"]
    tuned = torch.load(run_dir / "checkpoints" / "base_finetuned.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    masks = read_json(run_dir / "masks.json")
    from prune_cli.model.checkpoint import load_model

    model, _ = load_model(run_dir / "checkpoints" / "base_finetuned.pt")
    assert masks["weights_hash"] == model.weights_hash()
    # eval's `dense` stays the base as trained; the masked variants use the fine-tuned one
    from prune_cli.engine.session import Session

    recipe, _ = load_recipe("ci_smoke", [x for x in sets if x != "--set"])
    session = Session(recipe, RunDir(run_dir, recipe), torch.device("cpu"))
    original, _ = load_model(run_dir / "checkpoints" / "base.pt")
    assert session.dense_model().weights_hash() == original.weights_hash() != session.base_model().weights_hash()
    # the static baseline fine-tunes its own copy of the base on the same phased schedule, from the same start
    static_rows = [json.loads(x) for x in (run_dir / "logs" / "static.jsonl").read_text().splitlines()]
    static_rows = [x for x in static_rows if "lr_base" in x][-6:]
    assert [x["lr_base"] > 0 for x in static_rows] == [False] * 2 + [True] * 4
    static_base = session.base_model("static")
    assert static_base.weights_hash() not in (original.weights_hash(), model.weights_hash())
    assert masks["variant_weights"] == {"static": static_base.weights_hash()}
    session.masks(["context", "static"])  # each variant checks against its own base
    with pytest.raises(CheckpointError, match="static masks were made for base weights"):
        MaskFile.load(run_dir / "masks.json").check_model(
            masks["modules"], masks["arch_hash"], model.weights_hash(), run_dir / "masks.json", "static")


def test_the_base_can_adapt_densely_before_the_predictor_learns(tmp_path: Path, smoke_run: Path,
                                                                 smoke_corpus: list[str], monkeypatch) -> None:
    import torch

    from prune_cli.engine import train
    from prune_cli.engine.session import Session

    run_dir = tmp_path / "adapt"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("sweep", "eval", "profile", "pruned"))
    (run_dir / "logs" / "gates.jsonl").unlink()
    (run_dir / "logs" / "static.jsonl").unlink()
    sets = [*smoke_corpus, "gates.finetune_base=true", "gates.finetune_schedule=phased", "gates.steps=8",
            "gates.base_lr=0.01", "gates.log_every=1", "gates.adapt_share=0.25", "gates.predictor_share=0.25",
            "gates.anneal_over=predictor", "gates.target_warmup_steps=1", "gates.train_dense_tuned=true"]
    r = cli("run", "ci_smoke", *sets, "--run-dir", str(run_dir), "--stages", "base,gates", "--quiet")
    assert r.returncode == 0, r.stderr

    def rows(log: str) -> list[dict]:
        return [x for x in map(json.loads, (run_dir / "logs" / f"{log}.jsonl").read_text().splitlines()) if "lr_base" in x]

    # steps 1-2: the base adapts with every module kept and no sparsity loss, once for every variant (adapt.jsonl)
    assert [(x["step"], x["lr_base"] > 0, "sparsity_loss" in x) for x in rows("adapt")] == [(1, True, False), (2, True, False)]
    for log in ("gates", "static"):
        # 3-4: the predictor learns on the adapted, frozen base; 5-8: the base adapts to the predictor's masks
        assert [x["step"] for x in rows(log)] == [3, 4, 5, 6, 7, 8], log
        assert [x["lr_base"] > 0 for x in rows(log)] == [False] * 2 + [True] * 4, log
        assert [x["lr"] > 0 for x in rows(log)] == [True] * 2 + [False] * 4, log
        assert all("sparsity_loss" in x for x in rows(log)), log
        # the Gumbel temperature anneals over the predictor's own steps, from tau_start
        assert [x.get("tau") for x in rows(log)] == [1.0, pytest.approx(0.1)] + [None] * 4, log
    # dense_tuned has nothing to learn while the others' predictors do: steps 3-4 are not computed
    assert [x["step"] for x in rows("dense_tuned")] == [5, 6, 7, 8]

    # Sharing the adaptation changes nothing: each variant run with the dense steps in its own loop ends with the
    # same weights, to the bit.
    alone = tmp_path / "alone"
    shutil.copytree(run_dir, alone, ignore=shutil.ignore_patterns("logs", "tensorboard"))
    for v in ("adapt", "gates", "static", "dense_tuned"):
        shutil.rmtree(alone / "checkpoints" / v)
    monkeypatch.setattr(train, "shared_adaptation", lambda *a, **k: None)
    recipe, _ = load_recipe("ci_smoke", [x for x in sets if x != "--set"])
    train.train_gates(Session(recipe, RunDir(alone, recipe), torch.device("cpu")))
    assert not (alone / "checkpoints" / "adapt").exists()
    for name in ("base_finetuned.pt", "base_finetuned_static.pt", "base_finetuned_dense_tuned.pt", "gates.pt", "static.pt"):
        a, b = (torch.load(d / "checkpoints" / name, weights_only=True)["state_dict"] for d in (run_dir, alone))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_subset_eval_goes_beside_the_full_summary(smoke_run: Path, smoke_corpus: list[str]) -> None:
    before = (smoke_run / "eval" / "summary.json").read_text()
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(smoke_run), "--variants", "dense", "--contexts", "asr:en", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (smoke_run / "eval" / "summary.json").read_text() == before
    partial = read_json(smoke_run / "eval" / "partial" / "summary.json")
    assert partial["complete"] is False and list(partial["variants"]["dense"]) == ["asr:en"]


def test_per_context_sparsity_cuts_every_context_at_the_target(tmp_path: Path, smoke_run: Path,
                                                                smoke_corpus: list[str]) -> None:
    import torch

    run_dir = tmp_path / "per_context"
    shutil.copytree(smoke_run, run_dir)
    for stale in ("checkpoints/gates", "checkpoints/gates.pt", "checkpoints/static", "checkpoints/static.pt",
                  "logs/gates.jsonl", "logs/static.jsonl"):
        p = run_dir / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    r = cli("run", "ci_smoke", *smoke_corpus, "--run-dir", str(run_dir), "--stages", "gates,prune", "--quiet",
            "--set", "gates.sparsity_per=context", "--set", "prune.baselines=[]")
    assert r.returncode == 0, r.stderr
    masks = read_json(run_dir / "masks.json")
    assert masks["meta"]["context_exact_cut"] is True and set(masks["variants"]) == {"context", "static"}
    # The static baseline (one mask for all contexts) keeps the batch-mean loss: it is the one trained under `batch`.
    static, batch_static = (torch.load(d / "checkpoints" / "static.pt")["state_dict"] for d in (run_dir, smoke_run))
    assert static.keys() == batch_static.keys() and all(torch.equal(static[k], batch_static[k]) for k in static)
    assert masks["variants"]["static"] == read_json(smoke_run / "masks.json")["variants"]["static"]
    for ctx, st in masks["stats"]["context"].items():  # each context skips exactly its share: 2 of 8, 3 of 6
        assert (st["sparsity_encoder"], st["sparsity_decoder"]) == (0.25, 0.5), ctx
    events = [json.loads(x) for x in (run_dir / "logs" / "gates.jsonl").read_text().splitlines()]
    assert not [e for e in events if e.get("event") == "calibrate"]  # no shared threshold shift in this mode
    vals = [e for e in events if e.get("event") == "val"]
    # Validation runs the masks prune exports (and the base trains under them after the freeze): exact cuts.
    assert vals and all((e["val_sparsity_encoder"], e["val_sparsity_decoder"]) == (0.25, 0.5) for e in vals)


def test_gate_seed_and_distillation_change_only_the_gate_stage(tmp_path: Path, smoke_run: Path,
                                                               smoke_corpus: list[str]) -> None:
    import torch

    run_dir = tmp_path / "gate_seed"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("sweep", "eval", "profile", "pruned"))
    (run_dir / "logs" / "gates.jsonl").unlink()
    r = cli("run", "ci_smoke", *smoke_corpus, "--run-dir", str(run_dir), "--stages", "base,gates",
            "--set", "gates.seed=99", "--set", "gates.distill=0.5", "--set", "gates.train_static=false")
    assert r.returncode == 0, r.stderr
    assert "[base] up to date, skipped" in r.stderr and "[gates] running" in r.stderr
    rows = [json.loads(x) for x in (run_dir / "logs" / "gates.jsonl").read_text().splitlines()]
    train_rows = [x for x in rows if "distill" in x and "event" not in x]
    # the teacher is the dense base: the gated model drifts from it, so the KL term is positive and logged
    assert train_rows and all(x["distill"] > 0 for x in train_rows)
    without = [json.loads(x) for x in (smoke_run / "logs" / "gates.jsonl").read_text().splitlines()]
    assert not any("distill" in x or "val_distill" in x for x in without)  # off: no teacher, nothing logged
    new = torch.load(run_dir / "checkpoints" / "gates.pt", weights_only=True)["state_dict"]
    old = torch.load(smoke_run / "checkpoints" / "gates.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(new[k], old[k]) for k in old)  # another seed (and the KL term): another predictor


def test_sweep_point_relinks_a_retrained_parent_base_and_says_so(tmp_path: Path) -> None:

    recipe = load_recipe("ci_smoke")[0]
    parent, child = RunDir(tmp_path / "parent", recipe), RunDir(tmp_path / "parent" / "sweep" / "p", recipe)
    (parent.checkpoints).mkdir(parents=True)
    (parent.checkpoints / "base.pt").write_bytes(b"first base")
    assert not _share_base(parent, child)  # nothing to share before the parent's base is complete
    assert not (child.checkpoints / "base.pt").exists()
    mark_complete(parent, "base")
    assert not _share_base(parent, child)  # first link: nothing was stale
    assert not _share_base(parent, child)  # same file: nothing to do
    assert child.stage_complete("base") and (child.checkpoints / "base.pt").read_bytes() == b"first base"
    fresh = parent.checkpoints / "base.pt.tmp"
    fresh.write_bytes(b"retrained base")
    fresh.replace(parent.checkpoints / "base.pt")  # how checkpoints are written: a new file renamed over the old
    assert _share_base(parent, child)
    assert (child.checkpoints / "base.pt").read_bytes() == b"retrained base"


def test_dense_tuned_is_the_base_fine_tuned_alike_with_every_module_kept(
        smoke_run: Path, smoke_corpus: list[str], tmp_path: Path) -> None:
    from prune_cli.model.checkpoint import load_model

    run_dir = tmp_path / "dt"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("sweep", "eval", "profile", "pruned"))
    before = read_json(run_dir / "masks.json")
    r = cli("run", "ci_smoke", *smoke_corpus, "--run-dir", str(run_dir), "--stages", "gates,prune,eval,profile,report", "--json",
            "--quiet", "gates.train_dense_tuned=true", "eval.variants=[dense,dense_tuned,context,static]",
            "profile.variants=[dense,dense_tuned,context]", "profile.batch_sizes=[1]", "profile.repeats=1")
    assert r.returncode == 0, r.stderr
    masks = read_json(run_dir / "masks.json")
    assert all(all(m) for m in masks["variants"]["dense_tuned"].values())
    assert {st["sparsity_encoder"] + st["sparsity_decoder"] for st in masks["stats"]["dense_tuned"].values()} == {0.0}
    # adding the reference leaves the pruned variants as they were
    for v in ("context", "static"):
        assert masks["variants"][v] == before["variants"][v]
    assert masks["weights_hash"] == before["weights_hash"]  # the context-aware variant's fine-tuned base
    assert masks["variant_weights"]["static"] == before["variant_weights"]["static"]
    tuned, _ = load_model(run_dir / "checkpoints" / "base_finetuned_dense_tuned.pt")
    base, _ = load_model(run_dir / "checkpoints" / "base.pt")
    assert masks["variant_weights"]["dense_tuned"] == tuned.weights_hash() != base.weights_hash()
    # the same phased schedule: the base learns only from the freeze step, under the sparsity of nothing skipped
    recipe = load_recipe("ci_smoke")[0]
    logs = [json.loads(line) for line in (run_dir / "logs" / "dense_tuned.jsonl").read_text().splitlines()]
    steps = [row for row in logs if "lr_base" in row]
    assert steps and all((row["lr_base"] > 0) == (row["step"] > recipe.gates.freeze_step) for row in steps)
    assert not any("sparsity_loss" in row for row in logs)
    ev = read_json(run_dir / "eval" / "summary.json")
    assert set(ev["variants"]) == {"dense", "dense_tuned", "context", "static"}
    pairs = {(p["a"], p["b"]) for p in ev["comparisons"]["pairs"]}
    assert {("context", "dense_tuned"), ("static", "dense_tuned"), ("dense_tuned", "dense"), ("context", "static")} <= pairs
    assert ("context", "dense_tuned") in pairs and ("dense_tuned", "context") not in pairs
    # Cost ratios compare the same work: against dense_tuned, the zero-shot dense model included.
    pr = read_json(run_dir / "profile" / "summary.json")
    assert pr["reference"] == "dense_tuned" and set(pr["ratios"]) == {"dense", "context"}
    flops = {v: d["flops"]["total"] for v, d in pr["variants"].items()}
    assert pr["ratios"]["context"]["flops"] == round(flops["context"] / flops["dense_tuned"], 4)
    assert "Ratios are against dense_tuned" in (run_dir / "report.md").read_text()
