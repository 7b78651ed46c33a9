"""Whisper (Radford et al., 2022) with the gate contract of the E-Branchformer (see s2t.py).

Layout after openai-whisper's model.py: two-conv stem with GELU, sinusoidal encoder positions, learned decoder
positions, pre-LN attention and GELU MLP blocks, a final LayerNorm per stack, output tied to the token embedding.
Prunable modules are `encoder.i.attn`, `encoder.i.ffn`, `decoder.i.self_attn`, `decoder.i.src_attn`,
`decoder.i.ffn`; a gate of None means the module is not executed and the residual passes through.

The encoder takes Whisper's own 30-second input (3000 frames, nothing masked) or variable-length input: the
positional table is sliced to the input and padded frames are masked, in attention and between the two convs,
so an utterance gets the same encoding alone or in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prune_cli.model.gated import Gate, GatedModel, removed_kinds, scaled
from prune_cli.model.layers import DecoderLayer, FeedForward, MultiHeadAttention

ENC_KINDS = ("attn", "ffn")
DEC_KINDS = ("self_attn", "src_attn", "ffn")


@dataclass(frozen=True)
class WhisperDims:
    n_mels: int  # 80, or 128 for large-v3
    vocab: int
    d_model: int
    heads: int
    enc_layers: int
    dec_layers: int
    n_audio_ctx: int  # encoder positions: 1500 = 30 s after the stride-2 conv
    max_len: int  # decoder positions (Whisper's n_text_ctx, 448)
    dropout: float = 0.0

    @property
    def ffn_dim(self) -> int:
        return 4 * self.d_model


class Attention(MultiHeadAttention):
    """Whisper's attention: its key projection has no bias."""

    def __init__(self, d: int, heads: int, dropout: float, cross: bool = False, eps: float = 1e-5):
        super().__init__(d, heads, dropout, cross, eps)
        self.k = nn.Linear(d, d, bias=False)


class EncoderLayer(nn.Module):
    def __init__(self, dims: WhisperDims, removed: set[str]):
        super().__init__()
        d, p = dims.d_model, dims.dropout
        self.attn = None if "attn" in removed else Attention(d, dims.heads, p)
        self.ffn = None if "ffn" in removed else FeedForward(d, dims.ffn_dim, p, F.gelu)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, g: Sequence[Gate]) -> torch.Tensor:
        if g[0] is not None:
            x = x + scaled(self.attn(x, mask=mask), g[0])
        if g[1] is not None:
            x = x + scaled(self.ffn(x), g[1])
        return x


class Encoder(nn.Module):
    def __init__(self, dims: WhisperDims, removed: frozenset[str]):
        super().__init__()
        self.conv1 = nn.Conv1d(dims.n_mels, dims.d_model, 3, padding=1)
        self.conv2 = nn.Conv1d(dims.d_model, dims.d_model, 3, stride=2, padding=1)
        self.register_buffer("pe", torch.zeros(dims.n_audio_ctx, dims.d_model))  # loaded with the weights
        self.layers = nn.ModuleList(EncoderLayer(dims, removed_kinds(removed, "encoder", i)) for i in range(dims.enc_layers))
        self.norm = nn.LayerNorm(dims.d_model)
        self.dropout = dims.dropout

    @staticmethod
    def out_lengths(frames: torch.Tensor) -> torch.Tensor:
        return (frames - 1) // 2 + 1

    def forward(self, feats: torch.Tensor, lens: torch.Tensor, gates: list[Sequence[Gate]], padded: bool):
        """feats (B, T, n_mels), lens the true lengths. padded: Whisper's own input, T = 2 * n_audio_ctx and nothing
        masked (the padding is audio to the model); otherwise padded frames are masked."""
        b, t, _ = feats.shape
        if padded and t != 2 * self.pe.shape[0]:
            raise ValueError(f"Whisper's padded input is {2 * self.pe.shape[0]} frames, got {t}")
        x = feats.transpose(1, 2)
        pad = None if padded else (torch.arange(t, device=x.device)[None, :] >= lens[:, None])[:, None, :]
        if pad is not None:  # padded frames must look like the convs' zero padding, as for an utterance alone
            x = x.masked_fill(pad, 0.0)
        h = F.gelu(self.conv1(x))
        if pad is not None:
            h = h.masked_fill(pad, 0.0)
        x = F.gelu(self.conv2(h)).transpose(1, 2)
        if x.shape[1] > self.pe.shape[0]:
            raise ValueError(f"input of {t} frames exceeds Whisper's {2 * self.pe.shape[0]} (30 s)")
        x = F.dropout(x + self.pe[: x.shape[1]], self.dropout, self.training)
        out_lens = self.out_lengths(lens)
        mask = None
        if not padded:
            mask = (torch.arange(x.shape[1], device=x.device)[None, :] < out_lens[:, None])[:, None, None, :]
        for layer, g in zip(self.layers, gates):
            x = layer(x, mask, g)
        if mask is None:
            mask = torch.ones(b, 1, 1, x.shape[1], dtype=torch.bool, device=x.device)
        return self.norm(x), out_lens, mask


class Decoder(nn.Module):
    def __init__(self, dims: WhisperDims, removed: frozenset[str]):
        super().__init__()
        self.embed = nn.Embedding(dims.vocab, dims.d_model)
        self.pos = nn.Parameter(torch.zeros(dims.max_len, dims.d_model))
        self.layers = nn.ModuleList(DecoderLayer(dims.d_model, dims.heads, dims.ffn_dim, dims.dropout,
                                                 removed_kinds(removed, "decoder", i), Attention, F.gelu)
                                    for i in range(dims.dec_layers))
        self.norm = nn.LayerNorm(dims.d_model)
        self.dropout = dims.dropout

    def forward(self, tokens, mem, mem_mask, gates: list[Sequence[Gate]], cache=None, offset: int = 0) -> torch.Tensor:  # noqa: ANN001
        x = self.embed(tokens) + self.pos[offset : offset + tokens.shape[1]]
        x = F.dropout(x, self.dropout, self.training)
        for i, (layer, g) in enumerate(zip(self.layers, gates)):
            x = layer(x, mem, mem_mask, g, cache, i)
        return self.norm(x) @ self.embed.weight.T  # tied output projection


class WhisperModel(GatedModel):
    family = "whisper"
    enc_kinds = ENC_KINDS
    dec_kinds = DEC_KINDS
    ctc = None  # Whisper has no CTC head
    temperatures = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # openai-whisper's and faster-whisper's fallback

    def __init__(self, dims: WhisperDims, removed: Sequence[str] = (), padded_input: bool = True):
        super().__init__(dims, removed)
        self.padded_input = padded_input  # a run-time choice (model.whisper_input), not part of the weights
        self.encoder = Encoder(dims, self.removed)
        self.decoder = Decoder(dims, self.removed)

    def encode(self, feats, lens, keep=None, scale=None):  # noqa: ANN001
        enc_g, _ = self.layer_gates(keep, scale)
        return self.encoder(feats, lens, enc_g, self.padded_input)

    def forward(self, feats, lens, dec_in, keep=None, scale=None):  # noqa: ANN001
        mem, mem_lens, mem_mask = self.encode(feats, lens, keep, scale)
        return self.decode_logits(dec_in, mem, mem_mask, keep, scale), None, mem_lens
