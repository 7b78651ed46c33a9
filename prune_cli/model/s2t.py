"""OWSM-style speech-to-text model: conv subsampling, E-Branchformer encoder, Transformer decoder, CTC head.

Every prunable module is a residual branch with a stable name (`encoder.3.cgmlp`, `decoder.1.src_attn`), gated as
model/gated.py describes.
In the encoder, attention and cgMLP are gated as two modules; their merge computes only the halves that ran.
Unlike ESPnet's E-Branchformer, layers have no final LayerNorm of their own: every branch is pre-LN and one norm
closes the stack. A per-layer norm on the residual stream slowed convergence several-fold in our CPU budget
(overfitting 16 utterances with CTC: 100 steps not enough with it, 80 steps to loss < 0.1 without), and it would
also make a skipped layer not an identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prune_cli.model.gated import Gate, GatedModel, removed_kinds, scaled
from prune_cli.model.layers import (
    BranchMerge,
    Conv2dSubsampling,
    ConvGatedMLP,
    DecoderLayer,
    FeedForward,
    MultiHeadAttention,
    RelPositionAttention,
    sinusoid,
)

ENC_KINDS = ("ffn1", "attn", "cgmlp", "ffn2")
DEC_KINDS = ("self_attn", "src_attn", "ffn")

MAX_ENCODER_POSITIONS = 4096  # sinusoidal positions after 4x subsampling: about 164 s of audio


@dataclass(frozen=True)
class ModelDims:
    n_mels: int
    vocab: int
    d_model: int
    heads: int
    enc_layers: int
    dec_layers: int
    ffn_dim: int
    cgmlp_dim: int
    cgmlp_kernel: int
    merge_kernel: int
    frontend_channels: int
    dropout: float
    max_len: int


ESPNET_EPS = 1e-12  # ESPnet's LayerNorm


class EBranchformerLayer(nn.Module):
    """Macaron FFN, attention and cgMLP branches merged, macaron FFN. `espnet`: the layer as ESPnet computes it
    (OWSM): biased merge, a final LayerNorm, LayerNorm eps 1e-12, padded frames not masked in the cgMLP convolution;
    a skipped module is one whose output is zero (model/gated.py). `rel_pos`: relative-position attention."""

    def __init__(self, dims: ModelDims, removed: set[str], espnet: bool = False, rel_pos: bool = False):
        super().__init__()
        d, p = dims.d_model, dims.dropout
        eps = ESPNET_EPS if espnet else 1e-5
        attention = RelPositionAttention if rel_pos else MultiHeadAttention
        self.ffn1 = None if "ffn1" in removed else FeedForward(d, dims.ffn_dim, p, eps=eps)
        self.attn = None if "attn" in removed else attention(d, dims.heads, p, eps=eps)
        self.cgmlp = None if "cgmlp" in removed else ConvGatedMLP(d, dims.cgmlp_dim, dims.cgmlp_kernel, p, eps, not espnet)
        # With biases the merge adds a constant even with both branches skipped, so it stays.
        self.merge = None if {"attn", "cgmlp"} <= removed and not espnet else BranchMerge(d, dims.merge_kernel, p, espnet)
        self.ffn2 = None if "ffn2" in removed else FeedForward(d, dims.ffn_dim, p, eps=eps)
        self.final_norm = nn.LayerNorm(d, eps) if espnet else None

    def forward(self, x: torch.Tensor, pad: torch.Tensor, attn_mask: torch.Tensor, g: Sequence[Gate],
                pos_emb: torch.Tensor | None = None) -> torch.Tensor:
        if g[0] is not None:
            x = x + 0.5 * scaled(self.ffn1(x), g[0])
        a = None
        if g[1] is not None:
            a = scaled(self.attn(x, pos_emb, attn_mask) if pos_emb is not None else self.attn(x, mask=attn_mask), g[1])
        c = scaled(self.cgmlp(x, pad), g[2]) if g[2] is not None else None
        if a is not None or c is not None:
            x = x + self.merge(a, c)
        elif self.merge is not None and (const := self.merge.skipped_output()) is not None:
            x = x + const
        if g[3] is not None:
            x = x + 0.5 * scaled(self.ffn2(x), g[3])
        return x if self.final_norm is None else self.final_norm(x)


class Encoder(nn.Module):
    def __init__(self, dims: ModelDims, removed: set[str]):
        super().__init__()
        self.frontend = Conv2dSubsampling(dims.n_mels, dims.frontend_channels, dims.d_model)
        self.register_buffer("pe", sinusoid(MAX_ENCODER_POSITIONS, dims.d_model), persistent=False)
        self.layers = nn.ModuleList(
            EBranchformerLayer(dims, removed_kinds(removed, "encoder", i))
            for i in range(dims.enc_layers)
        )
        self.norm = nn.LayerNorm(dims.d_model)
        self.dropout = dims.dropout

    def forward(self, feats: torch.Tensor, lens: torch.Tensor, gates: list[Sequence[Gate]]):
        x, lens = self.frontend(feats, lens)
        x = F.dropout(x + self.pe[: x.shape[1]], self.dropout, self.training)
        pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lens[:, None]  # (B, T) True = padding
        attn_mask = ~pad[:, None, None, :]
        for layer, g in zip(self.layers, gates):
            x = layer(x, pad, attn_mask, g)
        return self.norm(x), lens, attn_mask


class Decoder(nn.Module):
    def __init__(self, dims: ModelDims, removed: set[str]):
        super().__init__()
        self.embed = nn.Embedding(dims.vocab, dims.d_model)
        nn.init.normal_(self.embed.weight, std=dims.d_model**-0.5)  # tied output: keep initial logits O(1)
        self.pos = nn.Parameter(torch.randn(dims.max_len, dims.d_model) * 0.02)
        self.layers = nn.ModuleList(
            DecoderLayer(dims.d_model, dims.heads, dims.ffn_dim, dims.dropout, removed_kinds(removed, "decoder", i))
            for i in range(dims.dec_layers)
        )
        self.norm = nn.LayerNorm(dims.d_model)
        self.dropout = dims.dropout

    def forward(
        self, tokens: torch.Tensor, mem: torch.Tensor, mem_mask: torch.Tensor, gates: list[Sequence[Gate]],
        cache: dict[str, torch.Tensor] | None = None, offset: int = 0,
    ) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[offset : offset + tokens.shape[1]]
        x = F.dropout(x, self.dropout, self.training)
        for i, (layer, g) in enumerate(zip(self.layers, gates)):
            x = layer(x, mem, mem_mask, g, cache, i)
        return self.norm(x) @ self.embed.weight.T  # tied output projection


class SpeechModel(GatedModel):
    family = "ebranchformer"
    enc_kinds = ENC_KINDS
    dec_kinds = DEC_KINDS

    def __init__(self, dims: ModelDims, removed: Sequence[str] = ()):
        super().__init__(dims, removed)
        self.encoder = Encoder(dims, set(self.removed))
        self.decoder = Decoder(dims, set(self.removed))
        self.ctc = nn.Linear(dims.d_model, dims.vocab)

    def forward(self, feats, lens, dec_in, keep=None, scale=None):  # noqa: ANN001
        mem, mem_lens, mem_mask = self.encode(feats, lens, keep, scale)
        logits = self.decode_logits(dec_in, mem, mem_mask, keep, scale)
        return logits, self.ctc(mem), mem_lens


def max_input_frames() -> int:
    """The longest input (10 ms fbank frames) whose subsampled length fits the encoder's positional table."""
    t = 4 * MAX_ENCODER_POSITIONS
    while int(Conv2dSubsampling.out_lengths(torch.tensor(t + 1))) <= MAX_ENCODER_POSITIONS:
        t += 1
    while int(Conv2dSubsampling.out_lengths(torch.tensor(t))) > MAX_ENCODER_POSITIONS:
        t -= 1
    return t


def dims_from_recipe(model_cfg, n_mels: int, vocab: int) -> ModelDims:  # noqa: ANN001
    return ModelDims(
        n_mels=n_mels, vocab=vocab, d_model=model_cfg.d_model, heads=model_cfg.heads,
        enc_layers=model_cfg.enc_layers, dec_layers=model_cfg.dec_layers, ffn_dim=model_cfg.ffn_dim,
        cgmlp_dim=model_cfg.cgmlp_dim, cgmlp_kernel=model_cfg.cgmlp_kernel, merge_kernel=model_cfg.merge_kernel,
        frontend_channels=model_cfg.frontend_channels, dropout=model_cfg.dropout, max_len=model_cfg.max_len,
    )


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
