"""CUDA checks (marked gpu; skipped where there is no CUDA): real skipping, CUDA-event timing, bf16 training step."""

from __future__ import annotations

import pytest
import torch

from prune_cli.engine.profile import Timer
from prune_cli.model.decoding import DecodeOptions, decode
from prune_cli.model.s2t import ModelDims, SpeechModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DIMS = ModelDims(80, 40, 64, 4, 2, 2, 128, 128, 5, 3, 8, 0.0, 32)


def test_skipping_matches_reference_on_cuda() -> None:
    torch.manual_seed(0)
    model = SpeechModel(DIMS).cuda().eval()
    x, lens = torch.randn(3, 90, 80, device="cuda"), torch.tensor([90, 80, 70], device="cuda")
    y = torch.randint(11, 40, (3, 5), device="cuda")
    keep = tuple(i % 2 == 0 for i in range(model.n_modules))
    a, _, _ = model(x, lens, y, keep=keep)
    b, _, _ = model(x, lens, y, scale=torch.tensor([float(k) for k in keep], device="cuda").expand(3, -1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    cached = decode(model, x, lens, [1, 7, 4, 7], keep, DecodeOptions(use_cache=True))
    assert cached == decode(model, x, lens, [1, 7, 4, 7], keep, DecodeOptions(use_cache=False))


def test_cuda_event_timer() -> None:
    a = torch.randn(2048, 2048, device="cuda")
    t = Timer(torch.device("cuda"))
    small, big = t(lambda: a[:64] @ a[:, :64]), t(lambda: [a @ a for _ in range(10)])
    assert 0 < small < big


def test_bf16_autocast_training_step() -> None:
    model = SpeechModel(DIMS).cuda().train()
    x, lens = torch.randn(2, 90, 80, device="cuda"), torch.tensor([90, 80], device="cuda")
    y = torch.randint(11, 40, (2, 5), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, _, _ = model(x, lens, y)
    logits.float().mean().backward()
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)
