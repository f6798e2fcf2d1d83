"""GPU twins of CPU tests: the paths that only exist on a CUDA device (bitsandbytes' CUDA 4-bit kernels, bf16 and
fp16 autocast, FlexAttention's compiled kernels). Skipped without CUDA; each CPU twin is named in its docstring."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from lora_dpo import attention as A
from lora_dpo import model as M
from lora_dpo import offload, train
from lora_dpo.batching import build, collate
from lora_dpo.logps import batch_logps, plain_batch_logps
from lora_dpo.recipe import LoraConfig, ModelConfig, QuantizationConfig, recipe_from_dict
from tests.test_layouts import PAIRS
from tests.test_offload import grads_without_and_with_offload

pytestmark = pytest.mark.gpu


def _run_and_check(recipe_dict) -> None:
    result = train(recipe_from_dict(recipe_dict))
    assert abs(result.step0_loss - math.log(2)) < 1e-4
    assert all(math.isfinite(r["loss"]) for r in result.history)
    adapter = load_file(result.output_dir / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # the optimizer stepped


def test_gpu_fp16_grad_scaler_run(recipe_dict):
    """fp16 autocast scales the loss (GradScaler) so small gradients survive; twin: test_train's CPU loop tests."""
    recipe_dict["train"].update(max_steps=3, precision="fp16", device="cuda")
    _run_and_check(recipe_dict)


def test_gpu_flex_attention_run(recipe_dict):
    """Training through FlexAttention's block mask (forward and backward kernels compiled on the GPU); twin:
    test_layouts.test_flex_attention_block_mask_equals_dense (forward only: CPU has no flex backward)."""
    recipe_dict["model"]["attn_implementation"] = "flex_attention"
    recipe_dict["train"].update(max_steps=3, device="cuda")
    _run_and_check(recipe_dict)


def test_gpu_auto_attention_run(recipe_dict, capsys):
    """attn_implementation auto on this GPU: flex_attention where it is Ampere or newer (with Triton), and a run that
    trains and generates on it; twin: test_attention's resolution tests with faked GPUs."""
    recipe_dict["train"].update(max_steps=2, device="cuda")
    recipe_dict.setdefault("evaluation", {})["generations"] = 2
    expected = A.resolve_attention("auto", torch.device("cuda"), "packed")
    assert expected == ("flex_attention" if torch.cuda.get_device_capability() >= (8, 0) and A._flex_compiles()
                        else "sdpa")
    _run_and_check(recipe_dict)
    assert f"\nattention: {expected} (auto)" in capsys.readouterr().out


@pytest.mark.parametrize("attn", ["sdpa", "sdpa_causal", "flex_attention"])
def test_gpu_prefix_sharing_equals_plain(tiny_model_dir, attn):
    """Packed prefix sharing vs the plain concatenated forward on a CUDA 4-bit base in bf16, values and LoRA
    gradients, within the documented bf16 tolerance (2e-2 absolute on summed log-probs); twin:
    test_layouts.test_shared_layouts_equal_plain_policy (fp32, 1e-5)."""
    base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir), attn_implementation=attn), QuantizationConfig(),
                       torch.bfloat16, torch.device("cuda"))
    m = M.attach_lora(base, LoraConfig(r=4), seed=0, gradient_checkpointing=True)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    m.train()
    weights = torch.arange(1, 2 * len(PAIRS) + 1, dtype=torch.float32, device="cuda")

    def run(batch, plain):
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logps, _ = plain_batch_logps(m, batch) if plain else batch_logps(m, batch)
        (logps * weights).sum().backward()
        return logps.detach(), [p.grad.float().clone() for p in m.parameters() if p.requires_grad]

    want, g_want = run(collate(PAIRS, 2).to(torch.device("cuda")), plain=True)
    got, g_got = run(build(PAIRS, 2, "packed").to(torch.device("cuda")), plain=False)
    assert torch.allclose(got, want, atol=2e-2, rtol=0), (got - want).abs().max()
    num = sum(float((a - b).norm() ** 2) for a, b in zip(g_got, g_want)) ** 0.5
    den = sum(float(b.norm() ** 2) for b in g_want) ** 0.5
    assert den > 0 and num / den < 5e-2, num / den


