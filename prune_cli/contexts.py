"""The context vocabulary: the tasks and languages a run knows, read from its training data, and the context key.

A context is (task, source language, target language) with a stable key: `asr:de`, `st:de-en`, `<task>:<src>-<tgt>`.
The tokenizer's prompt tokens, the gate predictor's embedding tables and the masks' keys all follow the vocabulary
saved with the run's tokenizer. A leaf module: it imports only the error types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from prune_cli.errors import DataError

# The tasks eval can score: WER/CER for asr, BLEU/chrF for st. Any other label trains, prunes and profiles.
TASKS = ("asr", "st")
_LANG = re.compile(r"[a-z]{2,3}")  # an ISO 639-1 or 639-3 code, checked for form only
_TASK = re.compile(r"[a-z][a-z0-9_]{0,15}")


def context_key(task: str, source_lang: str, target_lang: str) -> str:
    """Stable string key of a context: `asr:de`, `st:de-en`."""
    return f"asr:{source_lang}" if task == "asr" else f"{task}:{source_lang}-{target_lang}"


def parse_context_key(key: str) -> tuple[str, str, str]:
    """`asr:de` -> (asr, de, de); `st:de-en` -> (st, de, en). Raises ValueError for another form."""
    task, sep, langs = key.partition(":")
    src, dash, tgt = langs.partition("-")
    if not sep or not src or (task == "asr") == bool(dash) or (dash and not tgt):
        raise ValueError(f"{key!r}: expected asr:LANG or TASK:SRC-TGT")
    return task, src, tgt or src


def language_problem(code: str) -> str | None:
    return None if _LANG.fullmatch(code) else f"{code!r} is not a language code (ISO 639-1 or 639-3: 2 or 3 lowercase letters)"


def task_problem(label: str) -> str | None:
    return None if _TASK.fullmatch(label) else f"{label!r} is not a task label (lowercase letters, digits, '_'; asr, st, ...)"


@dataclass(frozen=True)
class ContextVocab:
    """The tasks and languages of a run, in token order."""

    tasks: tuple[str, ...]
    langs: tuple[str, ...]

    @classmethod
    def build(cls, tasks: Iterable[str], langs: Iterable[str], lang_order: Sequence[str] = ()) -> "ContextVocab":
        """Scored tasks first (asr, st), then other labels sorted; languages in `lang_order` first, then the rest sorted.

        A stable order keeps token ids, and with them a seeded run, the same for the same data."""
        ts, ls = set(tasks), set(langs)
        clash = sorted(ts & ls)
        if clash:
            raise DataError(f"{', '.join(clash)}: used both as a task label and as a language code")
        return cls(tuple([t for t in TASKS if t in ts] + sorted(ts - set(TASKS))),
                   tuple([lg for lg in dict.fromkeys(lang_order) if lg in ls] + sorted(ls - set(lang_order))))

    def task_id(self, task: str) -> int:
        if task not in self.tasks:
            raise DataError(f"task {task!r} is not in this run's vocabulary ({', '.join(self.tasks)})")
        return self.tasks.index(task)

    def lang_id(self, lang: str) -> int:
        if lang not in self.langs:
            raise DataError(f"language {lang!r} is not in this run's vocabulary ({', '.join(self.langs)}): the model "
                            "was trained without it")
        return self.langs.index(lang)

    def unknown(self, task: str, src: str, tgt: str) -> list[str]:
        """What of a context the run never trained on (an empty list: it can be prompted)."""
        out = [f"task {task}"] if task not in self.tasks else []
        return out + [f"language {lg}" for lg in dict.fromkeys((src, tgt)) if lg not in self.langs]
