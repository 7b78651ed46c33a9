"""The context vocabulary: tasks, languages and the stable context key (`asr:de`, `st:de-en`).

Its one home. The tokenizer's prompt tokens, the gate predictor's embedding tables and the recipe's validation all
read it from here. A leaf module: it imports nothing from prune_cli.
"""

from __future__ import annotations

TASKS = ("asr", "st")
LANGS = ("en", "de", "fr", "es", "it")


def context_key(task: str, source_lang: str, target_lang: str) -> str:
    """Stable string key of a context: `asr:de`, `st:de-en`."""
    return f"asr:{source_lang}" if task == "asr" else f"st:{source_lang}-{target_lang}"
