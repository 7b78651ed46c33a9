"""OWSM's tokenizer (ESPnet's SentencePiece BPE and token list) and its prompt.

`asr:xx` is `<sos> <xxx> <asr> <notimestamps>` and `st:xx-yy` is `<sos> <xxx> <st_yyy> <notimestamps>`, as ESPnet's
Speech2Text primes its search without a previous-text prompt (`<sop> ... ` is for long-form decoding, which
prune-cli does not do). OWSM names languages by ISO 639-3 codes; a context's 639-1 code is mapped to its 639-3 code.
Text is split into SentencePiece pieces and each piece looked up in the token list, `<unk>` when it is not there
(ESPnet's TokenIDConverter).
"""

from __future__ import annotations

import base64
from pathlib import Path

from prune_cli.atomic import atomic_write_json
from prune_cli.contexts import ContextVocab
from prune_cli.errors import CheckpointError, DataError

# ISO 639-1 -> 639-3 for the languages OWSM v3.1 has most data in; a context may also use the 639-3 code itself.
ISO639_3 = {
    "ar": "ara", "bg": "bul", "ca": "cat", "cs": "ces", "cy": "cym", "da": "dan", "de": "deu", "el": "ell", "en": "eng",
    "es": "spa", "et": "est", "fa": "fas", "fi": "fin", "fr": "fra", "ga": "gle", "he": "heb", "hi": "hin", "hu": "hun",
    "id": "ind", "it": "ita", "ja": "jpn", "ko": "kor", "lt": "lit", "lv": "lav", "mt": "mlt", "nl": "nld", "pl": "pol",
    "pt": "por", "ro": "ron", "ru": "rus", "sk": "slk", "sl": "slv", "sv": "swe", "ta": "tam", "th": "tha", "tr": "tur",
    "uk": "ukr", "ur": "urd", "vi": "vie", "zh": "zho",
}


class OwsmTokenizer:
    kind = "owsm"

    def __init__(self, sp_model: bytes, token_list: list[str], vocab: ContextVocab, notime: str = "<notimestamps>",
                 first_time: str = "<0.00>", last_time: str = "<30.00>"):
        import sentencepiece as spm

        self.sp_model = sp_model
        self._sp = spm.SentencePieceProcessor(model_proto=sp_model)
        self.token_list = token_list
        self.vocab = vocab
        self.notime, self.first_time, self.last_time = notime, first_time, last_time
        self._id = {t: i for i, t in enumerate(token_list)}
        self.sos, self.eos, self.unk, self.blank = (self._special(t) for t in ("<sos>", "<eos>", "<unk>", "<blank>"))
        self.no_timestamps = self._special(notime)
        # Decoding without timestamps never emits one (ESPnet's ScoreFilter once <notimestamps> is in the prompt).
        self.suppress = list(range(self._special(first_time), self._special(last_time) + 1))
        self.suppress_begin: list[int] = []
        self._special_ids = {i for i, t in enumerate(token_list) if t.startswith("<") and t.endswith(">")}
        self.n_specials = min(i for i in range(len(token_list)) if i not in self._special_ids)  # CTC: ids below are never text

    def _special(self, token: str) -> int:
        if token not in self._id:
            raise CheckpointError(f"the token list has no {token} token: not an OWSM token list")
        return self._id[token]

    @property
    def vocab_size(self) -> int:
        return len(self.token_list)

    def lang_token(self, lang: str) -> str:
        return f"<{ISO639_3.get(lang, lang)}>"

    def task_token(self, task: str, target_lang: str) -> str:
        return "<asr>" if task == "asr" else f"<{task}_{ISO639_3.get(target_lang, target_lang)}>"

    def context_problems(self, task: str, source_lang: str, target_lang: str) -> list[str]:
        """Why OWSM cannot be prompted with this context (an empty list: it can)."""
        out = []
        if self.lang_token(source_lang) not in self._id:
            out.append(f"language {source_lang!r}: the token list has no {self.lang_token(source_lang)}")
        if self.task_token(task, target_lang) not in self._id:
            out.append(f"{task} into {target_lang!r}: the token list has no {self.task_token(task, target_lang)}")
        return out

    def prompt(self, task: str, source_lang: str, target_lang: str) -> list[int]:
        problems = self.context_problems(task, source_lang, target_lang)
        if problems:
            raise DataError(f"context {task}:{source_lang}-{target_lang}: {'; '.join(problems)}")
        return [self.sos, self._id[self.lang_token(source_lang)], self._id[self.task_token(task, target_lang)], self.no_timestamps]

    def encode(self, text: str) -> list[int]:
        return [self._id.get(p, self.unk) for p in self._sp.encode_as_pieces(text)]

    def decode(self, ids: list[int]) -> str:
        """Text without special tokens (ESPnet's text_nospecial)."""
        pieces = [self.token_list[i] for i in ids if 0 <= i < len(self.token_list) and i not in self._special_ids]
        return self._sp.decode_pieces(pieces).strip()

    def save(self, d: Path) -> None:
        atomic_write_json(d / "tokenizer.json", self.to_blob())

    def to_blob(self) -> dict:
        return {"kind": self.kind, "sp_model": base64.b64encode(self.sp_model).decode(), "token_list": self.token_list,
                "notime": self.notime, "first_time": self.first_time, "last_time": self.last_time,
                "tasks": list(self.vocab.tasks), "langs": list(self.vocab.langs)}

    @classmethod
    def from_blob(cls, blob: dict) -> "OwsmTokenizer":
        return cls(base64.b64decode(blob["sp_model"]), blob["token_list"], ContextVocab(tuple(blob["tasks"]), tuple(blob["langs"])),
                   blob["notime"], blob["first_time"], blob["last_time"])
