"""Recipe validation, overrides, includes, and the shell contract (exit codes, --json purity, one line per error)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli
from prune_cli.errors import UsageError
from prune_cli.recipe import build_recipe, load_recipe
from prune_cli.recipe_yaml import apply_overrides, load_raw


def write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_unknown_key_names_path_and_close_match(tmp_path: Path) -> None:
    rec = write(tmp_path / "r.yaml", "include: " + str(Path("recipes/demo.yaml").resolve()) + "\nmodel:\n  d_modle: 128\n")
    with pytest.raises(UsageError) as e:
        load_recipe(str(rec))
    assert any("model.d_modle: unknown key (did you mean 'model.d_model'?)" in p for p in e.value.problems)


def test_wrong_type_names_key_and_expected_type(tmp_path: Path) -> None:
    rec = write(tmp_path / "r.yaml", "base:\n  steps: lots\ngates:\n  scope: middle\n")
    with pytest.raises(UsageError) as e:
        load_recipe(str(rec))
    text = "\n".join(e.value.problems)
    assert "base.steps: expected int, got 'lots'" in text
    assert "gates.scope: expected one of 'encoder', 'decoder', 'both', got 'middle'" in text
    assert len(e.value.problems) == 2  # one line per problem


def test_overrides_parse_yaml_scalars_and_lists() -> None:
    r, _ = load_recipe("ci_smoke", ["base.steps=7", "gates.target.decoder=0.25", "profile.batch_sizes=[1,2,3]",
                                   "data.synth.snr_db=null", "gates.finetune_base=true"])
    assert r.base.steps == 7 and r.gates.target.decoder == 0.25
    assert r.profile.batch_sizes == [1, 2, 3] and r.data.synth.snr_db is None and r.gates.finetune_base is True


def test_override_unknown_key_is_rejected() -> None:
    with pytest.raises(UsageError) as e:
        load_recipe("ci_smoke", ["base.stpes=3"])
    assert "base.stpes: unknown key (did you mean 'base.steps'?)" in e.value.problems[0]


def test_include_merges_parent_first(tmp_path: Path) -> None:
    write(tmp_path / "parent.yaml", "name: parent\nbase:\n  steps: 11\n  lr: 0.5\n")
    child = write(tmp_path / "child.yaml", "include: parent.yaml\nname: child\nbase:\n  steps: 22\n")
    r, _ = load_recipe(str(child))
    assert (r.name, r.base.steps, r.base.lr) == ("child", 22, 0.5)
    write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(UsageError, match="include cycle"):
        load_raw(tmp_path / "a.yaml")


def test_semantic_checks() -> None:
    raw = apply_overrides({}, ["model.d_model=100", "model.heads=3", "data.synth.languages=[en,xx]"])
    with pytest.raises(UsageError) as e:
        build_recipe(raw)
    text = "\n".join(e.value.problems)
    assert "not divisible" in text and "unsupported language 'xx'" in text
    with pytest.raises(UsageError) as e:
        build_recipe(apply_overrides({}, ["gates.predictor_share=1.0"]))
    assert e.value.problems == ["<recipe>: gates.predictor_share: must be in (0, 1), got 1.0"]
    with pytest.raises(UsageError) as e:
        build_recipe(apply_overrides({}, ["gates.finetune_base=true", "gates.finetune_schedule=phased", "gates.steps=3",
                                          "gates.predictor_share=0.25"]))
    assert e.value.problems == ["<recipe>: gates.predictor_share: 0.25 of gates.steps=3 leaves the predictor or the "
                                "base no step of the phased schedule"]
    with pytest.raises(UsageError) as e:
        build_recipe(apply_overrides({}, ["eval.ctc_weight=0.3"]))  # beam_size defaults to 1
    assert e.value.problems == ["<recipe>: eval.ctc_weight: joint CTC/attention decoding is a beam "
                                "search; set eval.beam_size >= 2 (or ctc_weight 0)"]
    build_recipe(apply_overrides({}, ["eval.ctc_weight=0.3", "eval.beam_size=4"]))
    with pytest.raises(UsageError) as e:
        build_recipe(apply_overrides({}, ["gates.min_cross_attention=5"]))  # the default decoder has 4 layers
    assert e.value.problems == ["<recipe>: gates.min_cross_attention: must be in [0, model.dec_layers=4], got 5"]


def test_every_split_needs_each_synthesized_context() -> None:
    # ci_smoke speaks 5 languages and 6 translation pairs: 11 contexts
    with pytest.raises(UsageError) as e:
        load_recipe("ci_smoke", ["data.synth.n_train=-3", "data.synth.n_test=10", "data.synth.workers=0"])
    assert e.value.problems == [
        f"{Path('recipes/ci_smoke.yaml').resolve()}: data.synth.n_train: at least one utterance per context (11), got -3",
        f"{Path('recipes/ci_smoke.yaml').resolve()}: data.synth.n_test: at least one utterance per context (11), got 10",
        f"{Path('recipes/ci_smoke.yaml').resolve()}: data.synth.workers: at least 1, got 0"]
    load_recipe("ci_smoke", ["data.synth.n_test=11"])


def test_a_bad_recipe_fails_before_torch_is_imported(tmp_path: Path) -> None:
    """Shell loops over recipes fail fast: every stage command validates the recipe and its flags first."""
    import subprocess
    import sys

    probe = ("import atexit, sys; atexit.register(lambda: print('torch' in sys.modules, file=sys.stderr)); "
             "sys.argv = ['prune-cli', *sys.argv[1:]]; from prune_cli.cli import main; main()")
    for args in (["run", "ci_smoke", "model.heads=3"], ["train", "ci_smoke", "--set", "base.steps=lots"],
                 ["eval", "ci_smoke", "--variants", "dense,nope"], ["profile", "ci_smoke", "eval.beam_size=0"],
                 ["prune", "ci_smoke", "gates.scope=middle"], ["data", "synth", "ci_smoke", "data.synth.n_dev=0"],
                 ["run", "ci_smoke", "--stages", "base,nope"], ["run", "ci_smoke", "--sweep", "gates.target.decoder"]):
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert lines[0].startswith("error:") and lines[-1] == "False", (args, r.stderr)


def test_validate_exits_2_with_close_match(tmp_path: Path) -> None:
    rec = write(tmp_path / "bad.yaml", "name: x\ngates:\n  scpoe: decoder\n")
    r = cli("recipe", "validate", str(rec))
    assert r.returncode == 2
    assert "gates.scpoe: unknown key (did you mean 'gates.scope'?)" in r.stderr
    assert "Traceback" not in r.stderr


def test_malformed_yaml_reports_file_line_column(tmp_path: Path) -> None:
    rec = write(tmp_path / "broken.yaml", "name: x\nbase:\n  steps: [1, 2\n  lr: 3\n")
    r = cli("recipe", "validate", str(rec))
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[0]
    assert line.startswith(f"error: {rec}:") and "invalid YAML" in line
    _, lineno, col = line.split(": ")[1].split(":")[:3]
    assert int(lineno) >= 3 and int(col) >= 1
    assert "Traceback" not in r.stderr


def test_recipe_show_resolves_overrides_and_json_is_pure() -> None:
    r = cli("recipe", "show", "ci_smoke", "--set", "base.steps=9", "--json")
    assert r.returncode == 0
    doc = json.loads(r.stdout)  # the only thing on stdout
    assert doc["base"]["steps"] == 9 and doc["name"] == "ci_smoke"
    r = cli("recipe", "show", "ci_smoke")
    assert "steps: 40" in r.stdout


def test_positional_overrides_after_the_recipe() -> None:
    r = cli("recipe", "show", "ci_smoke", "base.steps=9", "gates.lr=0.5", "--set", "base.steps=7", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["base"]["steps"] == 9 and doc["gates"]["lr"] == 0.5  # positional ones come last and win
    r = cli("recipe", "show", "ci_smoke", "base.steps")
    assert r.returncode == 2 and "unexpected argument 'base.steps': overrides are key.path=value" in r.stderr


def test_recipe_list_and_version() -> None:
    r = cli("recipe", "list", "--json")
    names = {x["name"] for x in json.loads(r.stdout)}
    assert {"demo", "ci_smoke"} <= names
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("prune-cli ")


def test_command_help_names_every_bundled_recipe() -> None:
    r = cli("eval", "--help")
    text = " ".join(r.stdout.split())  # rich wraps the help
    assert r.returncode == 0
    for name in ("ci_smoke", "demo", "many_langs", "scratch", "study", "whisper_base"):
        assert name in text, name


def test_help_lists_commands() -> None:
    r = cli("--help")
    for cmd in ("train", "prune", "eval", "profile", "run", "recipe", "data"):
        assert cmd in r.stdout


def test_missing_inputs_name_the_producing_command(tmp_path: Path) -> None:
    r = cli("eval", "ci_smoke", "--run-dir", str(tmp_path / "empty"), "--set", f"data.manifest_dir={tmp_path / 'none'}")
    assert r.returncode == 1
    assert "prune-cli" in r.stderr and "not found" in r.stderr and "Traceback" not in r.stderr


def test_unknown_recipe_and_bad_device(tmp_path: Path) -> None:
    r = cli("train", "ci_smok")
    assert r.returncode == 2 and "did you mean 'ci_smoke'" in r.stderr
    r = cli("run", "ci_smoke", "--stages", "base,bogus", "--run-dir", str(tmp_path))
    assert r.returncode == 2 and "unknown stage 'bogus'" in r.stderr


def test_sweep_key_is_validated_before_anything_runs(tmp_path: Path) -> None:
    r = cli("run", "ci_smoke", "--sweep", "gates.target.decodr=0.2,0.4", "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2
    assert "gates.target.decodr: unknown key (did you mean 'gates.target.decoder'?)" in r.stderr
    assert not (tmp_path / "r" / "stages").exists()


def test_recipe_sweep_points_are_validated_one_line_each(tmp_path: Path) -> None:
    rec = write(tmp_path / "r.yaml", "include: " + str(Path("recipes/ci_smoke.yaml").resolve()) + "\nsweep:\n"
                "  - {gates.target.decoder: 0.75}\n  - {gates.target.decodr: 0.5}\n  - {gates.target.encoder: 1.5}\n"
                "  - {}\n  - 0.75\n")
    r = cli("run", str(rec), "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "sweep[4]: expected a mapping of dotted keys to values, got 0.75" in lines[0]
    rec.write_text(rec.read_text().replace("  - 0.75\n", ""))
    r = cli("recipe", "validate", str(rec))
    assert r.returncode == 2
    assert [line.split("r.yaml: ", 1)[1] for line in r.stderr.strip().splitlines()] == [
        "sweep[1]: gates.target.decodr: unknown key (did you mean 'gates.target.decoder'?)",
        "sweep[2]: gates.target.encoder: must be in [0, 1), got 1.5",
        "sweep[3]: a point sets at least one key, and not sweep itself; got {}",
    ]
    assert not (tmp_path / "r" / "stages").exists()


def test_parse_sweep_makes_one_typed_point_per_value() -> None:
    from prune_cli.recipe_yaml import parse_sweep

    assert parse_sweep("gates.target.decoder=0.25,0.5") == [{"gates.target.decoder": 0.25}, {"gates.target.decoder": 0.5}]
    assert parse_sweep("gates.inputs=[task]") == [{"gates.inputs": ["task"]}]
    with pytest.raises(UsageError):
        parse_sweep("gates.target.decoder")


def test_sweep_point_label_is_a_shell_safe_directory_name() -> None:
    from prune_cli.recipe_yaml import point_label

    point = {"gates.target.encoder": 0.75, "gates.train_dense_tuned": False, "eval.variants": ["dense", "context"],
             "name": "a b'c"}
    assert point_label(point) == ("gates.target.encoder=0.75,gates.train_dense_tuned=false,eval.variants=dense+context,"
                                  "name=a_b_c")


def test_model_summary_reports_params_and_flops_per_module() -> None:
    r = cli("model", "summary", "ci_smoke", "--frames", "200", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["prunable_modules"] == len(doc["per_module_flops"]) == 2 * 4 + 2 * 3
    assert all(v > 0 for v in doc["per_module_flops"].values())
    assert sum(k["flops"] for k in doc["by_kind"].values()) == sum(doc["per_module_flops"].values())
    assert 0 < sum(k["params"] for k in doc["by_kind"].values()) < doc["params_total"]


def test_dense_tuned_needs_its_training_and_a_fine_tuned_base() -> None:
    with pytest.raises(UsageError) as e:
        build_recipe(apply_overrides({}, ["eval.variants=[dense,dense_tuned,context]", "gates.train_dense_tuned=true"]))
    assert e.value.problems == ["<recipe>: gates.train_dense_tuned: the dense reference is the base fine-tuned like the "
                                "pruned variants; it needs gates.finetune_base: true"]
    with pytest.raises(UsageError) as e:
        build_recipe(apply_overrides({}, ["profile.variants=[dense,dense_tuned]"]))
    assert e.value.problems == ["<recipe>: profile.variants: dense_tuned is trained only with gates.train_dense_tuned: true"]
    build_recipe(apply_overrides({}, ["eval.variants=[dense_tuned]", "gates.train_dense_tuned=true", "gates.finetune_base=true"]))


def test_gumbel_anneal_spans_all_steps_or_the_predictors_own() -> None:
    phased = ["gates.finetune_base=true", "gates.finetune_schedule=phased", "gates.steps=1600", "gates.predictor_share=0.25"]
    assert build_recipe(apply_overrides({}, phased)).gates.anneal_steps == 1600
    assert build_recipe(apply_overrides({}, [*phased, "gates.anneal_over=predictor"])).gates.anneal_steps == 400
    # without phases the predictor learns in every step, so both settings anneal over all of them
    joint = ["gates.finetune_base=true", "gates.finetune_schedule=joint", "gates.steps=1600", "gates.anneal_over=predictor"]
    assert build_recipe(apply_overrides({}, joint)).gates.anneal_steps == 1600
    # a dense adaptation first: the predictor learns in [400, 800) and anneals over its own steps or to the end
    adapt = build_recipe(apply_overrides({}, [*phased, "gates.adapt_share=0.25"])).gates
    assert (adapt.adapt_step, adapt.freeze_step, adapt.anneal_steps) == (400, 800, 1200)
    assert adapt.base_windows == [(0, 400), (800, 1600)]
    assert build_recipe(apply_overrides({}, [*phased, "gates.adapt_share=0.25", "gates.anneal_over=predictor"])).gates.anneal_steps == 400
    with pytest.raises(UsageError) as e:
        build_recipe(apply_overrides({}, ["gates.adapt_share=0.2"]))
    assert e.value.problems == ["<recipe>: gates.adapt_share: the base adapts before the predictor only in the phased "
                                "schedule (gates.finetune_base: true, gates.finetune_schedule: phased)"]
    with pytest.raises(UsageError) as e:  # one line for one bad value: the schedule it implies is not checked too
        build_recipe(apply_overrides({}, [*phased, "gates.adapt_share=1.5"]))
    assert e.value.problems == ["<recipe>: gates.adapt_share: must be in [0, 1), got 1.5"]
    with pytest.raises(UsageError) as e:
        build_recipe(apply_overrides({}, [*phased, "gates.adapt_share=0.8"]))
    assert e.value.problems == ["<recipe>: gates.predictor_share: 0.25 of gates.steps=1600 leaves the predictor or the "
                                "base no step of the phased schedule"]
    with pytest.raises(UsageError) as e:
        build_recipe(apply_overrides({}, ["gates.anneal_over=freeze"]))
    assert e.value.problems == ["<recipe>: gates.anneal_over: expected one of 'all', 'predictor', got 'freeze'"]
