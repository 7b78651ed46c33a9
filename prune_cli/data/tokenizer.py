"""Char or SentencePiece tokenizer with the decoder-prompt specials: <sos> <src_lang> <task> <tgt_lang>.

The task and language tokens come from the run's context vocabulary (its training data), saved with the tokenizer."""

from __future__ import annotations

import io
import json
from pathlib import Path

from prune_cli.atomic import atomic_write_bytes, atomic_write_json
from prune_cli.contexts import TASKS, ContextVocab
from prune_cli.errors import CheckpointError

BASE_SPECIALS = ["<blank>", "<sos>", "<eos>", "<unk>"]
BLANK, SOS, EOS, UNK = 0, 1, 2, 3


def special_tokens(vocab: ContextVocab) -> list[str]:
    return BASE_SPECIALS + [f"<{t}>" for t in vocab.tasks] + [f"<{lang}>" for lang in vocab.langs]


class Tokenizer:
    eos = EOS
    suppress: list[int] = []  # never decoded (Whisper's tokenizer has lists; ours suppresses nothing)
    suppress_begin: list[int] = []

    def __init__(self, kind: str, pieces: list[str], vocab: ContextVocab, sp_model: bytes | None = None):
        self.kind = kind
        self.pieces = pieces  # text units after the specials (chars, or sentencepiece pieces)
        self.vocab = vocab
        self.specials = special_tokens(vocab)
        self.sp_model = sp_model
        self._sp = None
        if kind == "sentencepiece":
            import sentencepiece as spm

            assert sp_model is not None
            self._sp = spm.SentencePieceProcessor(model_proto=sp_model)
        self._index = {p: i + self.n_specials for i, p in enumerate(pieces)}

    @property
    def n_specials(self) -> int:
        """Ids below this are special tokens; text pieces follow."""
        return len(self.specials)

    @property
    def vocab_size(self) -> int:
        return self.n_specials + len(self.pieces)

    def prompt(self, task: str, source_lang: str, target_lang: str) -> list[int]:
        v, n = self.vocab, len(BASE_SPECIALS)
        lang0 = n + len(v.tasks)
        return [SOS, lang0 + v.lang_id(source_lang), n + v.task_id(task), lang0 + v.lang_id(target_lang)]

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            ids = self._sp.encode(text)
            return [UNK if i == 0 else self.n_specials + i - 1 for i in ids]
        return [self._index.get(c, UNK) for c in text]

    def decode(self, ids: list[int]) -> str:
        body = [i for i in ids if i >= self.n_specials or i == UNK]
        if self._sp is not None:
            return self._sp.decode([0 if i == UNK else i - self.n_specials + 1 for i in body])
        return "".join("" if i == UNK else self.pieces[i - self.n_specials] for i in body)

    # persistence
    def save(self, d: Path) -> None:
        if self.sp_model is not None:
            atomic_write_bytes(d / "spm.model", self.sp_model)
        atomic_write_json(d / "tokenizer.json", {"kind": self.kind, "tasks": list(self.vocab.tasks),
                                                 "langs": list(self.vocab.langs), "specials": self.specials,
                                                 "pieces": self.pieces})

    @classmethod
    def load(cls, d: Path) -> "Tokenizer":
        meta_path = d / "tokenizer.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{meta_path}: cannot read tokenizer: {e}") from None
        if meta.get("kind") == "whisper":
            from prune_cli.data.whisper_tokenizer import WhisperTokenizer

            return WhisperTokenizer.from_blob(meta)  # type: ignore[return-value]
        if meta.get("kind") == "owsm":
            from prune_cli.data.owsm_tokenizer import OwsmTokenizer

            return OwsmTokenizer.from_blob(meta)  # type: ignore[return-value]
        specials = meta.get("specials") or []
        if "tasks" in meta:
            vocab = ContextVocab(tuple(meta["tasks"]), tuple(meta["langs"]))
        else:  # saved before the vocabulary came from the data: tasks, then languages, after the base specials
            named = [t[1:-1] for t in specials[len(BASE_SPECIALS):]]
            tasks = tuple(t for t in named if t in TASKS)
            vocab = ContextVocab(tasks, tuple(named[len(tasks):]))
        if specials != special_tokens(vocab):
            raise CheckpointError(f"{meta_path}: its special tokens do not match its task and language lists")
        sp = (d / "spm.model").read_bytes() if meta["kind"] == "sentencepiece" else None
        return cls(meta["kind"], meta["pieces"], vocab, sp)


def train_tokenizer(kind: str, texts: list[str], vocab_size: int, vocab: ContextVocab) -> Tokenizer:
    if kind == "char":
        return Tokenizer("char", sorted({c for t in texts for c in t}), vocab)
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, hard_vocab_limit=False,
        num_threads=1, minloglevel=2, shuffle_input_sentence=False,
    )
    proto = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    pieces = [sp.id_to_piece(i) for i in range(1, sp.get_piece_size())]
    return Tokenizer("sentencepiece", pieces, vocab, proto)
