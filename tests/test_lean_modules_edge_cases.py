"""Edge cases of lora_dpo/lora_forward.py and lora_dpo/rmsnorm.py beyond their own tests (a review's findings):
pickling, multiple adapters, tensor scaling, merge/unmerge, generation, save_pretrained, 8-bit bases, torch.compile,
the norm's backward at extreme scales, shapes and strides, and decorated forwards."""

from __future__ import annotations

import copy
import io
import json
import pickle

import pytest
import torch

from lora_dpo import model as M
from lora_dpo.lora_forward import fuse_lora_forward
from lora_dpo.recipe import LoraConfig, ModelConfig, QuantizationConfig
from lora_dpo.rmsnorm import lean_rmsnorms
from tests.test_model import randomise_lora_b

CPU = torch.device("cpu")
H = 64


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer 64-wide Llama, vocab 128 (no tokenizer needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=H, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("review") / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _pair(path, quantized=False, eight_bit=False, dtype=torch.float32):
    """peft's forward and the fused one on deep copies of the same lora-dpo model."""
    base = M.load_base(ModelConfig(name_or_path=str(path)),
                       QuantizationConfig(load_in_4bit=quantized, load_in_8bit=eight_bit), dtype, CPU)
    peft_model = M.attach_lora(base, LoraConfig(), seed=0, gradient_checkpointing=False, fuse_forward=False)
    randomise_lora_b(peft_model)
    fused = copy.deepcopy(peft_model)
    assert fuse_lora_forward(fused) == 14
    return peft_model, fused


def _plain_peft(path):
    """A peft model on a plain transformers Llama (no lean MLP / norm patches), for isolating lora_forward."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    randomise_lora_b(model)
    return model


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------- lora_forward: pickling


def test_a_fused_model_pickles(tiny_dir):
    """The fused subclass shares peft's module and name (printed models read as peft's), so pickle (torch.save of a
    whole model, multiprocessing spawn) cannot find it by name: without its own __reduce_ex__ it raised
    PicklingError "it's not the same object as peft.tuners.lora.layer.Linear". It pickles by peft's class now."""
    model = _plain_peft(tiny_dir)
    pickle.loads(pickle.dumps(model))  # peft's own: fine
    fuse_lora_forward(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, model(IDS).logits)


# ---------------------------------------------------------------- lora_forward: checked, fine