def test_gpu_offloaded_embeddings(tiny_model_dir, recipe_dict, capsys):
    """model.offload_embeddings on a GPU: the table leaves the GPU's memory, the log-probs do not change, and a run
    trains with it; twin: test_model.test_host_embedding_lookup_changes_nothing_but_where_it_runs (CPU to CPU)."""
    cuda = torch.device("cuda")
    base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.bfloat16, cuda)
    m = M.attach_lora(base, LoraConfig(r=4), seed=0, gradient_checkpointing=True)
    batch = build(PAIRS, 2, "packed").to(cuda)

    def logps():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return batch_logps(m, batch)[0]

    want = logps()
    emb = base.get_input_embeddings()
    table, before = emb.weight.numel() * emb.weight.element_size(), torch.cuda.memory_allocated()
    assert offload.embeddings_movable(base)
    assert "GiB kept in CPU memory" in offload.offload_embeddings(base)
    assert not offload.embeddings_movable(base)
    assert emb.weight.device.type == "cpu" and before - torch.cuda.memory_allocated() >= table
    assert torch.allclose(logps(), want, atol=1e-3, rtol=0)
    with offload.embeddings_on_device(m):  # generation: transformers moves inputs to the first parameter's device
        assert emb.weight.device.type == "cuda"
    assert emb.weight.device.type == "cpu"
    recipe_dict["model"]["offload_embeddings"] = True
    recipe_dict["train"].update(max_steps=2, device="cuda")
    recipe_dict.setdefault("evaluation", {})["generations"] = 2  # generates before and after training
    _run_and_check(recipe_dict)
    assert "GiB kept in CPU memory (model.offload_embeddings)" in capsys.readouterr().out


def test_gpu_offloaded_activations(tiny_model_dir, recipe_dict, capsys):
    """train.offload_activations on a GPU: each checkpointed layer's input goes to pinned CPU memory and comes back
    (asynchronous copies in stream order), the gradients exactly as without, and a run trains with it; twin:
    test_offload.test_checkpointed_inputs_move_out_and_back_without_changing_gradients (CPU to CPU)."""
    cuda = torch.device("cuda")
    base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.bfloat16, cuda)
    m = M.attach_lora(base, LoraConfig(r=4), seed=0, gradient_checkpointing=True)
    batch = build(PAIRS, 2, "packed").to(cuda)
    want, got, moved, served = grads_without_and_with_offload(m, batch, cuda,
                                                              torch.autocast("cuda", dtype=torch.bfloat16))
    assert len(moved) == len(M.decoder_layers(m)) and served == [False] + [True] * (len(moved) - 1)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    recipe_dict["train"].update(max_steps=2, device="cuda", gradient_checkpointing=True, offload_activations=True)
    _run_and_check(recipe_dict)
    assert "checkpointed layers keep for backward wait in CPU memory" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_folded_lora_dropout_under_autocast(dtype):
    """lora_A with the dropout folded in, on CUDA under autocast: the output and the gradients of x and of the fp32
    LoRA weight equal the plain ops' with the same mask (redrawn from the same seed); twin:
    test_lora_dropout.test_folded_dropout_gives_peft_numbers_and_keeps_less (CPU, fp32, whole model)."""
    import torch.nn.functional as F

    from lora_dpo.lora_dropout import _DroppedLinear

    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(3, 37, 96, device="cuda", dtype=dtype, generator=g)
    w0 = torch.randn(8, 96, device="cuda", generator=g) * 0.1
    grad = torch.randn(3, 37, 8, device="cuda", dtype=dtype, generator=g)
    outs = []
    for folded in (True, False):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        torch.manual_seed(7)
        with torch.autocast("cuda", dtype=dtype):
            if folded:
                out = _DroppedLinear.apply(x, w, 0.1)
            else:
                keep = F.dropout(torch.ones_like(x), 0.1, training=True) != 0
                out = F.linear(x * keep * (1 / 0.9), w)
        out.backward(grad)
        outs.append((out.detach(), x.grad, w.grad))
    (o1, gx1, gw1), (o2, gx2, gw2) = outs
    assert o1.dtype == o2.dtype == dtype and gw1.dtype == torch.float32
    assert torch.equal(o1, o2)
    torch.testing.assert_close(gx1, gx2)
    torch.testing.assert_close(gw1, gw2, rtol=1e-2, atol=1e-3)


