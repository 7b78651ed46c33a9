"""Char or SentencePiece tokenizer with the decoder-prompt specials: <sos> <src_lang> <task> <tgt_lang>."""

from __future__ import annotations

import io
import json
from pathlib import Path

from prune_cli.atomic import atomic_write_bytes, atomic_write_json
from prune_cli.contexts import LANGS
from prune_cli.errors import CheckpointError

SPECIALS = ["<blank>", "<sos>", "<eos>", "<unk>", "<asr>", "<st>"] + [f"<{lang}>" for lang in LANGS]
BLANK, SOS, EOS, UNK = 0, 1, 2, 3


class Tokenizer:
    def __init__(self, kind: str, pieces: list[str], sp_model: bytes | None = None):
        self.kind = kind
        self.pieces = pieces  # text units after the specials (chars, or sentencepiece pieces)
        self.sp_model = sp_model
        self._sp = None
        if kind == "sentencepiece":
            import sentencepiece as spm

            assert sp_model is not None
            self._sp = spm.SentencePieceProcessor(model_proto=sp_model)
        self._index = {p: i + len(SPECIALS) for i, p in enumerate(pieces)}

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.pieces)

    def special(self, name: str) -> int:
        return SPECIALS.index(f"<{name}>")

    def prompt(self, task: str, source_lang: str, target_lang: str) -> list[int]:
        return [SOS, self.special(source_lang), self.special(task), self.special(target_lang)]

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            ids = self._sp.encode(text)
            return [UNK if i == 0 else len(SPECIALS) + i - 1 for i in ids]
        return [self._index.get(c, UNK) for c in text]

    def decode(self, ids: list[int]) -> str:
        body = [i for i in ids if i >= len(SPECIALS) or i == UNK]
        if self._sp is not None:
            return self._sp.decode([0 if i == UNK else i - len(SPECIALS) + 1 for i in body])
        return "".join("" if i == UNK else self.pieces[i - len(SPECIALS)] for i in body)

    # persistence
    def save(self, d: Path) -> None:
        if self.sp_model is not None:
            atomic_write_bytes(d / "spm.model", self.sp_model)
        atomic_write_json(d / "tokenizer.json", {"kind": self.kind, "specials": SPECIALS, "pieces": self.pieces})

    @classmethod
    def load(cls, d: Path) -> "Tokenizer":
        meta_path = d / "tokenizer.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{meta_path}: cannot read tokenizer: {e}") from None
        if meta.get("specials") != SPECIALS:
            raise CheckpointError(f"{meta_path}: tokenizer was saved with different special tokens")
        sp = (d / "spm.model").read_bytes() if meta["kind"] == "sentencepiece" else None
        return cls(meta["kind"], meta["pieces"], sp)


def train_tokenizer(kind: str, texts: list[str], vocab_size: int) -> Tokenizer:
    if kind == "char":
        return Tokenizer("char", sorted({c for t in texts for c in t}))
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
    return Tokenizer("sentencepiece", pieces, proto)