def test_multiple_active_adapters_rslora_and_set_adapter(tiny_dir):
    from peft import LoraConfig as PeftLoraConfig

    ref, _ = _pair(tiny_dir)
    torch.manual_seed(3)
    ref.add_adapter("other", PeftLoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            use_rslora=True))
    randomise_lora_b(ref, seed=7)
    fused = copy.deepcopy(ref)
    fuse_lora_forward(fused)
    with torch.no_grad():
        for active in (["default", "other"], "other", "default"):
            ref.base_model.set_adapter(active)
            fused.base_model.set_adapter(active)
            torch.testing.assert_close(fused(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
        ref.base_model.set_adapter(["default", "other"])
        both = ref(IDS).logits
        ref.base_model.set_adapter("default")
        assert not torch.allclose(both, ref(IDS).logits)  # the second adapter counts


def test_tensor_scaling_merge_unmerge_and_generate(tiny_dir):
    from peft.utils.hotswap import _convert_scalings_to_tensor

    ref, fused = _pair(tiny_dir)
    with torch.no_grad():
        want = ref(IDS).logits
        fused.merge_adapter()
        torch.testing.assert_close(fused(IDS).logits, want, rtol=1e-5, atol=1e-5)
        fused.unmerge_adapter()
        torch.testing.assert_close(fused(IDS).logits, want, rtol=1e-5, atol=1e-5)
        _convert_scalings_to_tensor(fused)  # peft's compiled-hotswap preparation: 0-dim tensor scalings
        torch.testing.assert_close(fused(IDS).logits, want, rtol=1e-5, atol=1e-5)
        for m in (ref, fused):
            m.eval()
        outs = [m.generate(input_ids=IDS, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
                for m in (ref, fused)]
    assert torch.equal(outs[0], outs[1])


def test_save_pretrained_is_unchanged(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    ref, fused = _pair(tiny_dir, quantized=True)
    ref.save_pretrained(tmp_path / "a")
    fused.save_pretrained(tmp_path / "b")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("a", "b"))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("a", "b"))
    assert set(ca.pop("target_modules")) == set(cb.pop("target_modules"))  # a set, saved in no fixed order
    assert ca == cb


def test_an_8bit_base_trains_as_peft_does(tiny_dir):
    ref, fused = _pair(tiny_dir, eight_bit=True)
    res = []
    for m in (ref, fused):
        m.train()
        out = m(IDS).logits
        out.square().mean().backward()
        res.append((out.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-5, atol=1e-5)
    assert set(res[0][1]) == set(res[1][1]) and res[0][1]
    for n, g in res[0][1].items():
        torch.testing.assert_close(res[1][1][n], g, rtol=1e-4, atol=1e-6)


def test_compiled_fused_model(tiny_dir):
    ref = _plain_peft(tiny_dir)
    fused = copy.deepcopy(ref)
    fuse_lora_forward(fused)
    compiled = torch.compile(fused, backend="aot_eager")
    out = compiled(IDS).logits
    out.sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), ref(IDS).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- rmsnorm: pickling, extreme scales, decorators


def _norms(dtype, eps=1e-5, hidden=96):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    plain, lean = LlamaRMSNorm(hidden, eps=eps), LlamaRMSNorm(hidden, eps=eps)
    with torch.no_grad():
        plain.weight.copy_(torch.rand(hidden, generator=torch.Generator().manual_seed(0)) + 0.5)
        lean.weight.copy_(plain.weight)
    for m in (plain, lean):
        m.to(dtype).weight.requires_grad_(False)
    assert lean_rmsnorms(lean) == 1
    return plain, lean


def test_a_lean_norm_unpickles():
    """A forward bound with MethodType pickles as getattr(module, '_lean_forward'), which does not exist on load:
    torch.load(weights_only=False) of any model after load_base raised AttributeError (lean_gated_mlps too); the
    patched forwards are functools.partial now."""
    plain, lean = _norms(torch.float32)
    x = torch.randn(3, 96)
    back = pickle.loads(pickle.dumps(lean))
    assert torch.equal(back(x), plain(x))


@pytest.mark.parametrize("scale", [1e13, 1e14])
def test_lean_backward_keeps_precision_for_huge_bf16_inputs(scale):
    """The closed form as r·g − (r³/H)·x·⟨g, x⟩ loses the projection term once r³/H leaves fp32's normal range
    (hidden-state RMS ≳ 3e11, which bf16 can hold: 10× relative error at 1e14); written with the normalised values
    y = x·r it stays at bf16 rounding like transformers' autograd chain. Reference: the float64 gradient."""
    hidden, eps = 4096, 1e-5
    plain, lean = _norms(torch.bfloat16, eps, hidden)
    for m in (plain, lean):
        with torch.no_grad():
            m.weight.fill_(1.0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, hidden, generator=g)
    x0 = (z * scale).to(torch.bfloat16)
    grad = (z + 0.1 * torch.randn(4, hidden, generator=g)).to(torch.bfloat16)  # mostly along x
    xd = x0.double().requires_grad_(True)
    (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)).backward(grad.double())
    errs = []
    for m in (plain, lean):
        x = x0.clone().requires_grad_(True)
        m(x).backward(grad)
        errs.append(((x.grad.double() - xd.grad).norm() / xd.grad.norm()).item())
    assert errs[0] < 5e-3  # transformers' own: bf16 rounding
    assert errs[1] <= 2 * errs[0], errs


def test_forward_reads_refuses_decorated_forwards():
    """A forward whose body is the standard one but whose decorator changes what it returns computes something
    else: forward_body refuses decorated forwards, so lean_rmsnorms leaves it alone (no transformers norm is
    decorated today)."""
    import functools

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def doubled(fn):
        @functools.wraps(fn)
        def wrapper(self, x):
            return 2 * fn(self, x)
        return wrapper

    class DoubledRMSNorm(LlamaRMSNorm):
        @doubled
        def forward(self, hidden_states):
            input_dtype = hidden_states.dtype
            hidden_states = hidden_states.to(torch.float32)
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
            return self.weight * hidden_states.to(input_dtype)

    norm = DoubledRMSNorm(8).requires_grad_(False)
    x = torch.randn(2, 8)
    want = norm(x)
    lean_rmsnorms(norm)
    assert torch.equal(norm(x), want)


# ---------------------------------------------------------------- rmsnorm: checked, fine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,strided", [((96,), False), ((3, 96), False), ((4, 5, 96), True), ((0, 96), False)])
def test_lean_norm_shapes_strides_and_inference_mode(dtype, shape, strided):
    plain, lean = _norms(dtype)
    g = torch.Generator().manual_seed(2)
    if strided:  # a non-contiguous view
        x0 = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 3).to(dtype)[..., ::2]
    else:
        x0 = (torch.randn(shape, generator=g) * 3).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    res = []
    for m in (plain, lean):
        x = x0.detach().requires_grad_(True)
        y = m(x)
        y.backward(grad)
        res.append((y.detach(), x.grad))
    assert torch.equal(res[1][0], res[0][0])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(res[1][1], res[0][1], **tol)
    with torch.inference_mode():
        assert torch.equal(lean(x0), plain(x0))


@pytest.mark.parametrize("scale", [1e-30, 1e-6, 1.0, 1e4])
def test_lean_norm_tiny_and_large_realistic_inputs(scale):
    hidden, eps = 4096, 1e-6
    plain, lean = _norms(torch.bfloat16, eps, hidden)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(4, hidden, generator=g) * scale).to(torch.bfloat16)
    grad = torch.randn(4, hidden, generator=g).to(torch.bfloat16)
    out = []
    for m in (plain, lean):
        x = x0.clone().requires_grad_(True)
        m(x).backward(grad)
        out.append(x.grad.float())
    assert torch.isfinite(out[1]).all()
    assert ((out[1] - out[0]).norm() / out[0].norm()) < 5e-3


def test_lean_norms_under_non_reentrant_checkpointing_bf16(tiny_dir):
    """The whole lora-dpo model in bf16 with gradient checkpointing: lean norms vs transformers' own."""
    res = []
    for lean in (False, True):
        base = M.load_base(ModelConfig(name_or_path=str(tiny_dir)), QuantizationConfig(load_in_4bit=False),
                           torch.bfloat16, CPU)
        if not lean:
            for m in base.modules():
                if "RMSNorm" in type(m).__name__:
                    del m.forward  # transformers' forward back
        model = M.attach_lora(base, LoraConfig(), seed=0, gradient_checkpointing=True)
        randomise_lora_b(model)
        model.train()
        out = model(IDS).logits.float()
        out.square().mean().backward()
        res.append((out.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    assert torch.equal(res[1][0], res[0][0])
    for n, g in res[0][1].items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(res[1][1][n], g, rtol=2e-2, atol=1e-4)
