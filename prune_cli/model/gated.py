"""The gate contract every prunable model shares: named modules, per-layer gates, encode/decode, identity hashes.

A module's gate is one of:
  None      -> skipped: not executed, the residual passes through (the inference path);
  1.0       -> executed as usual;
  a tensor  -> executed and scaled per sample, y = x + g * f(x) (gate training, and the reference for skipping).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Sequence, Union

import torch
from torch import nn

Gate = Union[None, float, torch.Tensor]


@dataclass(frozen=True)
class PrunableModule:
    name: str  # encoder.3.cgmlp
    part: str  # encoder | decoder
    layer: int
    kind: str  # ffn1 | attn | cgmlp | ffn2 | self_attn | src_attn | ffn


def prunable_modules(enc_layers: int, enc_kinds: Sequence[str], dec_layers: int, dec_kinds: Sequence[str]) -> list[PrunableModule]:
    mods = [PrunableModule(f"encoder.{i}.{k}", "encoder", i, k) for i in range(enc_layers) for k in enc_kinds]
    mods += [PrunableModule(f"decoder.{i}.{k}", "decoder", i, k) for i in range(dec_layers) for k in dec_kinds]
    return mods


def scaled(y: torch.Tensor, g: Gate) -> torch.Tensor:
    return y if isinstance(g, float) else y * g


def removed_kinds(removed: frozenset[str] | set[str], part: str, i: int) -> set[str]:
    """The module kinds of layer i of `part` that are removed (not built)."""
    return {n.split(".")[2] for n in removed if n.startswith(f"{part}.{i}.")}


class GatedModel(nn.Module):
    """Base of the model families: subclasses set `family`, `enc_kinds`, `dec_kinds`, build `encoder` and `decoder`,
    and return (logits, ctc_logits or None, encoder lengths) from forward."""

    family = ""
    enc_kinds: tuple[str, ...] = ()
    dec_kinds: tuple[str, ...] = ()
    temperatures: tuple[float, ...] = (0.0,)  # the family's decoding: 0 only, or a temperature fallback (decoding.py)

    def __init__(self, dims, removed: Sequence[str]):  # noqa: ANN001
        super().__init__()
        self.dims = dims
        self.removed = frozenset(removed)
        self.modules_list = prunable_modules(dims.enc_layers, self.enc_kinds, dims.dec_layers, self.dec_kinds)
        self.index = {m.name: i for i, m in enumerate(self.modules_list)}
        unknown = self.removed - set(self.index)
        if unknown:
            raise ValueError(f"unknown modules to remove: {sorted(unknown)}")

    @property
    def n_modules(self) -> int:
        return len(self.modules_list)

    def layer_gates(self, keep: Sequence[bool] | None = None, scale: torch.Tensor | None = None):
        """Per-layer gate lists for encoder and decoder, from a keep pattern and/or per-sample scales (B, M)."""
        gates: list[Gate] = []
        for i, m in enumerate(self.modules_list):
            if m.name in self.removed or (keep is not None and not keep[i]):
                gates.append(None)
            elif scale is not None:
                gates.append(scale[:, i].view(-1, 1, 1))
            else:
                gates.append(1.0)
        ne, nk, nd = self.dims.enc_layers * len(self.enc_kinds), len(self.enc_kinds), len(self.dec_kinds)
        enc = [gates[i : i + nk] for i in range(0, ne, nk)]
        dec = [gates[ne + i : ne + i + nd] for i in range(0, len(gates) - ne, nd)]
        return enc, dec

    def encode(self, feats, lens, keep=None, scale=None):  # noqa: ANN001
        enc_g, _ = self.layer_gates(keep, scale)
        return self.encoder(feats, lens, enc_g)

    def decode_logits(self, tokens, mem, mem_mask, keep=None, scale=None, cache=None, offset=0):  # noqa: ANN001
        _, dec_g = self.layer_gates(keep, scale)
        return self.decoder(tokens, mem, mem_mask, dec_g, cache, offset)

    def weight_problems(self, sd: dict[str, torch.Tensor]) -> list[str]:
        """Why `sd` does not load into this model, one line per tensor by name (empty: it loads)."""
        own = self.state_dict()
        out = [f"{k}: the file has shape {list(sd[k].shape)}, the model needs {list(v.shape)}"
               for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
        out += [f"{k}: missing" for k in own if k not in sd]
        return out + [f"{k}: not part of the model" for k in sd if k not in own]

    def arch_hash(self) -> str:
        """Identifies the full (unmaterialized) architecture; mask files carry it."""
        family = {"family": self.family} if self.family != "ebranchformer" else {}  # the E-Branchformer's hash as it was
        blob = json.dumps({**family, "dims": asdict(self.dims), "modules": [m.name for m in self.modules_list]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def weights_hash(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