def _cuda_lora(model_dir, dtype: torch.dtype, attn: str, fuse_forward: bool = True):
    """A CUDA 4-bit base from `model_dir` with a checkpointed LoRA adapter whose B matrices are random (seeded)."""
    base = M.load_base(ModelConfig(name_or_path=str(model_dir), attn_implementation=attn), QuantizationConfig(),
                       dtype, torch.device("cuda"))
    m = M.attach_lora(base, LoraConfig(r=4), seed=0, gradient_checkpointing=True, fuse_forward=fuse_forward)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(p) * 0.05)
    return m


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fused_lora_forward_under_autocast(tiny_model_dir, dtype):
    """The fused LoRA forward on a CUDA 4-bit base under autocast, and with down_proj's base GEMM last (skipped in
    the recompute): log-probs and LoRA gradients within the compute dtype's rounding of peft's own forward (the
    fused form rounds once where peft rounds three times), in the autocast dtype throughout; twins:
    test_lora_forward.test_fused_forward_gives_peft_numbers and test_the_recompute_stops_before_the_mlp_output_base_gemm
    (CPU, fp32)."""
    from lora_dpo.lora_forward import base_gemm_last, fuse_lora_forward
    from tests.test_lora_forward import _base_calls

    cuda = torch.device("cuda")
    peft_model = _cuda_lora(tiny_model_dir, dtype, "auto", fuse_forward=False)
    m, batch, results = peft_model, build(PAIRS, 2, "packed").to(cuda), []
    for mode in ("peft", "fused", "base GEMM last"):  # the same model and weights, peft's forward first
        assert mode != "fused" or fuse_lora_forward(m) > 0
        assert mode != "base GEMM last" or base_gemm_last(M.decoder_layers(m)) == 2
        calls = _base_calls(m)
        m.train()
        m.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            logps, _ = batch_logps(m, batch)
        logps.float().sum().backward()
        results.append((logps.detach().float(), [p.grad.float().clone() for p in m.parameters() if p.requires_grad]))
        assert calls["down_proj"] == (2 if mode == "base GEMM last" else 4) and calls["up_proj"] == 4
        for handle in calls.handles:
            handle.remove()
    (want, want_grads), *others = results
    for got, got_grads in others:
        torch.testing.assert_close(got, want, rtol=2e-2, atol=0.1)  # sums of rounded per-token log-probs
        for a, b in zip(got_grads, want_grads):
            assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_gpu_lean_rmsnorm_in_bf16():
    """The lean RMSNorm on CUDA in bf16: transformers' forward bit for bit, the input gradient to bf16 rounding,
    2·H bytes per token less kept; twin: test_rmsnorm.test_lean_norm_gives_transformers_numbers_and_keeps_less."""
    from tests.test_rmsnorm import _norm_pair, _run

    plain, lean = (m.cuda() for m in _norm_pair(torch.bfloat16))
    g = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(3, 17, 96, device="cuda", generator=g) * 3).bfloat16()
    grad = torch.randn(3, 17, 96, device="cuda", generator=g).bfloat16()
    (want, want_dx, want_kept), (got, got_dx, got_kept) = _run(plain, x, grad), _run(lean, x, grad)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_dx, want_dx, rtol=1.6e-2, atol=1e-3)
    assert want_kept - got_kept == 3 * 17 * 96 * 2


