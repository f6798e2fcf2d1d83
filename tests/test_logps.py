"""Chunked completion log-probs equal the plain full-logits computation, values and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import trained_lora

from lora_dpo.batching import collate
from lora_dpo.data import Pair
from lora_dpo.logps import batch_logps, plain_batch_logps


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return trained_lora(tiny_model_dir)


def batch():
    pairs = [Pair([1, 2, 3, 4, 5], [6, 7, 8], [9, 10], 0), Pair([11, 12], [13, 14, 15, 16, 17], [18], 1),
             Pair([19], [20], [21, 22, 23], 2)]
    return collate(pairs, pad_token_id=2)


def grads(m):
    return [p.grad.clone() for p in m.parameters() if p.requires_grad]


@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_chunked_equals_plain(model, chunk, checkpointing):
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    b = batch()
    model.zero_grad()
    ref, n_ref = plain_batch_logps(model, b)
    (ref * torch.arange(1, 7)).sum().backward()  # distinct weights per row so a row mix-up shows
    g_ref = grads(model)
    model.zero_grad()
    got, n_got = batch_logps(model, b, chunk_size=chunk)
    (got * torch.arange(1, 7)).sum().backward()
    g_got = grads(model)
    assert got.dtype == torch.float32
    assert torch.equal(n_got, n_ref) and n_got.tolist() == [3, 5, 1, 2, 1, 3]
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
    for a, b_ in zip(g_got, g_ref):  # fp32 sums in another order: relative to the tensor's scale
        assert (a - b_).abs().max() <= 1e-4 * b_.abs().max() + 1e-6
    model.gradient_checkpointing_disable()


def test_padding_does_not_change_logps(model):
    """A pair's log-probs do not depend on what else is in the batch (padding is masked)."""
    b_alone = collate([Pair([19], [20], [21, 22, 23], 2)], 2)
    with torch.no_grad():
        alone, _ = batch_logps(model, b_alone)
        together, _ = batch_logps(model, batch())
    assert torch.allclose(alone, together[[2, 5]], atol=1e-5)


@pytest.mark.parametrize("model_type, transform", [("granite", {"logits_scaling": 8.0}),
                                                   ("cohere", {"logit_scale": 0.0625}),
                                                   ("gemma2", {"final_logit_softcapping": 5.0})])
