"""Scoring a trained run on test sets from outside its recipe: own folder, the run's record untouched, unseen contexts."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import cli


def _snapshot(run: Path) -> dict[str, str]:
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def _rows(manifest: Path) -> list[dict]:
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for r in rows:
        r["audio_filepath"] = str((manifest.parent / r["audio_filepath"]).resolve())
    return rows


@pytest.fixture()
def extra(tmp_path: Path, smoke_corpus: list[str]) -> Path:
    """Two trained contexts from the smoke test split, and st:de-fr, a context prune never made a mask for."""
    test = Path(smoke_corpus[1].split("=", 1)[1]) / "test.jsonl"
    rows = _rows(test)
    keep = [r for r in rows if (r["task"], r["source_lang"], r.get("target_lang")) in (("asr", "en", "en"), ("st", "de", "en"))]
    unseen = [{**r, "utt_id": f"defr-{i}", "target_lang": "fr"} for i, r in enumerate(rows)
              if (r["task"], r["source_lang"]) == ("st", "de")][:3]
    path = tmp_path / "extra.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in keep + unseen))
    return path


@pytest.fixture()
def run(tmp_path: Path, smoke_run: Path) -> Path:
    return Path(shutil.copytree(smoke_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock")))


def test_an_unseen_context_stops_eval_naming_it_and_changes_nothing(run: Path, extra: Path, smoke_corpus: list[str]) -> None:
    before = _snapshot(run)
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--manifest", str(extra), "--name", "extra")
    assert r.returncode == 1, r.stderr
    assert "context st:de-fr (3 utterance(s)) has no trained mask" in r.stderr
    assert _snapshot(run) == before  # a failed eval changes nothing in the run dir


def test_eval_manifest_scores_its_own_set_and_leaves_the_run_alone(run: Path, extra: Path, smoke_corpus: list[str]) -> None:
    r = cli("run", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--stages", "report")
    assert r.returncode == 0, r.stderr
    before = _snapshot(run)
    report_before = (run / "report.md").read_text()
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--manifest", str(extra), "--name", "extra",
            "eval.unseen_contexts=nearest", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    after = _snapshot(run)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed and all(k.startswith("eval/sets/extra/") for k in changed), changed
    assert set(summary["variants"]) == {"dense", "context", "static"}
    info = summary["set"]
    assert info["manifest"] == str(extra) and info["utterances"]["st:de-fr"] == 3 and len(info["fingerprint"]) == 16
    assert summary["fallbacks"] == {"st:de-fr": {"to": "st:de-en", "n": 3}}  # same task, same source language
    assert json.loads((run / "eval" / "sets" / "extra" / "summary.json").read_text())["set"] == info
    assert (run / "eval" / "sets" / "extra" / "context" / "st_de-fr.hyp").read_text().count("\n") == 3
    # the report keeps its main table and lists the set in its own section
    r = cli("run", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--stages", "report")
    assert r.returncode == 0, r.stderr
    report = (run / "report.md").read_text()
    main = report_before.split("## Robustness")[0]  # the test split's quality section, first in the report
    assert "## Quality (test split)" in main and report.startswith(main)
    assert f"## Test set extra ({extra})" in report and "st:de-fr -> st:de-en" in report
    assert "| extra | avg WER |" in report.split("## Robustness")[1]  # and a row in the table of every set


def test_the_static_fallback_serves_unseen_contexts_with_the_static_mask(run: Path, extra: Path, smoke_corpus: list[str]) -> None:
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--manifest", str(extra), "--name", "s",
            "--variants", "context,static", "eval.unseen_contexts=static", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["fallbacks"] == {"st:de-fr": {"to": "static", "n": 3}}
    assert summary["variants"]["context"]["st:de-fr"]["n"] == summary["variants"]["static"]["st:de-fr"]["n"] == 3


def test_fallback_masks_and_the_nearest_rule() -> None:
    from collections import Counter

    from prune_cli.data.batching import Split
    from prune_cli.data.manifest import Utterance
    from prune_cli.engine.evaluate import resolve_contexts
    from prune_cli.engine.masking import utterance_patterns
    from prune_cli.errors import MissingInputError
    from prune_cli.gating.masks import MaskFile

    trained = {"asr:de": [1, 0, 1], "st:de-en": [0, 1, 1], "st:en-fr": [1, 1, 0]}
    mf = MaskFile(["a", "b", "c"], "h", "w", {"context": trained, "static": {c: [0, 0, 1] for c in trained}})
    counts = Counter({"st:de-fr": 2, "st:es-fr": 1})
    near = resolve_contexts(mf, ["context"], set(counts), "nearest", counts)
    assert near == {"st:de-fr": {"to": "st:de-en", "n": 2}, "st:es-fr": {"to": "st:en-fr", "n": 1}}
    with pytest.raises(MissingInputError, match="context st:de-fr \\(2 utterance\\(s\\)\\) has no trained mask"):
        resolve_contexts(mf, ["context"], set(counts), "error", counts)
    assert resolve_contexts(mf, ["dense"], set(counts), "error", counts) == {}  # dense needs no mask
    u = Utterance("u", Path("x.wav"), 1.0, "t", "st", "de", "fr", "s", None, "m:1")
    split = Split([u], [])
    static = resolve_contexts(mf, ["context"], {"st:de-fr"}, "static", counts)
    assert utterance_patterns(None, "context", None, split, [0], mf, {c: f["to"] for c, f in static.items()}) == [(False, False, True)]
    assert utterance_patterns(None, "context", None, split, [0], mf, {"st:de-fr": "st:de-en"}) == [(False, True, True)]


def test_a_kaldi_dir_without_context_files_takes_the_given_context_and_says_how_many(
        tmp_path: Path, run: Path, smoke_corpus: list[str]) -> None:
    test = Path(smoke_corpus[1].split("=", 1)[1]) / "test.jsonl"
    rows = [r for r in _rows(test) if (r["task"], r["source_lang"]) == ("asr", "de")]
    d = tmp_path / "kaldi_de"  # one split dir, as users have them: no train/ dev/ test/ above it
    d.mkdir()
    (d / "wav.scp").write_text("".join(f"u{i} {r['audio_filepath']}\n" for i, r in enumerate(rows)))
    (d / "text").write_text("".join(f"u{i} {r['text']}\n" for i, r in enumerate(rows)))
    (d / "utt2spk").write_text("".join(f"u{i} s{i}\n" for i in range(len(rows))))
    r = cli("data", "check", str(d), "--context", "asr:de")
    assert r.returncode == 0, r.stderr
    assert f"{len(rows)} utterance(s) name no task or source language and took the default context asr:de" in r.stderr
    assert "asr:de" in r.stdout
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--manifest", str(d), "--context", "asr:de",
            "--variants", "dense", "--json")
    assert r.returncode == 0, r.stderr
    assert f"{len(rows)} of {len(rows)} utterances have no task or source language" in r.stderr
    info = json.loads(r.stdout)["set"]
    assert info["utterances"] == {"asr:de": len(rows)} and info["context_defaulted"] == len(rows)
    assert (run / "eval" / "sets" / "kaldi_de" / "summary.json").is_file()
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--manifest", str(d), "--context", "asr:German")
    assert r.returncode == 2 and "--context 'asr:German': 'German' is not a language code" in r.stderr, r.stderr
    r = cli("eval", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--manifest", str(d), "--context", "asr:xx")
    assert r.returncode == 1 and f"context asr:xx ({len(rows)} utterance(s)): language xx not in this run's training data" in r.stderr


def test_profile_manifest_costs_its_own_set_and_leaves_the_run_alone(run: Path, extra: Path, smoke_corpus: list[str]) -> None:
    before = _snapshot(run)
    r = cli("profile", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--manifest", str(extra), "--name", "extra")
    # profile takes profile.utts_per_context of them (2 in ci_smoke), eval all 3
    assert r.returncode == 1 and "context st:de-fr (2 utterance(s)) has no trained mask" in r.stderr, r.stderr
    assert _snapshot(run) == before
    r = cli("profile", "ci_smoke", *smoke_corpus, "--run-dir", str(run), "--manifest", str(extra), "--name", "extra",
            "eval.unseen_contexts=nearest", "profile.repeats=1", "profile.batch_sizes=[1]", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    after = _snapshot(run)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {"profile/sets/extra/summary.json"}, changed
    assert summary["set"]["manifest"] == str(extra) and summary["set"]["utterances"]["st:de-fr"] > 0
    assert summary["fallbacks"]["st:de-fr"]["to"] == "st:de-en"
    assert sorted(summary["contexts"]) == ["asr:en", "st:de-en", "st:de-fr"]
    assert 0 < summary["ratios"]["context"]["flops"] < 1
