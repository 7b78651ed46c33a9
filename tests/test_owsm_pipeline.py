"""The owsm family through every stage of the real command line: a random OWSM built with ESPnet's own classes,
saved as ESPnet ships one, imported, gated, pruned, evaluated and profiled on the ci_smoke corpus. Quality is
meaningless here (random weights); the chain is the point."""

from __future__ import annotations

import json
from pathlib import Path

import owsm_reference as ref
import pytest
import torch

from conftest import cli, read_json
from prune_cli.model.checkpoint import load_model
from prune_cli.model.owsm import OwsmModel
from prune_cli.model.owsm_import import find_files, open_owsm, read_owsm

pytest.importorskip("espnet2", reason="ESPnet builds the random OWSM (make setup installs it)")


@pytest.fixture(scope="module")
def espnet_dir(tmp_path_factory, smoke_root: Path, smoke_corpus: list[str]) -> Path:
    texts = [json.loads(x)["text"] for x in (smoke_root / "corpus" / "manifests" / "train.jsonl").read_text().splitlines()]
    return ref.build(tmp_path_factory.mktemp("owsm_download"), texts).root


@pytest.fixture(scope="module")
def manifests(tmp_path_factory, smoke_root: Path, smoke_corpus: list[str]) -> Path:
    """ci_smoke with absolute audio paths and at most 4 utterances per context and split."""
    src, dst = smoke_root / "corpus" / "manifests", tmp_path_factory.mktemp("owsm_manifests")
    for split in ("train", "dev", "test"):
        rows = [json.loads(x) for x in (src / f"{split}.jsonl").read_text().splitlines()]
        rows = [{**r, "audio_filepath": str((src / r["audio_filepath"]).resolve())} for r in rows]
        (dst / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def _sets(pretrained: Path, manifests: Path) -> list[str]:
    values = {"model.pretrained": str(pretrained), "data.manifest_dir": str(manifests),
              "gates.steps": 6, "gates.val_every": 3, "gates.save_every": 3, "gates.log_every": 3,
              "gates.target_warmup_steps": 2, "eval.bootstrap": 0, "eval.batch_size": 8, "data.max_utts_per_context": 3,
              "profile.repeats": 1, "profile.warmup": 0, "profile.batch_sizes": "[1]", "profile.utts_per_context": 1,
              "data.max_frames_per_batch": 600, "prune.materialize": "true",
              "eval.max_len_ratio": 0.02}  # a random model never ends its text: 16 tokens per utterance
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def test_model_import_reads_the_download_and_a_recipe_takes_the_result(espnet_dir, tmp_path):
    out = tmp_path / "owsm.pt"
    r = cli("model", "import", str(espnet_dir), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["family"] == "owsm" and info["format"] == "espnet" and info["dims"]["d_model"] == 64
    model, tok, _ = open_owsm(str(out))
    direct, _ = read_owsm(find_files(espnet_dir))
    assert model.weights_hash() == direct.weights_hash() == info["weights_hash"]
    assert "<notimestamps>" in tok.token_list
    # The files one by one: the config, with the weights named.
    files = find_files(espnet_dir)
    r = cli("model", "import", str(files.config), "--weights", str(files.weights), "--out", str(tmp_path / "b.pt"), "--json")
    assert r.returncode == 0, r.stderr and json.loads(r.stdout)["weights_hash"] == info["weights_hash"]


def test_an_owsm_layout_prune_cli_does_not_compute_fails_naming_the_key(espnet_dir, tmp_path):
    import shutil

    import yaml

    bad = tmp_path / "bad"
    shutil.copytree(espnet_dir, bad)
    cfg_path = find_files(bad).config
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["encoder_conf"]["use_linear_after_conv"] = True
    cfg["frontend_conf"]["hop_length"] = 128
    cfg_path.write_text(yaml.safe_dump(cfg))
    r = cli("model", "import", str(bad), "--out", str(tmp_path / "x.pt"))
    assert r.returncode != 0 and not (tmp_path / "x.pt").exists()
    assert "encoder_conf.use_linear_after_conv: True (prune-cli computes False)" in r.stderr
    assert "frontend_conf.hop_length: 128 (prune-cli computes 160)" in r.stderr
    assert "Traceback" not in r.stderr


def test_every_stage_runs_on_an_imported_owsm(espnet_dir, manifests, tmp_path):
    run = tmp_path / "run"
    r = cli("run", "owsm", *_sets(espnet_dir, manifests), "--run-dir", str(run), "--json")
    assert r.returncode == 0, r.stderr
    metrics = read_json(run / "metrics.json")
    assert metrics["base"]["pretrained_format"] == "espnet"
    masks = read_json(run / "masks.json")
    assert masks["modules"][:4] == ["encoder.0.ffn1", "encoder.0.attn", "encoder.0.cgmlp", "encoder.0.ffn2"]
    assert {"asr:de", "st:en-fr"} <= set(masks["variants"]["context"])
    summary = read_json(run / "eval" / "summary.json")
    assert set(summary["variants"]) == {"dense", "dense_tuned", "context", "static"}
    assert summary["decoding"]["suppress"] == list(range(len(ref.LANGS) + len(ref.TASKS) + 5, len(ref.LANGS) + len(ref.TASKS) + 9))
    prof = read_json(run / "profile" / "summary.json")
    assert 0 < prof["ratios"]["context"]["flops"] < 1
    # An exported pruned checkpoint has its skipped modules deleted, and computes what the base does with them skipped.
    base, _ = load_model(run / "checkpoints" / "base_finetuned.pt")
    ctx, keep = next(iter(masks["variants"]["context"].items()))
    pruned, blob = load_model(run / "pruned" / f"{ctx.replace(':', '_')}.pt")
    assert isinstance(pruned, OwsmModel) and blob["context"] == ctx
    assert len(pruned.removed) == keep.count(0) > 0
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in base.parameters())
    feats, lens = torch.randn(2, 400, 80) - 8, torch.tensor([400, 400])
    tokens = torch.tensor([[len(base.dims.__dict__)] * 5] * 2) % base.dims.vocab
    with torch.no_grad():
        want, _, _ = base.eval()(feats, lens, tokens, keep=[bool(k) for k in keep])
        got, _, _ = pruned.eval()(feats, lens, tokens)
    assert (want - got).abs().max() < 1e-5
