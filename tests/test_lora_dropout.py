"""LoRA dropout folded into lora_A (lora_dpo/lora_dropout.py): the same numbers as peft's own forward, the same
random masks, less kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_dpo import model as M
from lora_dpo.batching import collate
from lora_dpo.data import Pair
from lora_dpo.logps import batch_logps
from lora_dpo.lora_dropout import DropoutLinear, fuse_lora_dropout
from lora_dpo.recipe import LoraConfig, ModelConfig, QuantizationConfig

CPU = torch.device("cpu")


def _peft(path, quantized: bool, checkpointing: bool = False):
    base = M.load_base(ModelConfig(name_or_path=str(path)), QuantizationConfig(load_in_4bit=quantized),
                       torch.float32, CPU)
    model = M.attach_lora(base, LoraConfig(lora_dropout=0.1), seed=0, gradient_checkpointing=checkpointing,
                          fold_dropout=False, fuse_forward=False)  # peft's own forward: the reference
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.train()
    return model


def _batch():
    return collate([Pair([1, 2, 3, 4, 5], [6, 7, 8, 9], [10, 11], 0), Pair([12, 13], [14, 15, 16], [17, 18, 19], 1)],
                   0)


def _step(model, seed: int):
    """Log-probs and LoRA gradients of one training-mode pass, its dropout masks drawn from `seed`; and the bytes
    autograd kept for backward."""
    model.zero_grad()
    kept = {}  # storage → bytes: a tensor kept by several nodes (the layer input the base and LoRA keep) once

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):  # parameters are held anyway
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = batch_logps(model, _batch())[0]
    logps.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps.detach(), grads, sum(kept.values())


@pytest.mark.parametrize("quantized,checkpointing", [(True, False), (True, True), (False, False)])
def test_folded_dropout_gives_peft_numbers_and_keeps_less(tiny_model_dir, quantized, checkpointing):
    peft_model = _peft(tiny_model_dir, quantized, checkpointing)
    folded = copy.deepcopy(peft_model)
    assert fuse_lora_dropout(folded) == 2 * 7  # q k v o gate up down in each of the 2 layers
    for seed in (0, 1):
        want, want_grads, want_kept = _step(peft_model, seed)
        got, got_grads, got_kept = _step(folded, seed)
        assert torch.equal(got, want)  # the same masks, the same forward
        for n, g in want_grads.items():
            torch.testing.assert_close(got_grads[n], g, rtol=1e-5, atol=1e-7)
        if not checkpointing:  # a checkpointed layer keeps only its input either way
            assert got_kept < want_kept
    different, _, _ = _step(folded, 2)
    assert not torch.equal(different, want)  # dropout is on: another seed, other masks


def test_folding_keeps_the_adapter_and_drops_nothing_in_eval(tiny_model_dir):
    model = _peft(tiny_model_dir, True)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    fuse_lora_dropout(model)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    assert any(isinstance(m, DropoutLinear) for m in model.modules())
    model.eval()
    with torch.no_grad():
        a, b = batch_logps(model, _batch())[0], batch_logps(model, _batch())[0]
    assert torch.equal(a, b)  # no dropout in eval mode
    assert fuse_lora_dropout(model) == 0  # already folded: nothing left to fold


def test_attach_lora_folds_the_dropout(tiny_model_dir):
    base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.float32, CPU)
    model = M.attach_lora(base, LoraConfig(lora_dropout=0.05), seed=0, gradient_checkpointing=False)
    assert sum(isinstance(m, DropoutLinear) for m in model.modules()) == 2 * 7
