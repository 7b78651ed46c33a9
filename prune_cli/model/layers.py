"""Building blocks shared by encoder and decoder.

Dropout acts on each block's output only, not on hidden activations or attention weights: it is what makes the
model tolerate perturbed branches (and so pruning), and on CPU drawing masks for the 4x-wide hidden activations
took a quarter of a training step.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prune_cli.model.gated import Gate, scaled


class FeedForward(nn.Module):
    """Pre-LN feed-forward block: SiLU in the E-Branchformer, GELU in Whisper."""

    def __init__(self, d: int, hidden: int, dropout: float, activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
                 eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps)
        self.w1 = nn.Linear(d, hidden)
        self.w2 = nn.Linear(hidden, d)
        self.dropout = dropout
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.w2(self.activation(self.w1(self.norm(x)))), self.dropout, self.training)


class MultiHeadAttention(nn.Module):
    """Pre-LN multi-head attention; with `kv_cache` it appends this step's keys/values (self) or reuses them (cross)."""

    def __init__(self, d: int, heads: int, dropout: float, cross: bool = False, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps)
        self.heads = heads
        self.cross = cross
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.dropout = dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        mem: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        kv_cache: dict[str, torch.Tensor] | None = None,
        key: str = "",
    ) -> torch.Tensor:
        h = self.norm(x)
        q = self._split(self.q(h))
        if self.cross:
            if kv_cache is not None and f"{key}.k" in kv_cache:
                k, v = kv_cache[f"{key}.k"], kv_cache[f"{key}.v"]
            else:
                k, v = self._split(self.k(mem)), self._split(self.v(mem))
                if kv_cache is not None:
                    kv_cache[f"{key}.k"], kv_cache[f"{key}.v"] = k, v
        else:
            k, v = self._split(self.k(h)), self._split(self.v(h))
            if kv_cache is not None:
                if f"{key}.k" in kv_cache:
                    k = torch.cat([kv_cache[f"{key}.k"], k], dim=2)
                    v = torch.cat([kv_cache[f"{key}.v"], v], dim=2)
                kv_cache[f"{key}.k"], kv_cache[f"{key}.v"] = k, v
        if causal and mask is None and q.shape[2] > 1:
            # With a cache the new queries sit at the end: position i sees keys <= offset + i.
            offset = k.shape[2] - q.shape[2]
            qi = torch.arange(q.shape[2], device=q.device)[:, None] + offset
            mask = qi >= torch.arange(k.shape[2], device=q.device)[None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, t, _ = o.shape
        return F.dropout(self.out(o.transpose(1, 2).reshape(b, t, -1)), self.dropout, self.training)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, 2T-1) scores against relative positions T-1 .. -(T-1) -> (B, H, T, T) scores of key j for query i
    at position i - j (Transformer-XL's shift, as ESPnet computes it)."""
    b, h, t, n = x.shape
    x = F.pad(x, (1, 0)).view(b, h, n + 1, t)[:, :, 1:].reshape(b, h, t, n)
    return x[..., : n // 2 + 1]


class RelPositionAttention(MultiHeadAttention):
    """Self-attention with relative positions (Transformer-XL; ESPnet's RelPositionMultiHeadedAttention, "latest"):
    content scores from q + u, position scores from q + v against the projected relative encodings."""

    def __init__(self, d: int, heads: int, dropout: float, cross: bool = False, eps: float = 1e-5):
        super().__init__(d, heads, dropout, cross, eps)
        self.pos = nn.Linear(d, d, bias=False)
        self.bias_u = nn.Parameter(torch.zeros(heads, d // heads))
        self.bias_v = nn.Parameter(torch.zeros(heads, d // heads))

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x (B, T, d); pos_emb (1, 2T-1, d); mask (B, 1, 1, T), True where a key may be attended."""
        h = self.norm(x)
        q, k, v = self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))
        p = self._split(self.pos(pos_emb))
        scale = q.shape[-1] ** -0.5
        bd = rel_shift(torch.matmul(q + self.bias_v[:, None], p.transpose(-2, -1))) * scale
        o = F.scaled_dot_product_attention(q + self.bias_u[:, None], k, v, attn_mask=bd.masked_fill(~mask, float("-inf")))
        b, _, t, _ = o.shape
        return F.dropout(self.out(o.transpose(1, 2).reshape(b, t, -1)), self.dropout, self.training)


def depthwise_conv_time(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """Depthwise convolution over time of x (B, T, C) with Conv1d weights (C, 1, K); returns (B, T, C).

    Run as a 1xK conv2d on a channels-last view of x: on CPU oneDNN's NHWC depthwise kernel is 4x (batch 1) to 25x
    (batch 8+) faster than conv1d on the transposed tensor, which was a third of the encoder's time.
    """
    y = F.conv2d(x.transpose(1, 2).unsqueeze(2), weight.unsqueeze(2), bias, padding=(0, padding), groups=x.shape[-1])
    return y.squeeze(2).transpose(1, 2)


class ConvGatedMLP(nn.Module):
    """cgMLP branch of E-Branchformer: up-projection, convolutional spatial gating unit, down-projection."""

    def __init__(self, d: int, hidden: int, kernel: int, dropout: float, eps: float = 1e-5, mask_padding: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps)
        self.up = nn.Linear(d, hidden)
        self.gate_norm = nn.LayerNorm(hidden // 2, eps)
        self.mask_padding = mask_padding  # ESPnet's cgMLP lets padded frames into its convolution
        self.conv = nn.Conv1d(hidden // 2, hidden // 2, kernel, padding=kernel // 2, groups=hidden // 2)
        self.down = nn.Linear(hidden // 2, d)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        h = F.gelu(self.up(self.norm(x)))
        a, g = h.chunk(2, dim=-1)
        g = self.gate_norm(g)
        if pad is not None and self.mask_padding:
            g = g.masked_fill(pad.unsqueeze(-1), 0.0)
        g = depthwise_conv_time(g, self.conv.weight, self.conv.bias, self.conv.padding[0])
        return F.dropout(self.down(a * g), self.dropout, self.training)


class BranchMerge(nn.Module):
    """E-Branchformer merge: concat(attn, cgmlp) + depthwise conv, then projection.

    Each half is computed only when its branch ran. Without biases (our own model) a skipped branch contributes
    exactly nothing; with them (ESPnet's) it contributes what a zero output would: its half of the conv bias,
    projected, which `forward` adds as a constant.
    """

    def __init__(self, d: int, kernel: int, dropout: float, bias: bool = False):
        super().__init__()
        self.dw = nn.Conv1d(2 * d, 2 * d, kernel, padding=kernel // 2, groups=2 * d, bias=bias)
        self.proj = nn.Linear(2 * d, d, bias=bias)
        self.d = d
        self.dropout = dropout

    def skipped_output(self) -> torch.Tensor | None:
        """The merge's output when both branches are skipped (zero outputs): None without biases."""
        if self.dw.bias is None:
            return None
        return F.dropout(F.linear(self.dw.bias, self.proj.weight, self.proj.bias), self.dropout, self.training)

    def forward(self, a: torch.Tensor | None, c: torch.Tensor | None) -> torch.Tensor:
        d = self.d
        parts, sl = [], []
        if a is not None:
            parts.append(a)
            sl.append(slice(0, d))
        if c is not None:
            parts.append(c)
            sl.append(slice(d, 2 * d))
        b_dw = self.dw.bias
        if len(parts) == 2:
            cat, w_dw, w_p = torch.cat(parts, -1), self.dw.weight, self.proj.weight
            out = F.linear(cat + depthwise_conv_time(cat, w_dw, b_dw, self.dw.padding[0]), w_p, self.proj.bias)
        else:
            cat, w_dw, w_p = parts[0], self.dw.weight[sl[0]], self.proj.weight[:, sl[0]]
            out = F.linear(cat + depthwise_conv_time(cat, w_dw, None if b_dw is None else b_dw[sl[0]], self.dw.padding[0]), w_p)
            if b_dw is not None:  # the skipped half's zero output: its conv bias, projected
                other = slice(d, 2 * d) if sl[0].start == 0 else slice(0, d)
                out = out + F.linear(b_dw[other], self.proj.weight[:, other], self.proj.bias)
        return F.dropout(out, self.dropout, self.training)


def sinusoid(length: int, d: int) -> torch.Tensor:
    pos = torch.arange(length).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
    pe = torch.zeros(length, d)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


class Conv2dSubsampling(nn.Module):
    """4x time subsampling with two stride-2 convolutions."""

    def __init__(self, n_mels: int, channels: int, d: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, 2), nn.ReLU(), nn.Conv2d(channels, channels, 3, 2), nn.ReLU()
        )
        f = ((n_mels - 3) // 2 + 1 - 3) // 2 + 1
        self.proj = nn.Linear(channels * f, d)

    @staticmethod
    def out_lengths(lengths: torch.Tensor) -> torch.Tensor:
        return ((lengths - 3) // 2 + 1 - 3) // 2 + 1

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x.unsqueeze(1))  # (B, C, T', F')
        b, c, t, f = h.shape
        return self.proj(h.permute(0, 2, 1, 3).reshape(b, t, c * f)), self.out_lengths(lengths)


class DecoderLayer(nn.Module):
    """A pre-LN Transformer decoder layer, both families': self-attention, cross-attention and feed-forward, each
    skipped under a None gate and absent once pruned away (`removed`)."""

    def __init__(self, d: int, heads: int, ffn_dim: int, dropout: float, removed: set[str],
                 attention: type[MultiHeadAttention] = MultiHeadAttention,
                 activation: Callable[[torch.Tensor], torch.Tensor] = F.silu, eps: float = 1e-5):
        super().__init__()
        self.self_attn = None if "self_attn" in removed else attention(d, heads, dropout, eps=eps)
        self.src_attn = None if "src_attn" in removed else attention(d, heads, dropout, cross=True, eps=eps)
        self.ffn = None if "ffn" in removed else FeedForward(d, ffn_dim, dropout, activation, eps)

    def forward(
        self, x: torch.Tensor, mem: torch.Tensor, mem_mask: torch.Tensor | None, g: Sequence[Gate],
        cache: dict[str, torch.Tensor] | None, idx: int,
    ) -> torch.Tensor:
        if g[0] is not None:
            x = x + scaled(self.self_attn(x, causal=True, kv_cache=cache, key=f"{idx}.self"), g[0])
        if g[1] is not None:
            x = x + scaled(self.src_attn(x, mem=mem, mask=mem_mask, kv_cache=cache, key=f"{idx}.src"), g[1])
        if g[2] is not None:
            x = x + scaled(self.ffn(x), g[2])
        return x
