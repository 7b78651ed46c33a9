"""Recipe YAML: includes, dotted key=value overrides, sweep points."""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from prune_cli.errors import UsageError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class _Loader(yaml.SafeLoader):
    """YAML 1.1's float pattern needs a dot, so `1e-3` would load as a string: YAML 1.2's also takes exponents."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)"
               r"|[-+]?(?:[0-9][0-9_]*)\.[0-9_]*|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"{path}: recipe file not found")
    try:
        data = load_yaml(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UsageError(f"{where}: invalid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        raise UsageError(f"{path}: empty recipe")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a recipe must be a mapping at top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_raw(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe and the recipes it includes (`include:` or `defaults:`), parents first."""
    path = path.resolve()
    if path in _seen:
        raise UsageError(f"{path}: include cycle: {' -> '.join(str(p) for p in _seen + (path,))}")
    data = _read_yaml(path)
    includes = data.pop("include", None) or data.pop("defaults", None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = deep_merge(merged, load_raw((path.parent / inc), _seen + (path,)))
    return deep_merge(merged, data)


def resolve_recipe_path(name_or_path: str) -> Path:
    """A path, or the name of a bundled recipe (`demo`, `ci_smoke`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (RECIPES_DIR / name_or_path, RECIPES_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    bundled = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
    hint = difflib.get_close_matches(p.stem, bundled, n=1)
    extra = f" (did you mean '{hint[0]}'?)" if hint else f" (bundled: {', '.join(bundled)})"
    raise UsageError(f"{name_or_path}: recipe not found{extra}")


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    if "=" not in text:
        raise UsageError(f"--set {text!r}: expected key.path=value")
    key, value = text.split("=", 1)
    try:
        parsed = load_yaml(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return tuple(key.strip().split(".")), parsed


def parse_sweep(text: str) -> list[dict[str, Any]]:
    """--sweep key.path=v1,v2,... as sweep points: [{key.path: v1}, {key.path: v2}, ...]."""
    if "=" not in text:
        raise UsageError(f"--sweep {text!r}: expected key.path=v1,v2,...")
    key, values = text.split("=", 1)
    vals = [v for v in values.split(",") if v != ""]
    if len(vals) < 1:
        raise UsageError(f"--sweep {text!r}: no values")
    return [{key.strip(): parse_override(f"{key}={v}")[1]} for v in vals]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    return apply_values(raw, [parse_override(text) for text in overrides])


def apply_values(raw: dict[str, Any], values: Iterable[tuple[Sequence[str], Any]]) -> dict[str, Any]:
    """A copy of `raw` with each key path set to its value, in order."""
    out = copy.deepcopy(raw)
    for path, value in values:
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return out


def sweep_point_raw(raw: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The raw recipe of one sweep point: the parent's, without its own sweep, with the point's values set."""
    return apply_values({k: v for k, v in raw.items() if k != "sweep"}, [(k.split("."), v) for k, v in point.items()])


def point_label(point: dict[str, Any]) -> str:
    """A sweep point as key=value pairs, also the name of its run directory: no spaces, quotes or brackets
    (lists join with +, booleans as in YAML)."""
    def text(v: Any) -> str:
        if isinstance(v, list):
            return "+".join(text(x) for x in v)
        return str(v).lower() if isinstance(v, bool) else str(v)

    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(f"{k}={text(v)}" for k, v in point.items()))
