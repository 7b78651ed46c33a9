"""CTC prefix scoring for label-synchronous joint CTC/attention beam search (Watanabe et al. 2017; ESPnet's
CTCPrefixScore), vectorized over hypotheses and candidate tokens.

For a prefix g, r[t] = (log P(g, frames <= t, last frame non-blank), log P(g, frames <= t, last frame blank)).
The prefix score psi(g + c) = log P(the CTC output starts with g + c); for c = EOS it is the full-sequence
log-likelihood log P_ctc(g | audio).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prune_cli.data.tokenizer import BLANK, EOS

NEG_INF = float("-inf")


@dataclass
class PrefixState:
    r: torch.Tensor  # (T, N, 2): non-blank / blank forward log-probabilities of each hypothesis' prefix
    psi: torch.Tensor  # (N,): prefix score of each hypothesis
    last: torch.Tensor  # (N,): last token of the prefix, -1 for the empty prefix


class CTCPrefixScorer:
    def __init__(self, ctc_logits: torch.Tensor, lens: torch.Tensor, specials: int, copies: int = 1):
        """ctc_logits (B, T, V) per utterance, each scored for `copies` consecutive hypotheses (N = B * copies);
        frames past an utterance's length emit blank with probability 1."""
        lp = ctc_logits.float().log_softmax(-1).transpose(0, 1).clone()  # (T, B, V)
        pad = torch.arange(lp.shape[0], device=lp.device)[:, None] >= lens.to(lp.device)[None, :]
        lp[pad] = NEG_INF
        lp[..., BLANK] = lp[..., BLANK].masked_fill(pad, 0.0)
        self.lp = lp.repeat_interleave(copies, 1)  # (T, N, V)
        self.specials = specials  # ids below this are not text (blank, prompt tokens); EOS is handled apart

    def initial(self) -> PrefixState:
        t, n, _ = self.lp.shape
        r = torch.full((t, n, 2), NEG_INF, device=self.lp.device)
        r[:, :, 1] = self.lp[:, :, BLANK].cumsum(0)  # the empty prefix: blanks only
        return PrefixState(r, torch.zeros(n, device=self.lp.device), torch.full((n,), -1, device=self.lp.device))

    def score(self, state: PrefixState, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix scores (N, C) of each hypothesis extended by each candidate in cand (N, C), and their r (T, N, C, 2)."""
        t_max, n, _ = self.lp.shape
        x = self.lp.gather(2, cand.clamp(min=0)[None].expand(t_max, -1, -1))  # (T, N, C)
        blank = self.lp[:, :, BLANK : BLANK + 1]  # (T, N, 1)
        r_prev = state.r
        total = torch.logaddexp(r_prev[..., 0], r_prev[..., 1])  # (T, N)
        # A repeated label needs a blank in between: only blank-ending paths of g may continue into c == last(g).
        phi = torch.where((cand == state.last[:, None])[None], r_prev[..., 1:2], total[..., None])  # (T, N, C)
        r = torch.full((t_max, n, cand.shape[1], 2), NEG_INF, device=x.device)
        if t_max:
            r[0, :, :, 0] = torch.where((state.last < 0)[:, None], x[0], torch.full_like(x[0], NEG_INF))
        for t in range(1, t_max):
            r[t, ..., 0] = torch.logaddexp(r[t - 1, ..., 0], phi[t - 1]) + x[t]
            r[t, ..., 1] = torch.logaddexp(r[t - 1, ..., 0], r[t - 1, ..., 1]) + blank[t]
        psi = torch.logaddexp(r[0, ..., 0], (phi[:-1] + x[1:]).logsumexp(0)) if t_max > 1 else r[0, ..., 0]
        # EOS ends the hypothesis: its score is the whole prefix's CTC likelihood.
        psi = torch.where(cand == EOS, total[-1][:, None].expand_as(psi), psi)
        psi = psi.masked_fill((cand < self.specials) & (cand != EOS), NEG_INF)
        return psi, r

    @staticmethod
    def select(r: torch.Tensor, psi: torch.Tensor, cand: torch.Tensor, beam: torch.Tensor, pick: torch.Tensor
               ) -> PrefixState:
        """The state after choosing candidate column pick of hypothesis beam, for each new hypothesis."""
        return PrefixState(r[:, beam, pick], psi[beam, pick], cand[beam, pick])
