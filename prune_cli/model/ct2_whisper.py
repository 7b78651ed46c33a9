"""CTranslate2 / faster-whisper Whisper weights: model.bin parsed field by field (no code runs), the fused
self-attention QKV and cross-attention KV projections split back into WhisperModel's separate q, k, v."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import torch

from prune_cli.errors import CheckpointError, first_few
from prune_cli.model.whisper import WhisperDims

StateDict = dict[str, torch.Tensor]

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # 5 (bfloat16) handled apart


def read_ct2_variables(path: Path, parts: tuple[Path, ...] = ()) -> dict[str, torch.Tensor]:
    """All variables of a CTranslate2 model.bin (format version 6), aliases resolved; `parts`: the file split in pieces."""
    data = b"".join(p.read_bytes() for p in parts) if parts else path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string() -> str:
        nonlocal pos
        n = take("H")
        s = data[pos : pos + n].rstrip(b"\0").decode()
        pos += n
        return s

    try:
        version = take("I")
        if version != 6:
            raise CheckpointError(f"{path}: CTranslate2 model format version {version}; this reader knows version 6 "
                                  "(CTranslate2 >= 3); convert the model again with a recent ct2-transformers-converter")
        spec, _revision = string(), take("I")
        if spec != "WhisperSpec":
            raise CheckpointError(f"{path}: a CTranslate2 {spec}, not a WhisperSpec")
        out: dict[str, torch.Tensor] = {}
        for _ in range(take("I")):
            name = string()
            shape = [take("I") for _ in range(take("B"))]
            dtype, nbytes = take("B"), take("I")
            raw = data[pos : pos + nbytes]
            if len(raw) != nbytes:
                raise CheckpointError(f"{path}: truncated: variable {name} needs {nbytes} bytes, the file has {len(raw)} left")
            pos += nbytes
            if dtype == 5:
                arr = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).float()
            elif dtype in _CT2_DTYPES:
                arr = torch.from_numpy(np.frombuffer(raw, dtype=_CT2_DTYPES[dtype]).copy())
            else:
                raise CheckpointError(f"{path}: variable {name} has an unknown data type id {dtype}")
            out[name] = arr.reshape(shape)
        for _ in range(take("I")):
            alias, target = string(), string()
            out[alias] = out[target]
    except struct.error:
        raise CheckpointError(f"{path}: truncated CTranslate2 model file (it ends inside the variable table)") from None
    except (RuntimeError, ValueError) as e:  # a shape that does not match its bytes
        raise CheckpointError(f"{path}: damaged CTranslate2 model file ({str(e).splitlines()[0][:120]})") from None
    if pos != len(data):
        raise CheckpointError(f"{path}: {len(data) - pos} bytes after the end of the CTranslate2 model; a damaged or "
                              "concatenated file")
    return out


def _ct2_weight(v: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    w = v[f"{name}/weight"]
    if w.dtype in (torch.int8, torch.int16):  # quantized: one scale per output row (convolutions and embeddings too)
        scale = v[f"{name}/weight_scale"].float()
        return w.float() / (scale.view(-1, *[1] * (w.dim() - 1)) if scale.dim() else scale)
    return w.float()


# Variables of a CTranslate2 WhisperSpec beyond its scalar settings that are not weights: the projection is the
# embedding (tied), the alignment heads serve word timestamps.
_CT2_SETTINGS = {"decoder/projection/weight", "decoder/alignment_heads"}


class _Used(dict):
    """A dict that remembers which keys were read."""

    def __init__(self, items: dict) -> None:
        super().__init__(items)
        self.read: set[str] = set()

    def __getitem__(self, key: str):  # noqa: ANN204
        self.read.add(key)
        return super().__getitem__(key)


def read_ct2(path: Path, parts: tuple[Path, ...] = ()) -> tuple[WhisperDims, StateDict]:
    v = _Used(read_ct2_variables(path / "model.bin", parts))
    try:
        n_enc = 1 + max(int(m.group(1)) for k in v if (m := re.match(r"encoder/layer_(\d+)/", k)))
        n_dec = 1 + max(int(m.group(1)) for k in v if (m := re.match(r"decoder/layer_(\d+)/", k)))
        emb = _ct2_weight(v, "decoder/embeddings")
        dims = WhisperDims(n_mels=v["encoder/conv1/weight"].shape[1], vocab=emb.shape[0], d_model=emb.shape[1],
                           heads=int(v["encoder/num_heads"]), enc_layers=n_enc, dec_layers=n_dec,
                           n_audio_ctx=v["encoder/position_encodings/encodings"].shape[0],
                           max_len=v["decoder/position_encodings/encodings"].shape[0])
        d = dims.d_model
        sd: StateDict = {
            "encoder.conv1.weight": _ct2_weight(v, "encoder/conv1"), "encoder.conv1.bias": v["encoder/conv1/bias"].float(),
            "encoder.conv2.weight": _ct2_weight(v, "encoder/conv2"), "encoder.conv2.bias": v["encoder/conv2/bias"].float(),
            "encoder.pe": v["encoder/position_encodings/encodings"].float(),
            "decoder.embed.weight": emb.float(), "decoder.pos": v["decoder/position_encodings/encodings"].float(),
        }

        def norm(ours: str, theirs: str) -> None:
            sd[f"{ours}.weight"], sd[f"{ours}.bias"] = v[f"{theirs}/gamma"].float(), v[f"{theirs}/beta"].float()

        def linear(ours: str, theirs: str, rows: slice = slice(None), bias: bool = True) -> None:
            sd[f"{ours}.weight"] = _ct2_weight(v, theirs)[rows]
            if bias:
                sd[f"{ours}.bias"] = v[f"{theirs}/bias"].float()[rows]

        def fused(ours: str, theirs: str, parts: str) -> None:  # parts: "qkv" or "kv", stacked by output rows
            for j, p in enumerate(parts):
                linear(f"{ours}.{p}", theirs, slice(j * d, (j + 1) * d), bias=p != "k")

        norm("encoder.norm", "encoder/layer_norm")
        norm("decoder.norm", "decoder/layer_norm")
        for part, n in (("encoder", n_enc), ("decoder", n_dec)):
            for i in range(n):
                o, t = f"{part}.layers.{i}", f"{part}/layer_{i}"
                sa = "attn" if part == "encoder" else "self_attn"
                norm(f"{o}.{sa}.norm", f"{t}/self_attention/layer_norm")
                fused(f"{o}.{sa}", f"{t}/self_attention/linear_0", "qkv")
                linear(f"{o}.{sa}.out", f"{t}/self_attention/linear_1")
                if part == "decoder":
                    norm(f"{o}.src_attn.norm", f"{t}/attention/layer_norm")
                    linear(f"{o}.src_attn.q", f"{t}/attention/linear_0")
                    fused(f"{o}.src_attn", f"{t}/attention/linear_1", "kv")
                    linear(f"{o}.src_attn.out", f"{t}/attention/linear_2")
                norm(f"{o}.ffn.norm", f"{t}/ffn/layer_norm")
                linear(f"{o}.ffn.w1", f"{t}/ffn/linear_0")
                linear(f"{o}.ffn.w2", f"{t}/ffn/linear_1")
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path / 'model.bin'}: not a complete CTranslate2 Whisper model ({e})") from None
    left = [k for k, t in dict.items(v) if k not in v.read and k not in _CT2_SETTINGS and t.numel() > 1]
    if left:
        raise CheckpointError(f"{path / 'model.bin'}: {len(left)} variable(s) the Whisper layout does not use: {first_few(left)}")
    return dims, sd
