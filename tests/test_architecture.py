"""The layout's rules, checked on the source: layers import downward only, one runner writes stage markers, one registry
names the variants, and every registered variant is produced and evaluated by a real run."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from prune_cli.variants import CONTEXT, DENSE, NAMES, TRAINED, VARIANTS

PKG = Path(__file__).resolve().parent.parent / "prune_cli"


def _modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("layer", ["model", "gating"])
def test_the_core_does_not_import_recipes_run_dirs_or_the_engine(layer: str) -> None:
    bad = []
    for path in sorted((PKG / layer).glob("*.py")):
        for mod in _imports(path):
            if mod in ("prune_cli.recipe", "prune_cli.runs") or mod.startswith(("prune_cli.engine", "prune_cli.commands", "prune_cli.cli")):
                bad.append(f"{path.relative_to(PKG)} imports {mod}")
    assert not bad, bad


def test_leaf_modules_import_nothing_from_the_package() -> None:
    for name in ("atomic.py", "contexts.py", "variants.py", "errors.py"):
        assert not [m for m in _imports(PKG / name) if m.startswith("prune_cli") and m != "prune_cli.errors"], name


def test_only_the_runner_writes_stage_markers() -> None:
    writers = []
    for path in _modules():
        src = path.read_text()
        if ".marker(" in src and path.name not in ("runs.py",):
            writers.append(path.relative_to(PKG).as_posix())
        assert "mark_complete(" not in src or path.name == "runner.py", path
        assert '/ "stages"' not in src or path.name == "runs.py", path  # the marker path is spelled once
    assert writers == ["engine/runner.py"]


def _field_name_use(node: ast.Constant, parents: dict[ast.AST, ast.AST]) -> bool:
    """`context` is also the name of a data field (a row's context key) and of gates.sparsity_per's per-context mode."""
    parent = parents.get(node)
    if isinstance(parent, ast.Dict) and node in parent.keys:
        return True
    if isinstance(parent, ast.Subscript) and parent.slice is node:  # row["context"]
        return True
    if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Attribute) and parent.func.attr == "add_column":
        return True
    if isinstance(parent, ast.Tuple) and isinstance(parents.get(parent), ast.Subscript):  # Literal["batch", "context"]
        return True
    if isinstance(parent, ast.Compare):  # r.gates.sparsity_per == "context"
        return any(isinstance(x, ast.Attribute) and x.attr == "sparsity_per" for x in [parent.left, *parent.comparators])
    if isinstance(parent, ast.Tuple) and isinstance(parents.get(parent), ast.For):  # column names of a table
        return True
    return False


def test_variant_names_are_spelled_only_in_the_registry() -> None:
    found = []
    for path in _modules():
        if path.name == "variants.py":
            continue
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in NAMES:
                if node.value == CONTEXT.name and _field_name_use(node, parents):
                    continue
                found.append(f"{path.relative_to(PKG)}:{node.lineno}: {node.value!r}")
    assert not found, found


def test_registry_entries_are_consistent() -> None:
    assert len({v.seed_key for v in TRAINED}) == len(TRAINED), "each trained variant needs its own random stream"
    for v in VARIANTS.values():
        if v.kind == "learned":
            assert v.loop and v.predictor_ckpt and v.own_base
        if v.kind == "rule":
            assert v.runs_on in VARIANTS and VARIANTS[v.runs_on].own_base and v.switch == "prune.baselines"
    assert not DENSE.masked and all(v.masked for v in VARIANTS.values() if v is not DENSE)


def test_every_variant_in_the_registry_is_masked_evaluated_and_compared(smoke_run: Path) -> None:
    """ci_smoke exports masks for every masked variant it enables; eval scores them with the same table."""
    masks = json.loads((smoke_run / "masks.json").read_text())
    ev = json.loads((smoke_run / "eval" / "summary.json").read_text())
    cfg = (smoke_run / "config.yaml").read_text()
    assert "train_dense_tuned: false" in cfg
    expected = [v for v in NAMES if VARIANTS[v].masked and VARIANTS[v].switch != "gates.train_dense_tuned"]
    assert list(masks["variants"]) == expected
    assert masks["masks"] == masks["variants"][CONTEXT.name]  # the documented top-level key is the context-aware table
    assert list(ev["variants"]) == [DENSE.name, CONTEXT.name, "static"]
    pairs = {(p["a"], p["b"]) for p in ev["comparisons"]["pairs"]}
    assert pairs == {(CONTEXT.name, DENSE.name), ("static", DENSE.name), (CONTEXT.name, "static")}
