"""Text metrics: WER/CER (jiwer) for ASR, BLEU/chrF (sacrebleu) for ST, per corpus and as per-utterance statistics."""

from __future__ import annotations

from typing import Sequence

import jiwer
import numpy as np
from sacrebleu.metrics import BLEU, CHRF

from prune_cli.data.normalize import normalize

LOWER_IS_BETTER = {"wer", "cer"}


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
    """Corpus BLEU and chrF (sacrebleu defaults) on the raw detokenized text, with signatures."""
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(list(hyps), [list(refs)])
    c = chrf.corpus_score(list(hyps), [list(refs)])
    return {"bleu": b.score, "chrf": c.score}, {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())}


def utterance_score(task: str, ref: str, hyp: str) -> dict[str, float]:
    if task == "asr":
        return asr_scores([ref], [hyp])
    bleu, chrf = BLEU(effective_order=True), CHRF()
    return {"bleu": bleu.sentence_score(hyp, [ref]).score, "chrf": chrf.sentence_score(hyp, [ref]).score}


def utterance_stats(task: str, refs: Sequence[str], hyps: Sequence[str], with_bleu: bool = True) -> dict[str, np.ndarray]:
    """Per-utterance sufficient statistics (n_utts, k) of each metric `eval` reports for this task: summed over
    utterances, they give the corpus score (BLEU/chrF through sacrebleu's own statistics, as its significance tests).
    with_bleu=False: chrF only (a context BLEU cannot score, see bleu_measurable)."""
    if task == "asr":
        words, chars = [], []
        for r, h in zip(refs, hyps):
            r, h = normalize(r), normalize(h)
            w, c = jiwer.process_words(r, h), jiwer.process_characters(r, h)
            words.append([w.substitutions + w.deletions + w.insertions, w.hits + w.substitutions + w.deletions])
            chars.append([c.substitutions + c.deletions + c.insertions, c.hits + c.substitutions + c.deletions])
        return {"wer": np.array(words, dtype=np.int64), "cer": np.array(chars, dtype=np.int64)}
    metrics = (("bleu", BLEU()), ("chrf", CHRF())) if with_bleu else (("chrf", CHRF()),)
    return {name: np.array(metric._extract_corpus_statistics(list(hyps), [list(refs)]), dtype=np.int64)
            for name, metric in metrics}


def score_rows(metric: str, summed: np.ndarray) -> np.ndarray:
    """Corpus score of each row of summed statistics (rows: resamples)."""
    if metric in LOWER_IS_BETTER:
        return 100.0 * summed[:, 0] / np.maximum(summed[:, 1], 1)
    scorer = BLEU() if metric == "bleu" else CHRF()
    return np.array([scorer._compute_score_from_stats(row).score for row in summed])
