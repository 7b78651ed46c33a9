"""Contexts come from the data: any ISO 639 language (Cyrillic included) and any task label, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, cli, corpus_sets
from prune_cli.contexts import ContextVocab, context_key, language_problem, parse_context_key, task_problem
from prune_cli.errors import DataError

OLD_SPECIALS = ["<blank>", "<sos>", "<eos>", "<unk>", "<asr>", "<st>", "<en>", "<de>", "<fr>", "<es>", "<it>"]


def test_vocabulary_order_and_forms() -> None:
    v = ContextVocab.build({"st", "spell", "asr"}, {"ru", "en", "pt", "de"}, ["en", "de", "fr"])
    assert v.tasks == ("asr", "st", "spell") and v.langs == ("en", "de", "pt", "ru")
    assert v.unknown("st", "pt", "en") == [] and v.unknown("lid", "el", "en") == ["task lid", "language el"]
    with pytest.raises(DataError, match="language 'el' is not in this run's vocabulary"):
        v.lang_id("el")
    with pytest.raises(DataError, match="used both as a task label and as a language code"):
        ContextVocab.build({"asr", "st"}, {"st", "en"})  # Sesotho's code is a task label here
    assert [language_problem(c) is None for c in ("pt", "fil", "EN", "english", "e1")] == [True, True, False, False, False]
    assert task_problem("spell") is None and task_problem("Bad-Label") is not None
    assert context_key("spell", "en", "en") == "spell:en-en" and parse_context_key("spell:en-en") == ("spell", "en", "en")
    assert parse_context_key("asr:ru") == ("asr", "ru", "ru")
    with pytest.raises(ValueError):
        parse_context_key("st:de")


def test_no_language_list_outside_the_synthesis_code() -> None:
    corpus = {ROOT / "prune_cli" / "data" / "synth.py", ROOT / "prune_cli" / "data" / "config.py"}  # its code, its settings
    hits = [p for p in (ROOT / "prune_cli").rglob("*.py") if '"en", "de"' in p.read_text() and p not in corpus]
    assert not hits, hits


def test_the_demo_vocabulary_keeps_its_token_order(smoke_run: Path) -> None:
    """Seeded runs stay bit-identical across the change: the demo languages keep the old token ids."""
    assert json.loads((smoke_run / "tokenizer" / "tokenizer.json").read_text())["specials"] == OLD_SPECIALS


def test_ru_pt_and_a_new_task_label_go_through_every_stage(tmp_path: Path) -> None:
    sets = corpus_sets(tmp_path) + [
        "--set", "data.synth.languages=[en,pt,ru]", "--set", "data.synth.st_pairs=[pt-en,ru-en]",
        "--set", "data.synth.forms=[cardinal]", "--set", "data.synth.n_train=250", "--set", "data.synth.n_dev=25",
        "--set", "data.synth.n_test=50"]
    r = cli("data", "synth", "ci_smoke", *sets, "--quiet")
    assert r.returncode == 0, r.stderr
    manifests = tmp_path / "corpus" / "manifests"
    # A task label of the user's own: some English ASR utterances become `spell` in train and dev.
    for split in ("train", "dev"):
        rows = [json.loads(line) for line in (manifests / f"{split}.jsonl").read_text().splitlines()]
        for r_ in [r_ for r_ in rows if r_["task"] == "asr" and r_["source_lang"] == "en"][::2]:
            r_["task"] = "spell"
        (manifests / f"{split}.jsonl").write_text("".join(json.dumps(r_, ensure_ascii=False) + "\n" for r_ in rows))
    r = cli("data", "check", str(manifests / "train.jsonl"), "--json")
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)["manifests"][0]["contexts"]
    assert {"asr:ru", "asr:pt", "st:ru-en", "st:pt-en", "spell:en-en"} <= set(found)
    ru_text = next(json.loads(line)["text"] for line in (manifests / "test.jsonl").read_text().splitlines()
                   if '"source_lang": "ru"' in line and '"task": "asr"' in line)
    assert any("\u0400" <= ch <= "\u04ff" for ch in ru_text)  # Cyrillic
    run = tmp_path / "run"
    r = cli("run", "ci_smoke", *sets, "--run-dir", str(run), "--stages", "base,gates,prune,eval", "--json")
    assert r.returncode == 0, r.stderr
    tok = json.loads((run / "tokenizer" / "tokenizer.json").read_text())
    assert tok["tasks"] == ["asr", "st", "spell"] and tok["langs"] == ["en", "pt", "ru"]
    masks = json.loads((run / "masks.json").read_text())
    assert {"asr:ru", "asr:pt", "st:ru-en", "st:pt-en", "spell:en-en"} <= set(masks["masks"])
    ev = json.loads((run / "eval" / "summary.json").read_text())
    assert {"asr:ru", "st:ru-en", "asr:pt", "st:pt-en"} <= set(ev["variants"]["context"])
    assert "spell:en-en" not in ev["variants"]["context"]  # the test split has none
    # eval fails clearly, before decoding, for a task it cannot score and for a language the run never trained
    spell = tmp_path / "spell.jsonl"
    rows = [json.loads(line) for line in (manifests / "dev.jsonl").read_text().splitlines()]
    for r_ in rows:
        r_["audio_filepath"] = str((manifests / r_["audio_filepath"]).resolve())
    spell.write_text("".join(json.dumps(r_) + "\n" for r_ in rows if r_["task"] == "spell"))
    r = cli("eval", "ci_smoke", *sets, "--run-dir", str(run), "--manifest", str(spell))
    assert r.returncode == 1 and "task spell trains, prunes and profiles, but has no metric" in r.stderr, r.stderr
    german = tmp_path / "de.jsonl"
    german.write_text("".join(json.dumps({**r_, "task": "asr", "source_lang": "de", "target_lang": "de"}) + "\n" for r_ in rows[:3]))
    r = cli("eval", "ci_smoke", *sets, "--run-dir", str(run), "--manifest", str(german))
    assert r.returncode == 1 and "context asr:de (3 utterance(s)): language de not in this run's training data" in r.stderr
    assert not {p.name for p in (run / "eval" / "sets").iterdir()} & {"spell", "de"}  # only the recipe's own sets
