"""Batched greedy and beam search with a KV cache. One batch = one prompt context and one keep pattern.

Beam search can score every partial hypothesis with the CTC head as well (joint CTC/attention decoding, as in
ESPnet/OWSM): the attention decoder's language-model prior adds or drops whole number words
("siebzehn" -> "siebzehnhundertzehn", "millesettecentotrentasette" -> "millesettecentosette"); the frame-synchronous
CTC prefix score penalizes text the audio does not support while the beam is still open. CTC is trained on the
source transcript, so joint decoding applies to ASR only.

Temperature fallback (Whisper's decoders, openai-whisper and faster-whisper alike): an output whose text compresses
too well (gzip ratio above `compression_ratio_threshold`: a loop such as "1953 1953 1953 ...") or whose average token
log-probability is below `logprob_threshold` is decoded again by sampling at the next temperature, `best_of`
samples each; the first attempt that passes both tests is kept, else (faster-whisper's rule) the attempt with the
best average log-probability among those under the compression threshold, or among all. The encoder runs once.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from prune_cli.data.tokenizer import BASE_SPECIALS, EOS
from prune_cli.model.ctc_prefix import CTCPrefixScorer
from prune_cli.model.gated import GatedModel


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
    temperatures: tuple[float, ...] = (0.0,)  # one entry: no fallback; 0.0 decodes as above (greedy or beam)
    compression_ratio_threshold: float | None = 2.4  # fallback above this gzip ratio of the text (None: test off)
    logprob_threshold: float | None = -1.0  # fallback below this average log-probability per token (None: off)
    best_of: int = 5  # samples per utterance at a temperature above 0; the best average log-probability wins
    seed: int = 0  # the sampling generator's seed: the same batch decodes the same way every time


@dataclass
class Hypothesis:
    tokens: list[int]
    avg_logprob: float  # sum of the tokens' (and the end of text's) log-probabilities / (len(tokens) + 1)
    compression_ratio: float = 0.0
    temperature: float = 0.0


def compression_ratio(text: str) -> float:
    """gzip compression ratio of the text, as openai-whisper computes it: a repetition loop compresses well."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def _suppressed(logits: torch.Tensor, first: bool, opts: DecodeOptions) -> torch.Tensor:
    ids = opts.suppress + (opts.suppress_begin if first else ())
    if not ids:
        return logits
    logits = logits.clone()
    logits[:, list(ids)] = float("-inf")
    return logits


def _step_limits(model: GatedModel, mem_lens: torch.Tensor, prompt_len: int, opts: DecodeOptions) -> torch.Tensor:
    """Each utterance's most output tokens: max_len_ratio per encoder frame of its own audio, within the decoder's
    positions (so the cap follows the audio's duration, also under Whisper's 30-s padding)."""
    budget = model.dims.max_len - prompt_len
    return (opts.max_len_ratio * mem_lens.float()).long().add(2).clamp(1, max(1, budget))


@torch.inference_mode()
def decode(
    model: GatedModel, feats: torch.Tensor, lens: torch.Tensor, prompt: Sequence[int],
    keep: Sequence[bool] | None, opts: DecodeOptions, text_of: Callable[[list[int]], str] | None = None,
) -> list[list[int]]:
    """Token ids (without prompt and EOS) for each utterance of the batch. With more than one temperature, `text_of`
    (the tokenizer's decode) gives the text whose compression ratio the fallback tests."""
    return [h.tokens for h in decode_hypotheses(model, feats, lens, prompt, keep, opts, text_of)]


