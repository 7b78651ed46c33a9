"""Batched greedy and beam search with a KV cache. One batch = one prompt context and one keep pattern.

Beam search can score every partial hypothesis with the CTC head as well (joint CTC/attention decoding, as in
ESPnet/OWSM): the attention decoder's language-model prior adds or drops whole number words
("siebzehn" -> "siebzehnhundertzehn", "millesettecentotrentasette" -> "millesettecentosette"); the frame-synchronous
CTC prefix score penalizes text the audio does not support while the beam is still open. CTC is trained on the
source transcript, so joint decoding applies to ASR only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from prune_cli.data.tokenizer import BASE_SPECIALS, EOS
from prune_cli.model.ctc_prefix import CTCPrefixScorer
from prune_cli.model.s2t import SpeechModel


@dataclass
class DecodeOptions:
    beam_size: int = 1
    length_penalty: float = 0.0
    max_len_ratio: float = 1.0
    use_cache: bool = True
    ctc_weight: float = 0.0  # joint score = (1 - w) * attention + w * CTC prefix score; needs beam_size > 1
    ctc_pre_beam: int = 0  # tokens per hypothesis scored by CTC each step; 0: 1.5 x beam_size, as ESPnet
    n_specials: int = len(BASE_SPECIALS)  # ids below this are not text (the tokenizer's specials): CTC never emits them
    eos: int = EOS
    suppress: tuple[int, ...] = ()  # never emitted (Whisper's non-speech symbols and prompt tokens)
    suppress_begin: tuple[int, ...] = ()  # not emitted first (Whisper: a bare space, end of text)


def _suppressed(logits: torch.Tensor, first: bool, opts: DecodeOptions) -> torch.Tensor:
    ids = opts.suppress + (opts.suppress_begin if first else ())
    if not ids:
        return logits
    logits = logits.clone()
    logits[:, list(ids)] = float("-inf")
    return logits


def _max_steps(model: SpeechModel, mem_lens: torch.Tensor, prompt_len: int, opts: DecodeOptions) -> int:
    budget = model.dims.max_len - prompt_len
    return max(1, min(budget, int(opts.max_len_ratio * int(mem_lens.max())) + 2))


@torch.inference_mode()
def decode(
    model: SpeechModel, feats: torch.Tensor, lens: torch.Tensor, prompt: Sequence[int],
    keep: Sequence[bool] | None, opts: DecodeOptions,
) -> list[list[int]]:
    """Token ids (without prompt and EOS) for each utterance of the batch."""
    mem, mem_lens, mem_mask = model.encode(feats, lens, keep)
    if opts.beam_size > 1:
        seqs, scores = _beam(model, mem, mem_lens, mem_mask, prompt, keep, opts)
        k = opts.beam_size
        best = scores.view(-1, k).argmax(-1) + torch.arange(mem.shape[0], device=mem.device) * k
        return [seqs[i] for i in best.tolist()]
    return _greedy(model, mem, mem_lens, mem_mask, prompt, keep, opts)


def _greedy(model, mem, mem_lens, mem_mask, prompt, keep, opts) -> list[list[int]]:  # noqa: ANN001
    b = mem.shape[0]
    tokens = torch.tensor([list(prompt)] * b, device=mem.device)
    cache: dict[str, torch.Tensor] | None = {} if opts.use_cache else None
    eos = opts.eos
    logits = model.decode_logits(tokens, mem, mem_mask, keep, cache=cache)[:, -1]
    done = torch.zeros(b, dtype=torch.bool, device=mem.device)
    out: list[torch.Tensor] = []
    for step in range(_max_steps(model, mem_lens, len(prompt), opts)):
        nxt = _suppressed(logits, step == 0, opts).argmax(-1).masked_fill(done, eos)
        out.append(nxt)
        done |= nxt == eos
        if bool(done.all()):
            break
        if opts.use_cache:
            logits = model.decode_logits(nxt[:, None], mem, mem_mask, keep, cache=cache, offset=tokens.shape[1])[:, -1]
            tokens = torch.cat([tokens, nxt[:, None]], 1)
        else:
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            logits = model.decode_logits(tokens, mem, mem_mask, keep)[:, -1]
    seqs = torch.stack(out, 1).tolist() if out else [[] for _ in range(b)]
    return [s[: s.index(eos)] if eos in s else s for s in seqs]


def _settled(scores: torch.Tensor, finished: torch.Tensor) -> bool:
    """True when every utterance's best finished hypothesis outscores all its open ones (scores and finished: (b, k)).

    Without a length penalty a score never rises as a hypothesis grows (attention log-probabilities and CTC prefix
    log-probabilities only fall), so the result is then final; a damaged pruned decoder that never emits EOS in
    one beam no longer runs the whole batch to the length limit.
    """
    best_finished = scores.masked_fill(~finished, float("-inf")).amax(-1)
    best_open = scores.masked_fill(finished, float("-inf")).amax(-1)
    return bool((best_finished >= best_open).all())


def _beam(model, mem, mem_lens, mem_mask, prompt, keep, opts) -> tuple[list[list[int]], torch.Tensor]:  # noqa: ANN001
    """All b*k hypotheses (utterance-major, without prompt and EOS) and their length-normalized scores.

    With ctc_weight w > 0 a hypothesis scores (1 - w) * attention + w * CTC prefix log-probability, and only the
    attention's best `ctc_pre_beam` tokens of each hypothesis are scored by CTC (ESPnet's pre-beam)."""
    b, k = mem.shape[0], opts.beam_size
    dev = mem.device
    w = opts.ctc_weight
    ctc = None
    if w > 0:
        ctc = CTCPrefixScorer(model.ctc(mem), mem_lens, opts.n_specials, copies=k)
    state = ctc.initial() if ctc is not None else None
    mem = mem.repeat_interleave(k, 0)
    mem_mask = mem_mask.repeat_interleave(k, 0)
    tokens = torch.tensor([list(prompt)] * (b * k), device=dev)
    cache: dict[str, torch.Tensor] | None = {} if opts.use_cache else None
    eos = opts.eos
    logp = _suppressed(model.decode_logits(tokens, mem, mem_mask, keep, cache=cache)[:, -1].float(), True, opts).log_softmax(-1)
    vocab = logp.shape[-1]
    n_cand = vocab if ctc is None else min(vocab, opts.ctc_pre_beam or max(2, 3 * k // 2))
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    finished = torch.zeros(b * k, dtype=torch.bool, device=dev)
    lengths = torch.zeros(b * k, device=dev)
    hyp = torch.empty(b * k, 0, dtype=torch.long, device=dev)
    for _ in range(_max_steps(model, mem_lens, len(prompt), opts)):
        # A finished beam may only extend with EOS, at no cost, so it keeps its score.
        logp = logp.masked_fill(finished[:, None], float("-inf"))
        logp[finished, eos] = 0.0
        if ctc is None:
            inc, cand = logp, torch.arange(vocab, device=dev).expand(b * k, -1)
        else:
            att, cand = logp.topk(n_cand, -1)
            psi, r = ctc.score(state, cand)
            inc = (1 - w) * att + w * (psi - state.psi[:, None])
            inc = torch.where(finished[:, None], att, inc)
            inc = inc.masked_fill(inc.isnan(), float("-inf"))  # -inf - -inf: a prefix CTC cannot align
        top, idx = (scores.view(-1, 1) + inc).view(b, k * n_cand).topk(k, dim=-1)
        beam = (idx // n_cand + torch.arange(b, device=dev)[:, None] * k).view(-1)
        col = (idx % n_cand).view(-1)
        tok = cand[beam, col]
        if ctc is not None:
            state = ctc.select(r, psi, cand, beam, col)
        hyp = torch.cat([hyp[beam], tok[:, None]], 1)
        was_finished = finished[beam]
        lengths = lengths[beam] + (~was_finished).float()
        finished = was_finished | (tok == eos)
        scores = top
        if cache is not None:
            for key in list(cache):
                if ".self." in key:  # self-attention caches follow their beams
                    cache[key] = cache[key][beam]
        if bool(finished.all()) or (opts.length_penalty == 0 and _settled(scores, finished.view(b, k))):
            break
        tokens = torch.cat([tokens[beam], tok[:, None]], 1)
        if cache is not None:
            logits = model.decode_logits(tok[:, None], mem, mem_mask, keep, cache=cache, offset=tokens.shape[1] - 1)
        else:
            logits = model.decode_logits(tokens, mem, mem_mask, keep)
        logp = _suppressed(logits[:, -1].float(), False, opts).log_softmax(-1)
    norm = scores.view(-1) / (((5.0 + lengths) / 6.0) ** opts.length_penalty)
    seqs = [s[: s.index(eos)] if eos in s else s for s in hyp.tolist()]
    return seqs, norm