def test_models_that_transform_their_logits(model_type, transform):
    """Granite divides lm_head's output by logits_scaling, Cohere multiplies it by logit_scale, Gemma 2 soft-caps it:
    the fast path's log-probs are the model's own (and `check_head` sees it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_dpo import logps as L

    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, **transform)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(20)  # logits large enough for a missing transform to matter
    b = collate([Pair([1, 2, 3, 4, 5], [6, 7, 8], [9, 10], 0), Pair([11, 12], [13, 14, 15, 16, 17], [18], 1)], 0)
    with torch.no_grad():
        got, _ = batch_logps(m, b)
        want, _ = plain_batch_logps(m, b)
        assert torch.allclose(got, want, atol=1e-4), (got, want)
        ids = torch.tensor([[1, 5, 9, 2, 7, 3, 8, 4]])
        assert L.check_head(m, ids, 1e-3) < 1e-4
        real = L.logit_transform
        try:  # a family whose transform lora-dpo did not know: refused, not trained on wrong log-probs
            L.logit_transform = lambda lm: (1.0, None)
            with pytest.raises(Exception, match=rf"this {model_type} model's logits are not its LM head's output"):
                L.check_head(m, ids, 1e-3)
        finally:
            L.logit_transform = real


@pytest.mark.parametrize("transform", [(1.0, None), (0.125, None), (16.0, None), (1.0, 5.0), (2.0, 5.0)])
@pytest.mark.parametrize("bias", [False, True])
def test_gradient_in_forward_equals_the_checkpointed_chunk(transform, bias):
    """`_TokenLogps` (the log-probs' gradient w.r.t. the hidden states computed in forward, for a frozen head) gives
    `_token_logps`' values bit for bit and autograd's gradient, with a logit scale (Granite, Cohere) and a soft-cap
    (Gemma 2), on logits large enough that a wrong cap or scale derivative shows."""
    from lora_dpo.logps import _token_logps, _TokenLogps

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(24, 50, bias=bias).requires_grad_(False)
    with torch.no_grad():
        head.weight.mul_(20)
    h0 = torch.randn(37, 24, generator=g)
    labels = torch.randint(0, 50, (37,), generator=g)
    upstream = torch.randn(37, generator=g)
    outs = []
    for fn in (_TokenLogps.apply, _token_logps):
        h = h0.clone().requires_grad_()
        out = fn(h, labels, head, transform)
        out.backward(upstream)
        outs.append((out.detach(), h.grad))
    (got, g_got), (want, g_want) = outs
    assert torch.equal(got, want)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
    assert g_want.abs().max() > 1e-2  # a gradient that could be wrong


def test_gradient_in_forward_under_bf16_autocast():
    """A bf16 LM head under autocast (the GPU's training setting, here on a CPU): the same forward values bit for
    bit, the gradient within bf16 rounding of autograd's through the checkpointed chunk."""
    from lora_dpo.logps import _token_logps, _TokenLogps

    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(32, 64, bias=False).to(torch.bfloat16).requires_grad_(False)
    h0 = torch.randn(29, 32, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 64, (29,), generator=g)
    outs = []
    for fn in (_TokenLogps.apply, _token_logps):
        h = h0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(h, labels, head, (1.0, None))
        out.sum().backward()
        outs.append((out.detach(), h.grad))
    (got, g_got), (want, g_want) = outs
    assert got.dtype == torch.float32 and g_got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    torch.testing.assert_close(g_got.float(), g_want.float(), rtol=2e-2, atol=2e-2)


def test_an_fp16_head_keeps_the_checkpointed_chunks():
    """fp16 (T4s) trains under a loss scale, which multiplies the softmax before its fp16 cast in the checkpointed
    path; the gradient computed in forward would meet fp16 unscaled and lose what is below its smallest number."""
    from lora_dpo.logps import _grad_in_forward

    head = torch.nn.Linear(8, 16, bias=False).requires_grad_(False)
    assert _grad_in_forward(head) and _grad_in_forward(head.to(torch.bfloat16))
    assert not _grad_in_forward(head.to(torch.float16))
    assert not _grad_in_forward(head.float().requires_grad_(True))


@pytest.mark.parametrize("trainable_head", [False, True])
def test_frozen_head_takes_the_gradient_in_forward_and_a_trainable_one_is_checkpointed(model, monkeypatch,
                                                                                        trainable_head):
    """Every LoRA run's LM head is frozen: its chunks take `_TokenLogps`; a trainable head (e.g. an LM head in
    peft's modules_to_save) is differentiated whole by autograd, its weight's gradient included, equal to the plain
    full-logits computation."""
    from lora_dpo import logps as L

    calls = []
    real = L._TokenLogps.apply
    monkeypatch.setattr(L._TokenLogps, "apply", lambda *a: calls.append(1) or real(*a))
    head = L.causal_lm(model).get_output_embeddings()
    head.weight.requires_grad_(trainable_head)
    try:
        model.zero_grad()
        b = batch()
        ref, _ = plain_batch_logps(model, b)
        (ref * torch.arange(1, 7)).sum().backward()
        want = head.weight.grad.clone() if trainable_head else None
        model.zero_grad()
        got, _ = batch_logps(model, b, chunk_size=4)
        (got * torch.arange(1, 7)).sum().backward()
        assert bool(calls) != trainable_head
        assert torch.allclose(got, ref, atol=1e-5, rtol=0)
        if trainable_head:
            assert (head.weight.grad - want).abs().max() <= 1e-4 * want.abs().max()
    finally:
        head.weight.requires_grad_(False)
        model.zero_grad()


@pytest.mark.parametrize("change", [False, True])
def test_a_head_with_a_forward_hook_keeps_the_checkpointed_chunks(model, change):
    """A forward hook on the LM head is part of the model's function: one that changes the output (here ×0.5) must be
    in the gradient as well as in the values, and one that keeps the output must see the logits, not the softmax
    `_TokenLogps` writes into them in place. Both run as the plain computation does."""
    from lora_dpo.logps import causal_lm

    head = causal_lm(model).get_output_embeddings()
    seen = []

    def hook(module, args, out):
        if change:
            return out * 0.5
        seen.append((out, out.detach().clone()))

    handle = head.register_forward_hook(hook)
    try:
        b = batch()
        model.zero_grad()
        ref, _ = plain_batch_logps(model, b)
        (ref * torch.arange(1, 7)).sum().backward()
        want = grads(model)
        model.zero_grad()
        seen.clear()
        got, _ = batch_logps(model, b, chunk_size=4)
        (got * torch.arange(1, 7)).sum().backward()
        assert torch.allclose(got, ref, atol=1e-5, rtol=0)
        for a, b_ in zip(grads(model), want):
            assert (a - b_).abs().max() <= 1e-4 * b_.abs().max() + 1e-6
        assert all(torch.equal(out, copy) for out, copy in seen)  # what the hook kept is what the head returned
        assert len(seen) >= (0 if change else 4)  # 15 completion tokens in chunks of 4 (and their recomputation)
    finally:
        handle.remove()
        model.zero_grad()


def test_fp16_autocast_over_an_fp32_head_keeps_the_checkpointed_chunks():
    """fp16 compute, not only an fp16 head: a model that keeps its LM head in fp32 (transformers'
    _keep_in_fp32_modules) trains on a T4 under fp16 autocast, where the head's matmuls run in fp16 and the
    gradient computed in forward would meet fp16 before the loss scale does."""
    from lora_dpo.logps import _grad_in_forward

    head = torch.nn.Linear(8, 16, bias=False).requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not _grad_in_forward(head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _grad_in_forward(head)
    assert _grad_in_forward(head)


def test_peft_wrapped_heads_keep_the_checkpointed_chunks(tiny_model_dir):
    """LoRA on lm_head (lora.target_modules naming it) and peft's modules_to_save wrap the head: autograd
    differentiates it whole."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_dpo.logps import _grad_in_forward, causal_lm

    for kw in (dict(target_modules=["q_proj", "lm_head"]),
               dict(target_modules=["q_proj"], modules_to_save=["lm_head"])):
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, **kw))
        head = causal_lm(m).get_output_embeddings()
        assert type(head) is not torch.nn.Linear and not _grad_in_forward(head)
        assert _grad_in_forward(torch.nn.Linear(8, 16).requires_grad_(False))


def test_bf16_weights_without_autocast_take_the_gradient_in_forward(tiny_model_dir, monkeypatch):
    """train.precision bf16 on a CPU: bf16 base weights (LM head included), fp32 adapter, no autocast, so the hidden
    states reach the head in bf16. `_TokenLogps` takes the chunks and gives the checkpointed chunks' values bit for
    bit and their gradients within bf16 rounding."""
    from lora_dpo import logps as L

    m = trained_lora(tiny_model_dir, dtype=torch.bfloat16)
    assert L.causal_lm(m).get_output_embeddings().weight.dtype == torch.bfloat16
    calls = []
    real, real_gate = L._TokenLogps.apply, L._grad_in_forward
    monkeypatch.setattr(L._TokenLogps, "apply", lambda *a: calls.append(a[0].dtype) or real(*a))
    b = batch()
    out = []
    for fast in (True, False):
        monkeypatch.setattr(L, "_grad_in_forward", real_gate if fast else lambda head: False)
        m.zero_grad()
        got, _ = batch_logps(m, b, chunk_size=4)
        (got * torch.arange(1, 7)).sum().backward()
        out.append((got.detach(), grads(m)))
    assert calls == [torch.bfloat16] * 4  # the fast pass only: 15 tokens, 4 chunks of bf16 hidden states
    (got, g_got), (want, g_want) = out
    assert got.dtype == torch.float32 and torch.equal(got, want)
    for a, b_ in zip(g_got, g_want):
        assert a.dtype == torch.float32  # the adapter's
        assert (a - b_).abs().max() <= 3e-2 * b_.abs().max()
    assert any(g.abs().max() > 0 for g in g_want)


def test_no_grad_and_inference_mode_do_not_take_the_gradient_in_forward(model, monkeypatch):
    """The reference pass (no_grad) and evaluation (inference_mode) compute no gradient: plain chunks."""
    from lora_dpo import logps as L

    calls = []
    real = L._TokenLogps.apply
    monkeypatch.setattr(L._TokenLogps, "apply", lambda *a: calls.append(1) or real(*a))
    b = batch()
    with torch.no_grad():
        a, _ = batch_logps(model, b, chunk_size=4)
    with torch.inference_mode():
        c, _ = batch_logps(model, b, chunk_size=4)
    assert not calls and torch.equal(a, c) and not a.requires_grad
    d, _ = batch_logps(model, b, chunk_size=4)
    assert len(calls) == 4 and d.requires_grad and torch.equal(d.detach(), a)


def test_a_second_derivative_through_the_gradient_in_forward_is_refused():
    """`_TokenLogps` keeps the first derivative only: differentiating it again raises, instead of a silent 0."""
    from lora_dpo.logps import _TokenLogps

    head = torch.nn.Linear(8, 16, bias=False).requires_grad_(False)
    h = torch.randn(5, 8, requires_grad=True)
    out = _TokenLogps.apply(h, torch.tensor([1, 2, 3, 4, 5]), head, (1.0, None))
    (g,) = torch.autograd.grad(out.square().sum(), h, create_graph=True)  # its incoming gradient depends on h
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()