@torch.inference_mode()
def decode_hypotheses(
    model: GatedModel, feats: torch.Tensor, lens: torch.Tensor, prompt: Sequence[int],
    keep: Sequence[bool] | None, opts: DecodeOptions, text_of: Callable[[list[int]], str] | None = None,
) -> list[Hypothesis]:
    """The kept hypothesis of each utterance, with its average log-probability, compression ratio and temperature."""
    fallback = len(opts.temperatures) > 1
    if fallback and text_of is None:
        raise ValueError("temperature fallback needs text_of, the tokenizer's decode")
    mem, mem_lens, mem_mask = model.encode(feats, lens, keep)
    b = mem.shape[0]
    start = _prompt_state(model, mem, mem_mask, prompt, keep) if fallback and opts.use_cache else None
    tried: list[list[Hypothesis]] = [[] for _ in range(b)]
    chosen: list[Hypothesis | None] = [None] * b
    todo = list(range(b))
    gen = torch.Generator(device=mem.device).manual_seed(opts.seed)
    for t in opts.temperatures:
        rows = torch.tensor(todo, device=mem.device)
        hyps = _attempt(model, mem[rows], mem_lens[rows], mem_mask[rows], prompt, keep, opts, t, gen,
                        None if start is None else (start, rows))
        still = []
        for i, h in zip(todo, hyps):
            h.temperature = t
            if fallback:  # the text is needed only for the fallback's test
                h.compression_ratio = compression_ratio(text_of(h.tokens))
            tried[i].append(h)
            if fallback and _needs_fallback(h, opts):
                still.append(i)
            else:
                chosen[i] = h
        todo = still
        if not todo:
            break
    for i in todo:  # no temperature passed both tests
        ok = [h for h in tried[i] if not _repetitive(h, opts)]
        chosen[i] = max(ok or tried[i], key=lambda h: h.avg_logprob)
    return [h for h in chosen if h is not None]


def _repetitive(h: Hypothesis, opts: DecodeOptions) -> bool:
    return opts.compression_ratio_threshold is not None and h.compression_ratio > opts.compression_ratio_threshold


def _needs_fallback(h: Hypothesis, opts: DecodeOptions) -> bool:
    too_unsure = opts.logprob_threshold is not None and h.avg_logprob < opts.logprob_threshold
    return _repetitive(h, opts) or too_unsure


def _prompt_state(model, mem, mem_mask, prompt, keep) -> tuple[dict[str, torch.Tensor], torch.Tensor]:  # noqa: ANN001
    """The decoder's cache after the prompt (its self-attention keys and values, and the cross-attention keys and values
    of the audio) and the first step's logits, for every row: each fallback attempt starts from them instead of
    projecting the audio again for each of its samples (with 30-s input, most of a sampled attempt's cost)."""
    cache: dict[str, torch.Tensor] = {}
    tokens = torch.tensor([list(prompt)] * mem.shape[0], device=mem.device)
    return cache, model.decode_logits(tokens, mem, mem_mask, keep, cache=cache)[:, -1]


def _attempt(model, mem, mem_lens, mem_mask, prompt, keep, opts: DecodeOptions, temperature: float,  # noqa: ANN001
             gen: torch.Generator, start=None) -> list[Hypothesis]:  # noqa: ANN001
    """One decode of every row: greedy or beam at temperature 0, else the best of `best_of` samples. `start`:
    (the prompt state of the whole batch, the rows these are), shared by every attempt."""
    b = mem.shape[0]
    if temperature == 0 and opts.beam_size > 1:
        seqs, scores, lengths = _beam(model, mem, mem_lens, mem_mask, prompt, keep, opts)
        k = opts.beam_size
        norm = scores.view(-1) / (((5.0 + lengths) / 6.0) ** opts.length_penalty)
        best = (norm.view(-1, k).argmax(-1) + torch.arange(b, device=mem.device) * k).tolist()
        return [Hypothesis(seqs[i], float(scores.view(-1)[i]) / (lengths[i].item() + 1)) for i in best]
    n = 1 if temperature == 0 else opts.best_of
    rep = lambda x: x.repeat_interleave(n, 0)  # noqa: E731
    init = None
    if start is not None:  # one gather per tensor: these rows, each repeated n times
        (cache, logits), rows = start
        pick = rows.repeat_interleave(n)
        init = ({k: v[pick] for k, v in cache.items()}, logits[pick])
    seqs, logps = _greedy(model, rep(mem), rep(mem_lens), rep(mem_mask), prompt, keep, opts, temperature, gen, init)
    hyps = [Hypothesis(q, lp / (len(q) + 1)) for q, lp in zip(seqs, logps)]
    return [max(hyps[i * n : (i + 1) * n], key=lambda h: h.avg_logprob) for i in range(b)]


