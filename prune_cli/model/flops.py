"""FLOPs with torch.utils.flop_counter.FlopCounterMode (FLOPs, not MACs: one multiply-add = 2 FLOPs).

Ops the counter has no formula for (elementwise, normalization, softmax, ...) are listed with their call counts,
so nothing is silently counted as zero without saying so.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count


# PyTorch ships no formula for the CPU flash-attention kernel that SDPA dispatches to on CPU; without this,
# attention would count as zero FLOPs on CPU but not on CUDA.
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Shape/metadata ops that do no arithmetic at all; not worth listing.
_NO_ARITH = {
    "view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "slice",
    "select", "detach", "clone", "copy_", "empty", "zeros", "ones", "full", "arange", "alias", "split",
    "split_with_sizes", "chunk", "cat", "stack", "index", "index_select", "lift_fresh", "_to_copy", "contiguous",
    "empty_like", "zeros_like", "fill_", "zero_", "new_empty", "new_zeros", "as_strided", "unbind", "item",
    "_local_scalar_dense", "scalar_tensor", "embedding", "resize_", "set_", "_reshape_alias", "masked_fill",
    "where", "fill", "repeat_interleave", "repeat", "constant_pad_nd", "new_full", "full_like", "to", "copy",
    "eq", "ne", "ge", "lt", "gt", "le", "any", "all", "bitwise_not", "bitwise_or", "logical_not", "argmax", "topk",
    "clamp_min", "sym_size", "is_nonzero", "_assert_async",
}


# FlopCounterMode names modules "<RootClass>.<fqn>"; map our roots back to FQNs inside SpeechModel.
_ROOTS = {"SpeechModel": "", "WhisperModel": "", "OwsmModel": "", "Encoder": "encoder", "Decoder": "decoder"}


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class FlopReport:
    total: int
    by_module: dict[str, int]  # FQN inside the model (no class prefix) -> FLOPs, leaf-most attribution not implied
    uncounted_ops: dict[str, int] = field(default_factory=dict)


def count_flops(fn: Callable[[], object], list_uncounted: bool = True) -> FlopReport:
    counter = FlopCounterMode(display=False)
    rec = _OpRecorder() if list_uncounted else None
    # The recorder sits outside the counter, so it sees ops after the counter's decompositions.
    if rec is not None:
        with rec, counter:
            fn()
    else:
        with counter:
            fn()
    by_module: dict[str, int] = {}
    for name, ops in counter.get_flop_counts().items():
        root, _, rest = name.partition(".")
        prefix = _ROOTS.get(root)
        if prefix is None:  # "Global", or a module that is not ours
            continue
        fqn = ".".join(p for p in (prefix, rest) if p)
        if fqn:
            by_module[fqn] = by_module.get(fqn, 0) + int(sum(ops.values()))
    counted = {op.__name__ for ops in counter.get_flop_counts().values() for op in ops}
    uncounted: dict[str, int] = {}
    if rec is not None:
        for op, n in sorted(rec.ops.items()):
            if op not in _NO_ARITH and op not in counted and not op.endswith("_backward"):
                uncounted[op] = n
    return FlopReport(int(counter.get_total_flops()), by_module, uncounted)


def stable_name(fqn: str) -> str | None:
    """'encoder.layers.3.cgmlp' -> 'encoder.3.cgmlp' (the prunable module's stable name)."""
    parts = fqn.split(".")
    if len(parts) == 4 and parts[0] in ("encoder", "decoder") and parts[1] == "layers":
        return f"{parts[0]}.{parts[2]}.{parts[3]}"
    return None


def per_module_flops(by_module: dict[str, int], module_names: list[str]) -> dict[str, int]:
    """FLOPs per prunable module; each encoder merge is split between attn and cgMLP by their output widths (equal)."""
    out = {n: 0 for n in module_names}
    for fqn, f in by_module.items():
        name = stable_name(fqn)
        if name is None:
            continue
        if name.endswith(".merge"):
            layer = name.rsplit(".", 1)[0]
            out[f"{layer}.attn"] += f // 2
            out[f"{layer}.cgmlp"] += f - f // 2
        elif name in out:
            out[name] += f
    return out


def module_flops(model: torch.nn.Module, frames: int, tokens: int) -> dict[str, int]:
    """FLOPs of each prunable module of a SpeechModel for one utterance of `frames` input frames and `tokens`
    decoder tokens (teacher-forced forward)."""
    dev = next(model.parameters()).device
    if getattr(model, "padded_input", False):  # Whisper's fixed 30-s input, whatever the utterance's length
        frames = 2 * model.dims.n_audio_ctx
    x = torch.zeros(1, frames, model.dims.n_mels, device=dev)
    y = torch.zeros(1, tokens, dtype=torch.long, device=dev)
    with torch.no_grad():
        rep = count_flops(lambda: model(x, torch.tensor([frames], device=dev), y), list_uncounted=False)
    return per_module_flops(rep.by_module, [m.name for m in model.modules_list])


def module_summary(model: torch.nn.Module, frames: int, tokens: int) -> dict[str, object]:
    """Parameters per prunable module kind, and FLOPs per prunable module, for one utterance of the given size."""
    flops = module_flops(model, frames, tokens)
    by_kind: dict[str, dict[str, int]] = {}
    for m in model.modules_list:
        part, i, kind = m.name.split(".")
        k = by_kind.setdefault(f"{part}.{kind}", {"params": 0, "flops": 0, "count": 0})
        k["params"] += sum(p.numel() for p in getattr(getattr(model, part).layers[int(i)], kind).parameters())
        k["flops"] += flops[m.name]
        k["count"] += 1
    return {"params_total": sum(p.numel() for p in model.parameters()), "prunable_modules": model.n_modules,
            "frames": frames, "tokens": tokens, "flops_unit": "FLOPs", "by_kind": by_kind, "per_module_flops": flops}
