"""The optimizer lora_dpo/optim.py builds: `adamw_torch` is torch's fused AdamW, whose updates equal the default
(per-tensor) AdamW's to float rounding, step after step, and whose state a checkpoint carries over."""

from __future__ import annotations

import pytest
import torch

from lora_dpo.optim import fused_adamw, make_optimizer
from lora_dpo.recipe import TrainConfig


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((16, 8), (8, 16), (4,), (3, 5))]


def _train(opt, params, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.device)
        opt.step()


def test_adamw_torch_is_the_fused_adamw_with_the_recipe_settings():
    cfg = TrainConfig(learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.1)
    model = torch.nn.Linear(4, 2)
    model.bias.requires_grad_(False)  # only what trains is handed to the optimizer
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    group = opt.param_groups[0]
    assert group["params"] == [model.weight]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.8, 0.95), 1e-6, 0.1)


def test_fused_updates_equal_the_default_adamw():
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    fused, plain = _params(0), _params(0)
    _train(fused_adamw(fused, **kw), fused, steps=5)
    _train(torch.optim.AdamW(plain, foreach=False, **kw), plain, steps=5)
    start = _params(0)
    for f, p, s in zip(fused, plain, start):
        assert not torch.equal(f, s)  # five steps moved them
        torch.testing.assert_close(f, p, rtol=1e-6, atol=1e-7)


def test_fused_state_carries_over_a_checkpoint_round_trip(tmp_path):
    kw = dict(lr=1e-2)
    params = _params(0)
    opt = fused_adamw(params, **kw)
    _train(opt, params, steps=3)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = fused_adamw(resumed_params, **kw)
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True, map_location="cpu"))
    _train(opt, params, steps=2, seed=7)
    _train(resumed, resumed_params, steps=2, seed=7)
    for a, b in zip(params, resumed_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_dtype_or_device_without_fused_kernels_gets_the_default_adamw():
    ints = [torch.zeros(2, dtype=torch.int64)]  # not floating point: fused would refuse it at the first step
    assert fused_adamw(ints, lr=1e-3).defaults["fused"] is None
    meta = [torch.nn.Parameter(torch.zeros(2, device="meta"))]  # a device without fused kernels
    assert fused_adamw(meta, lr=1e-3).defaults["fused"] is None
    assert fused_adamw(_params(0), lr=1e-3).defaults["fused"] is True


@pytest.mark.gpu
def test_gpu_fused_updates_equal_the_default_adamw():
    """GPU twin of test_fused_updates_equal_the_default_adamw: CUDA's fused kernel against its foreach form."""
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    fused, plain = ([torch.nn.Parameter(p.detach().cuda()) for p in _params(0)] for _ in range(2))
    opt = fused_adamw(fused, **kw)
    assert opt.defaults["fused"] is True
    _train(opt, fused, steps=5)
    _train(torch.optim.AdamW(plain, foreach=True, **kw), plain, steps=5)
    for f, p in zip(fused, plain):
        torch.testing.assert_close(f, p, rtol=1e-6, atol=1e-7)