def _greedy(model, mem, mem_lens, mem_mask, prompt, keep, opts, temperature: float = 0.0,  # noqa: ANN001
            gen: torch.Generator | None = None, init=None) -> tuple[list[list[int]], list[float]]:  # noqa: ANN001
    """Greedy (temperature 0) or sampled tokens of each row, and each row's summed log-probability (at temperature 1,
    as openai-whisper sums them, the end of text included). `init`: the cache and logits after the prompt."""
    b = mem.shape[0]
    tokens = torch.tensor([list(prompt)] * b, device=mem.device)
    eos = opts.eos
    if init is not None:
        cache, logits = init
    else:
        cache = {} if opts.use_cache else None
        logits = model.decode_logits(tokens, mem, mem_mask, keep, cache=cache)[:, -1]
    done = torch.zeros(b, dtype=torch.bool, device=mem.device)
    sum_logp = torch.zeros(b, device=mem.device)
    limits = _step_limits(model, mem_lens, len(prompt), opts)
    out: list[torch.Tensor] = []
    for step in range(int(limits.max())):
        logits = _suppressed(logits.float(), step == 0, opts)
        if temperature > 0:
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen)[:, 0]
        else:
            nxt = logits.argmax(-1)
        nxt = nxt.masked_fill(done, eos)
        sum_logp += logits.log_softmax(-1).gather(1, nxt[:, None])[:, 0].masked_fill(done, 0.0)
        out.append(nxt)
        done |= (nxt == eos) | (step + 1 >= limits)
        if bool(done.all()):
            break
        if opts.use_cache:
            logits = model.decode_logits(nxt[:, None], mem, mem_mask, keep, cache=cache, offset=tokens.shape[1])[:, -1]
            tokens = torch.cat([tokens, nxt[:, None]], 1)
        else:
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            logits = model.decode_logits(tokens, mem, mem_mask, keep)[:, -1]
    seqs = torch.stack(out, 1).tolist() if out else [[] for _ in range(b)]
    return [s[: s.index(eos)] if eos in s else s[: int(n)] for s, n in zip(seqs, limits.tolist())], sum_logp.tolist()


def _settled(scores: torch.Tensor, finished: torch.Tensor) -> bool:
    """True when every utterance's best finished hypothesis outscores all its open ones (scores and finished: (b, k)).

    Without a length penalty a score never rises as a hypothesis grows (attention log-probabilities and CTC prefix
    log-probabilities only fall), so the result is then final; a damaged pruned decoder that never emits EOS in
    one beam no longer runs the whole batch to the length limit.
    """
    best_finished = scores.masked_fill(~finished, float("-inf")).amax(-1)
    best_open = scores.masked_fill(finished, float("-inf")).amax(-1)
    return bool((best_finished >= best_open).all())


def _beam(model, mem, mem_lens, mem_mask, prompt, keep, opts) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """All b*k hypotheses (utterance-major, without prompt and EOS), their summed scores and their lengths.

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
    limits = _step_limits(model, mem_lens, len(prompt), opts).repeat_interleave(k)
    for step in range(int(limits.max())):
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
        finished = was_finished | (tok == eos) | (step + 1 >= limits)
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
    seqs = [s[: s.index(eos)] if eos in s else s[: int(n)] for s, n in zip(hyp.tolist(), limits.tolist())]
    return seqs, scores, lengths
