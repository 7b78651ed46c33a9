"""Batched greedy and beam search with a KV cache. One batch = one prompt context and one keep pattern.

Beam search can rescore its final hypotheses with the CTC head (joint CTC/attention decoding, as in ESPnet/OWSM):
the attention decoder's language-model prior adds or drops whole number words ("siebzehn" -> "siebzehnhundertzehn");
the frame-synchronous CTC score penalizes text the audio does not support. CTC is trained on the source transcript,
so the rescoring applies to ASR only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from prune_cli.data.tokenizer import BLANK, EOS
from prune_cli.model.s2t import SpeechModel


@dataclass
class DecodeOptions:
    beam_size: int = 1
    length_penalty: float = 0.0
    max_len_ratio: float = 1.0
    use_cache: bool = True
    ctc_weight: float = 0.0  # final score = (1 - w) * attention + w * CTC log-likelihood; needs beam_size > 1


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
        seqs, att = _beam(model, mem, mem_lens, mem_mask, prompt, keep, opts)
        k = opts.beam_size
        if opts.ctc_weight > 0:
            ctc = ctc_log_likelihood(model.ctc(mem), mem_lens, seqs, k)
            joint = ((1 - opts.ctc_weight) * att + opts.ctc_weight * ctc).view(-1, k)
            # An utterance none of whose hypotheses CTC can align keeps the attention ranking.
            att = torch.where(joint.isfinite().any(-1, keepdim=True), joint, att.view(-1, k))
        best = att.view(-1, k).argmax(-1) + torch.arange(mem.shape[0], device=mem.device) * k
        return [seqs[i] for i in best.tolist()]
    return _greedy(model, mem, mem_lens, mem_mask, prompt, keep, opts)


def _greedy(model, mem, mem_lens, mem_mask, prompt, keep, opts) -> list[list[int]]:  # noqa: ANN001
    b = mem.shape[0]
    tokens = torch.tensor([list(prompt)] * b, device=mem.device)
    cache: dict[str, torch.Tensor] | None = {} if opts.use_cache else None
    logits = model.decode_logits(tokens, mem, mem_mask, keep, cache=cache)[:, -1]
    done = torch.zeros(b, dtype=torch.bool, device=mem.device)
    out: list[torch.Tensor] = []
    for _ in range(_max_steps(model, mem_lens, len(prompt), opts)):
        nxt = logits.argmax(-1).masked_fill(done, EOS)
        out.append(nxt)
        done |= nxt == EOS
        if bool(done.all()):
            break
        if opts.use_cache:
            logits = model.decode_logits(nxt[:, None], mem, mem_mask, keep, cache=cache, offset=tokens.shape[1])[:, -1]
            tokens = torch.cat([tokens, nxt[:, None]], 1)
        else:
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            logits = model.decode_logits(tokens, mem, mem_mask, keep)[:, -1]
    seqs = torch.stack(out, 1).tolist() if out else [[] for _ in range(b)]
    return [s[: s.index(EOS)] if EOS in s else s for s in seqs]


def ctc_log_likelihood(ctc_logits: torch.Tensor, mem_lens: torch.Tensor, seqs: list[list[int]], k: int) -> torch.Tensor:
    """log P_ctc(seq | audio) for k hypotheses per utterance (seqs ordered utterance-major)."""
    lp = ctc_logits.float().log_softmax(-1).repeat_interleave(k, 0).transpose(0, 1)
    targets = [torch.tensor(q, dtype=torch.long) for q in seqs]
    lens = torch.tensor([len(q) for q in seqs], dtype=torch.long)
    padded = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True) if int(lens.max()) else torch.zeros(len(seqs), 1, dtype=torch.long)
    # Infinite loss (a hypothesis longer than the audio allows) stays -inf: never chosen over a feasible one.
    nll = F.ctc_loss(lp, padded.to(lp.device), mem_lens.repeat_interleave(k), lens, blank=0, reduction="none")
    has_blank = torch.tensor([BLANK in q for q in seqs], device=nll.device)  # not a CTC label sequence
    return (-nll).masked_fill(has_blank, float("-inf"))


def _beam(model, mem, mem_lens, mem_mask, prompt, keep, opts) -> tuple[list[list[int]], torch.Tensor]:  # noqa: ANN001
    """All b*k hypotheses (utterance-major, without prompt and EOS) and their length-normalized scores."""
    b, k = mem.shape[0], opts.beam_size
    dev = mem.device
    mem = mem.repeat_interleave(k, 0)
    mem_mask = mem_mask.repeat_interleave(k, 0)
    tokens = torch.tensor([list(prompt)] * (b * k), device=dev)
    cache: dict[str, torch.Tensor] | None = {} if opts.use_cache else None
    logp = model.decode_logits(tokens, mem, mem_mask, keep, cache=cache)[:, -1].float().log_softmax(-1)
    vocab = logp.shape[-1]
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    finished = torch.zeros(b * k, dtype=torch.bool, device=dev)
    lengths = torch.zeros(b * k, device=dev)
    hyp = torch.empty(b * k, 0, dtype=torch.long, device=dev)
    for _ in range(_max_steps(model, mem_lens, len(prompt), opts)):
        # A finished beam may only extend with EOS, at no cost, so it keeps its score.
        logp = logp.masked_fill(finished[:, None], float("-inf"))
        logp[finished, EOS] = 0.0
        cand = (scores.view(-1, 1) + logp).view(b, k * vocab)
        top, idx = cand.topk(k, dim=-1)
        beam = idx // vocab + torch.arange(b, device=dev)[:, None] * k
        tok = idx % vocab
        beam, tok = beam.view(-1), tok.view(-1)
        hyp = torch.cat([hyp[beam], tok[:, None]], 1)
        was_finished = finished[beam]
        lengths = lengths[beam] + (~was_finished).float()
        finished = was_finished | (tok == EOS)
        scores = top
        if cache is not None:
            for key in list(cache):
                if ".self." in key:  # self-attention caches follow their beams
                    cache[key] = cache[key][beam]
        if bool(finished.all()):
            break
        tokens = torch.cat([tokens[beam], tok[:, None]], 1)
        if cache is not None:
            logits = model.decode_logits(tok[:, None], mem, mem_mask, keep, cache=cache, offset=tokens.shape[1] - 1)
        else:
            logits = model.decode_logits(tokens, mem, mem_mask, keep)
        logp = logits[:, -1].float().log_softmax(-1)
    norm = scores.view(-1) / (((5.0 + lengths) / 6.0) ** opts.length_penalty)
    seqs = [s[: s.index(EOS)] if EOS in s else s for s in hyp.tolist()]
    return seqs, norm
