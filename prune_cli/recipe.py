"""Recipes: YAML loaded with includes and overrides, type-checked and cross-checked once, here.

Everything downstream receives a `Recipe` and trusts it. The schema is in recipe_schema.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from prune_cli.errors import UsageError
from prune_cli.recipe_checks import semantic_checks
from prune_cli.recipe_schema import Recipe
from prune_cli.recipe_types import build_typed
from prune_cli.recipe_yaml import RECIPES_DIR, apply_overrides, load_raw, resolve_recipe_path, sweep_point_raw


def build_recipe(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    errors: list[str] = []
    recipe = build_typed(Recipe, raw, "", errors)
    if not errors:
        errors = semantic_checks(recipe)
    for i, point in enumerate(recipe.sweep if not errors else []):
        if not point or any(k == "sweep" or k.startswith("sweep.") for k in point):
            errors.append(f"sweep[{i}]: a point sets at least one key, and not sweep itself; got {point!r}")
            continue
        try:  # each point must be a valid recipe before anything runs
            build_recipe(sweep_point_raw(raw, point))
        except UsageError as e:
            errors += [f"sweep[{i}]: {line.removeprefix('<recipe>: ')}" for line in e.problems]
    if errors:
        raise UsageError([f"{source}: {e}" for e in errors])
    return recipe


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    r, path, _ = load_recipe_raw(name_or_path, overrides)
    return r, path


def load_recipe_raw(name_or_path: str, overrides: list[str] | None = None) -> tuple[Recipe, Path, dict[str, Any]]:
    """The validated recipe, its path, and the raw mapping it was built from (overrides applied; sweeps start from it)."""
    path = resolve_recipe_path(name_or_path)
    raw = apply_overrides(load_raw(path), overrides or [])
    return build_recipe(raw, str(path)), path, raw


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def bundled_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml"))
