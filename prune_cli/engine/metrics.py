"""Text metrics: WER/CER (jiwer) for ASR, BLEU/chrF (sacrebleu) for ST."""

from __future__ import annotations

import re
from typing import Sequence

import jiwer
from sacrebleu.metrics import BLEU, CHRF

NORMALIZATION = "lowercase; punctuation except apostrophes and hyphens removed; whitespace collapsed"
_PUNCT = re.compile(r"[^\w\s'\-]", re.UNICODE)


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def asr_scores(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
    """Corpus WER/CER in percent on normalized text."""
    r = [normalize(t) for t in refs]
    h = [normalize(t) for t in hyps]
    return {"wer": 100.0 * jiwer.wer(r, h), "cer": 100.0 * jiwer.cer(r, h)}


def bleu_measurable(refs: Sequence[str]) -> bool:
    """Whether BLEU can score this test set at all: a perfect translation scores 0 when no reference has four
    tokens (German numbers are single compound words), and chrF is then the only translation metric."""
    return BLEU().corpus_score(list(refs), [list(refs)]).score > 0


def st_scores(refs: Sequence[str], hyps: Sequence[str]) -> tuple[dict[str, float], dict[str, str]]:
    """Corpus BLEU (left out where it cannot score the references) and chrF, sacrebleu defaults, on the raw
    detokenized text, with signatures."""
    bleu, chrf = BLEU(), CHRF()
    scores = {"chrf": chrf.corpus_score(list(hyps), [list(refs)]).score}
    signatures = {"chrf": str(chrf.get_signature())}
    if bleu_measurable(refs):
        scores = {"bleu": bleu.corpus_score(list(hyps), [list(refs)]).score, **scores}
        signatures["bleu"] = str(bleu.get_signature())
    return scores, signatures


def utterance_score(task: str, ref: str, hyp: str) -> dict[str, float]:
    if task == "asr":
        return asr_scores([ref], [hyp])
    bleu, chrf = BLEU(effective_order=True), CHRF()
    return {"bleu": bleu.sentence_score(hyp, [ref]).score, "chrf": chrf.sentence_score(hyp, [ref]).score}