def test_gpu_log_prob_gradient_in_forward_under_bf16_autocast():
    """The chunked log-probs' gradient computed in forward (logps._TokenLogps) on CUDA, a bf16 LM head under bf16
    autocast as training runs it, at a real vocabulary size: the checkpointed chunk's values bit for bit, its input
    gradient to bf16 rounding; twin: test_logps.test_gradient_in_forward_under_bf16_autocast (CPU)."""
    from lora_dpo.logps import _token_logps, _TokenLogps

    g = torch.Generator(device="cuda").manual_seed(0)
    head = torch.nn.Linear(512, 32000, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    h0 = torch.randn(256, 512, device="cuda", generator=g).bfloat16()
    labels = torch.randint(0, 32000, (256,), device="cuda", generator=g)
    upstream = torch.randn(256, device="cuda", generator=g)
    outs = []
    for fn in (_TokenLogps.apply, _token_logps):
        h = h0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(h, labels, head, (1.0, None))
        out.backward(upstream)
        outs.append((out.detach(), h.grad))
    (got, g_got), (want, g_want) = outs
    assert torch.equal(got, want)
    torch.testing.assert_close(g_got.float(), g_want.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("attn", ["flex_attention", "sdpa"])
def test_gpu_compiled_blocks_under_bf16_autocast(tiny_model_dir, attn):
    """train.compile on a CUDA 4-bit base under bf16 autocast, gradient checkpointing on, inductor's Triton kernels:
    log-probs and LoRA gradients within bf16 rounding of the eager ones, for batches of two lengths; twin:
    test_compile.test_compiled_blocks_give_the_eager_numbers_with_one_set_of_graphs (CPU, aot_eager)."""
    from lora_dpo.compile import compile_layers

    cuda = torch.device("cuda")
    torch._dynamo.reset()
    m = _cuda_lora(tiny_model_dir, torch.bfloat16, attn).train()
    batches = [build(PAIRS, 2, "packed").to(cuda), build(PAIRS[:1], 2, "packed").to(cuda)]
    results = []
    for compiled in (False, True):
        assert not compiled or compile_layers(M.decoder_layers(m), cuda) == 2 * len(M.decoder_layers(m))
        for batch in batches:
            m.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logps, _ = batch_logps(m, batch)
            logps.float().sum().backward()
            grads = [p.grad.float().clone() for p in m.parameters() if p.requires_grad]
            results.append((logps.detach().float(), grads))
    for (want, want_grads), (got, got_grads) in zip(results[:2], results[2:]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=0.1)
        for a, b in zip(got_grads, want_grads):
            assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_gpu_prequantized_checkpoint_loads_as_stored_in_the_runs_dtype(tiny_model_dir, tokenizer, tmp_path):
    """CPU twin: tests/test_prequantized.py. A 4-bit model quantized on the GPU and saved loads back on the GPU with
    the same weights and logits, computing in bf16 although its config names float16."""
    import json

    cuda = torch.device("cuda")
    fresh = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.bfloat16, cuda)
    fresh.save_pretrained(tmp_path / "stored")
    tokenizer.save_pretrained(tmp_path / "stored")
    config = json.loads((tmp_path / "stored" / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_compute_dtype"] = "float16"
    (tmp_path / "stored" / "config.json").write_text(json.dumps(config))
    stored = M.load_base(ModelConfig(name_or_path=str(tmp_path / "stored")), QuantizationConfig(), torch.bfloat16,
                         cuda)
    import bitsandbytes as bnb

    layers = [m for m in stored.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.compute_dtype == torch.bfloat16 and m.weight.device.type == "cuda" for m in layers)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]], device=cuda)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(stored(ids).logits, fresh(ids).logits)
