"""OWSM (Peng et al., 2023-24; ESPnet's open Whisper-style model) with the gate contract of the E-Branchformer.

As ESPnet computes it (espnet2 S2T): log-mel features normalized by global mean/variance (stored with the
weights), conv2d subsampling to d channels, the input scaled by sqrt(d) plus absolute sinusoidal positions (OWSM
v3.1) or with relative-position attention (ESPnet's default), E-Branchformer layers with a final LayerNorm each
(model/s2t.py, `espnet=True`), then a Transformer decoder with ReLU
feed-forwards, scaled sinusoidal positions and an untied output layer, and a CTC head.
Prunable modules are those of the E-Branchformer: `encoder.i.{ffn1,attn,cgmlp,ffn2}` and
`decoder.i.{self_attn,src_attn,ffn}`; a skipped module is one whose output is zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prune_cli.model.gated import Gate, GatedModel, removed_kinds
from prune_cli.model.layers import Conv2dSubsampling, DecoderLayer, sinusoid
from prune_cli.model.s2t import DEC_KINDS, ENC_KINDS, ESPNET_EPS, EBranchformerLayer

MAX_ENCODER_FRAMES = 5000  # ESPnet's default positional table (after subsampling)


@dataclass(frozen=True)
class OwsmDims:
    n_mels: int
    vocab: int
    d_model: int
    heads: int
    enc_layers: int
    dec_layers: int
    ffn_dim: int  # the encoder's feed-forwards
    dec_ffn_dim: int
    cgmlp_dim: int
    cgmlp_kernel: int
    merge_kernel: int
    max_len: int  # decoder positions
    rel_pos: bool = False  # encoder attention: relative positions (ESPnet's default), or absolute ones (OWSM v3.1)
    dropout: float = 0.0


def rel_positions(t: int, d: int) -> torch.Tensor:
    """(1, 2t-1, d) sinusoidal encodings of relative positions t-1 .. -(t-1) (ESPnet's RelPositionalEncoding)."""
    pos = sinusoid(t, d)
    neg = pos.clone()
    neg[:, 0::2] = -neg[:, 0::2]  # sin(-x) = -sin(x), cos(-x) = cos(x)
    return torch.cat([pos.flip(0), neg[1:]]).unsqueeze(0)


class Encoder(nn.Module):
    def __init__(self, dims: OwsmDims, removed: frozenset[str]):
        super().__init__()
        self.register_buffer("mvn_mean", torch.zeros(dims.n_mels))  # global MVN, loaded with the weights
        self.register_buffer("mvn_std", torch.ones(dims.n_mels))
        self.frontend = Conv2dSubsampling(dims.n_mels, dims.d_model, dims.d_model)
        self.layers = nn.ModuleList(EBranchformerLayer(dims, removed_kinds(removed, "encoder", i), espnet=True,  # type: ignore[arg-type]
                                                       rel_pos=dims.rel_pos) for i in range(dims.enc_layers))
        self.rel_pos = dims.rel_pos
        self.norm = nn.LayerNorm(dims.d_model, ESPNET_EPS)
        self.dropout = dims.dropout
        self.d_model = dims.d_model

    def forward(self, feats: torch.Tensor, lens: torch.Tensor, gates: list[Sequence[Gate]]):
        """feats (B, T, n_mels) log-mel (data/owsm_features.py), before normalization."""
        x = (feats - self.mvn_mean) / self.mvn_std
        x = x.masked_fill((torch.arange(x.shape[1], device=x.device)[None, :] >= lens[:, None])[..., None], 0.0)
        x, lens = self.frontend(x, lens)
        if x.shape[1] > MAX_ENCODER_FRAMES:
            raise ValueError(f"input of {feats.shape[1]} frames exceeds the encoder's {MAX_ENCODER_FRAMES} positions")
        x = x * math.sqrt(self.d_model)
        pos_emb = None
        if self.rel_pos:
            pos_emb = F.dropout(rel_positions(x.shape[1], self.d_model).to(x), self.dropout, self.training)
        else:
            x = x + sinusoid(x.shape[1], self.d_model).to(x)
        x = F.dropout(x, self.dropout, self.training)
        pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lens[:, None]
        attn_mask = ~pad[:, None, None, :]
        for layer, g in zip(self.layers, gates):
            x = layer(x, pad, attn_mask, g, pos_emb)
        return self.norm(x), lens, attn_mask


class Decoder(nn.Module):
    def __init__(self, dims: OwsmDims, removed: frozenset[str]):
        super().__init__()
        self.embed = nn.Embedding(dims.vocab, dims.d_model)
        self.register_buffer("pe", sinusoid(dims.max_len, dims.d_model), persistent=False)
        self.layers = nn.ModuleList(DecoderLayer(dims.d_model, dims.heads, dims.dec_ffn_dim, dims.dropout,
                                                 removed_kinds(removed, "decoder", i), activation=F.relu, eps=ESPNET_EPS)
                                    for i in range(dims.dec_layers))
        self.norm = nn.LayerNorm(dims.d_model, ESPNET_EPS)
        self.out = nn.Linear(dims.d_model, dims.vocab)
        self.dropout = dims.dropout
        self.scale = math.sqrt(dims.d_model)

    def forward(self, tokens, mem, mem_mask, gates: list[Sequence[Gate]], cache=None, offset: int = 0) -> torch.Tensor:  # noqa: ANN001
        if offset + tokens.shape[1] > self.pe.shape[0]:
            raise ValueError(f"decoder input of {offset + tokens.shape[1]} tokens exceeds its {self.pe.shape[0]} positions")
        x = self.embed(tokens) * self.scale + self.pe[offset : offset + tokens.shape[1]]
        x = F.dropout(x, self.dropout, self.training)
        for i, (layer, g) in enumerate(zip(self.layers, gates)):
            x = layer(x, mem, mem_mask, g, cache, i)
        return self.out(self.norm(x))


class OwsmModel(GatedModel):
    family = "owsm"
    enc_kinds = ENC_KINDS
    dec_kinds = DEC_KINDS

    def __init__(self, dims: OwsmDims, removed: Sequence[str] = ()):
        super().__init__(dims, removed)
        self.encoder = Encoder(dims, self.removed)
        self.decoder = Decoder(dims, self.removed)
        self.ctc = nn.Linear(dims.d_model, dims.vocab)

    def encode(self, feats, lens, keep=None, scale=None):  # noqa: ANN001
        """OWSM's input is the 30-s window (data/owsm_features.py): every frame is input, the padding included, as
        ESPnet's Speech2Text feeds it."""
        enc_g, _ = self.layer_gates(keep, scale)
        return self.encoder(feats, torch.full_like(lens, feats.shape[1]), enc_g)

    def forward(self, feats, lens, dec_in, keep=None, scale=None):  # noqa: ANN001
        mem, mem_lens, mem_mask = self.encode(feats, lens, keep, scale)
        return self.decode_logits(dec_in, mem, mem_mask, keep, scale), self.ctc(mem), mem_lens
