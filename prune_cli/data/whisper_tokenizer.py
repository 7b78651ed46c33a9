"""Whisper's byte-level BPE (a transformers tokenizer.json, read by the `tokenizers` library) and its prompt.

`asr:xx` is `<|startoftranscript|><|xx|><|transcribe|><|notimestamps|>`; `st:xx-en` is the same with
`<|translate|>`. Whisper translates only into English, and knows only the languages it has a `<|xx|>` token for.
"""

from __future__ import annotations

from pathlib import Path

from prune_cli.atomic import atomic_write_json
from prune_cli.contexts import ContextVocab
from prune_cli.errors import CheckpointError, DataError

WHISPER_TASKS = {"asr": "<|transcribe|>", "st": "<|translate|>"}


class WhisperTokenizer:
    kind = "whisper"

    def __init__(self, bpe_json: str, vocab: ContextVocab, suppress: list[int] | None = None,
                 suppress_begin: list[int] | None = None):
        from tokenizers import Tokenizer as BPE

        self.bpe_json = bpe_json
        self._bpe = BPE.from_str(bpe_json)
        self.vocab = vocab
        self.eot = self._special("<|endoftext|>")
        self.sot = self._special("<|startoftranscript|>")
        self.no_timestamps = self._special("<|notimestamps|>")
        self.eos = self.eot
        self.n_specials = self.eot  # ids from <|endoftext|> on are special; text tokens come first
        self.suppress = sorted(suppress) if suppress is not None else self.non_speech_tokens()
        self.suppress_begin = sorted(suppress_begin) if suppress_begin is not None else [self.encode(" ")[0], self.eot]

    def _special(self, token: str) -> int:
        i = self._bpe.token_to_id(token)
        if i is None:
            raise CheckpointError(f"tokenizer has no {token} token: not a Whisper tokenizer")
        return i

    @property
    def vocab_size(self) -> int:
        return self._bpe.get_vocab_size(with_added_tokens=True)

    def lang_token(self, lang: str) -> int | None:
        return self._bpe.token_to_id(f"<|{lang}|>")

    def context_problems(self, task: str, source_lang: str, target_lang: str) -> list[str]:
        """Why Whisper cannot be prompted with this context (an empty list: it can)."""
        out = []
        if task not in WHISPER_TASKS:
            out.append(f"task {task!r}: Whisper knows asr (transcribe) and st (translate into English)")
        if self.lang_token(source_lang) is None:
            out.append(f"language {source_lang!r}: Whisper has no <|{source_lang}|> token")
        if task == "st" and target_lang != "en":
            out.append(f"st into {target_lang!r}: Whisper translates only into English")
        return out

    def prompt(self, task: str, source_lang: str, target_lang: str) -> list[int]:
        problems = self.context_problems(task, source_lang, target_lang)
        if problems:
            raise DataError(f"context {task}:{source_lang}-{target_lang}: {'; '.join(problems)}")
        return [self.sot, self.lang_token(source_lang), self._special(WHISPER_TASKS[task]), self.no_timestamps]

    def encode(self, text: str) -> list[int]:
        """Text tokens as Whisper's training targets have them: with a leading space."""
        return self._bpe.encode(" " + text.strip() if text else "", add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._bpe.decode([i for i in ids if i < self.eot]).strip()

    def non_speech_tokens(self) -> list[int]:
        """openai-whisper's default suppression: symbols that are not speech, and the prompt specials."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        misc = set("♩♪♫♬♭♮♯")
        enc = lambda s: self._bpe.encode(s, add_special_tokens=False).ids  # noqa: E731
        result = {enc(" -")[0], enc(" '")[0]}
        for sym in symbols + sorted(misc):
            for toks in (enc(sym), enc(" " + sym)):
                if len(toks) == 1 or sym in misc:
                    result.add(toks[0])
        specials = ["<|translate|>", "<|transcribe|>", "<|startoftranscript|>", "<|startofprev|>", "<|startoflm|>"]
        result |= {self._special(t) for t in specials}
        nospeech = self._bpe.token_to_id("<|nospeech|>") or self._bpe.token_to_id("<|nocaptions|>")
        if nospeech is not None:
            result.add(nospeech)
        return sorted(result)

    def save(self, d: Path) -> None:
        atomic_write_json(d / "tokenizer.json", self.to_blob())

    def to_blob(self) -> dict:
        return {"kind": self.kind, "bpe_json": self.bpe_json, "suppress": self.suppress, "suppress_begin": self.suppress_begin,
                "tasks": list(self.vocab.tasks), "langs": list(self.vocab.langs)}

    @classmethod
    def from_blob(cls, blob: dict) -> "WhisperTokenizer":
        return cls(blob["bpe_json"], ContextVocab(tuple(blob["tasks"]), tuple(blob["langs"])), blob["suppress"],
                   blob["suppress_begin"])
