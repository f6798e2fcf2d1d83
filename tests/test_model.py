"""Model: one copy of the 4-bit base serves policy and reference; the reference is exactly the bare base."""

from __future__ import annotations

import gc
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import build_tiny

from lora_dpo import gguf_source
from lora_dpo import model as M
from lora_dpo.batching import collate
from lora_dpo.data import Pair
from lora_dpo.errors import LoraDpoError
from lora_dpo.logps import batch_logps
from lora_dpo.recipe import LoraConfig, ModelConfig, QuantizationConfig

CPU = torch.device("cpu")


def small_batch(pad: int = 2):
    return collate([Pair([1, 2, 3, 4], [5, 6, 7], [8, 9], 0), Pair([10, 11], [12, 13, 14, 15], [16], 1)], pad)


def qlora(path, **lora):
    base = M.load_base(ModelConfig(name_or_path=str(path)), QuantizationConfig(), torch.float32, CPU)
    return M.attach_lora(base, LoraConfig(**lora), seed=0, gradient_checkpointing=False)


def randomise_lora_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_base_is_4bit_nf4_with_lora_on_every_linear(tiny_model_dir):
    m = qlora(tiny_model_dir)
    q_layers = [mod for mod in m.modules() if isinstance(mod, bnb.nn.Linear4bit)]
    assert len(q_layers) == 2 * 7  # q k v o gate up down per layer
    assert all(mod.weight.quant_state.quant_type == "nf4" for mod in q_layers)
    assert all(mod.weight.quant_state.nested for mod in q_layers)  # double quantization
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(q_layers)


def test_one_copy_of_the_base_weights(tiny_model_dir):
    m = qlora(tiny_model_dir)
    base_params = [p for n, p in m.named_parameters() if "lora_" not in n]
    ptrs = {p.data_ptr() for p in base_params}
    assert len(ptrs) == len(base_params)  # no parameter is stored twice
    from transformers import PreTrainedModel

    models = [mod for mod in m.modules() if isinstance(mod, PreTrainedModel) and hasattr(mod, "lm_head")]
    assert len(models) == 1  # the reference is not a second model
    before = {id(p) for p in m.parameters()}
    with M.reference_mode(m):
        batch_logps(m, small_batch())
    assert {id(p) for p in m.parameters()} == before  # the reference pass created no weights


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_a_cpu_4bit_model_keeps_no_view_of_its_checkpoint_file(tmp_path, tokenizer):
    """The unquantized tensors are copied out of the memory-mapped checkpoint, so the mapping (the whole
    full-precision file, as read for quantization) closes; ties and values are kept."""
    from safetensors.torch import load_file

    path = build_tiny(tmp_path / "tied", tokenizer, tie_word_embeddings=True)
    base = M.load_base(ModelConfig(name_or_path=str(path)), QuantizationConfig(), torch.float32, CPU)
    gc.collect()
    assert str(path / "model.safetensors") not in Path("/proc/self/maps").read_text()
    emb = base.get_input_embeddings().weight
    assert base.get_output_embeddings().weight is emb  # still tied: one tensor
    saved = load_file(path / "model.safetensors")
    assert torch.equal(emb, saved["model.embed_tokens.weight"])
    assert torch.equal(base.model.norm.weight, saved["model.norm.weight"])
    assert sum(t.device.type == "cpu" for t in base.parameters()) > 0


def test_copying_weights_out_keeps_views_ties_and_values():
    """Two parameters that are different views of one buffer are each copied as their own view; a Parameter shared
    by two modules is copied once and stays shared."""
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            flat = torch.arange(12.0)
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
            self.b.weight = self.a.weight
            self.c = torch.nn.Parameter(flat[:6].view(2, 3))
            self.d = torch.nn.Parameter(flat[6:].view(3, 2))
            self.register_buffer("e", flat[:4])

    m = Shared()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    copied = M.own_unquantized_weights(m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m.a.weight is m.b.weight
    assert copied == 4 * (4 + 2 + 2 + 6 + 6 + 4)  # a.weight once, two biases, c, d, e: fp32 bytes


def test_reference_equals_bare_base_and_policy_differs(tiny_model_dir):
    m = qlora(tiny_model_dir)
    randomise_lora_b(m)
    bare = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.float32, CPU)
    b = small_batch()
    with torch.no_grad():
        expected, _ = batch_logps(bare, b)
        policy, _ = batch_logps(m, b)
    with M.reference_mode(m):
        ref, _ = batch_logps(m, b)
    assert torch.allclose(ref, expected, atol=1e-6, rtol=0)
    assert (policy - ref).abs().max() > 1e-3
    assert torch.is_grad_enabled()  # reference_mode restores grad mode on exit


def test_reference_mode_equals_peft_disable_adapter_and_switches_back(tiny_model_dir, monkeypatch):
    """reference_mode sets each LoRA layer's off switch itself (peft's disable_adapter surveys the whole model
    first: ~45 ms a use on the demo model): the same log-probs as peft's context, nested uses unwind, and on exit the
    adapter is on again with its parameters still trainable."""
    from peft import PeftModel

    m = qlora(tiny_model_dir)
    randomise_lora_b(m)
    b = small_batch()
    with torch.no_grad(), m.disable_adapter():
        want, _ = batch_logps(m, b)
    with torch.no_grad():
        policy, _ = batch_logps(m, b)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    monkeypatch.setattr(PeftModel, "get_model_status", lambda self: (_ for _ in ()).throw(AssertionError("slow")))
    with M.reference_mode(m):
        with M.reference_mode(m):
            inner, _ = batch_logps(m, b)
        outer, _ = batch_logps(m, b)  # still off after the inner use
    assert torch.equal(inner, want) and torch.equal(outer, want)
    with torch.no_grad():
        again, _ = batch_logps(m, b)
    assert torch.equal(again, policy) and (policy - want).abs().max() > 1e-3
    assert [n for n, p in m.named_parameters() if p.requires_grad] == trainable and trainable


def test_qlora_gradients_match_the_dequantized_twin(tiny_model_dir):
    """bitsandbytes' CPU 4-bit path must pass correct gradients to LoRA layers below it."""
    m4 = qlora(tiny_model_dir)
    randomise_lora_b(m4)
    twin = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(load_in_4bit=False),
                       torch.float32, CPU)
    modules = dict(twin.named_modules())
    with torch.no_grad():
        for name, mod in m4.get_base_model().named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
                modules[name.replace(".base_layer", "")].weight.copy_(w)
    twin = M.attach_lora(twin, LoraConfig(), seed=0, gradient_checkpointing=False)
    twin.load_state_dict({k: v for k, v in m4.state_dict().items() if "lora_" in k}, strict=False)
    b = small_batch()
    for m in (m4, twin):
        batch_logps(m, b)[0].sum().backward()
    g4 = dict((n, p.grad) for n, p in m4.named_parameters() if p.requires_grad)
    gt = dict((n, p.grad) for n, p in twin.named_parameters() if p.requires_grad)
    deepest = [n for n in g4 if "layers.0." in n and "lora_A" in n]
    assert deepest and all(g4[n].abs().sum() > 0 for n in deepest)
    for n in g4:
        scale = gt[n].abs().max() + 1e-12
        assert (g4[n] - gt[n]).abs().max() / scale < 0.03, n


def test_source_errors(tmp_path):
    with pytest.raises(LoraDpoError, match="not found"):
        M.resolve_source(ModelConfig(name_or_path=str(tmp_path / "m.gguf")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraDpoError, match="no config.json"):
        M.resolve_source(ModelConfig(name_or_path=str(tmp_path / "empty")))
    with pytest.raises(LoraDpoError, match="not a model directory"):
        M.resolve_source(ModelConfig(name_or_path=str(tmp_path / "nope")))
    assert M.resolve_source(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")).kind == "hub"
    corrupt = tmp_path / "bad.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(LoraDpoError, match="cannot read GGUF"):
        M.gguf_to_hf_dir(corrupt)


def test_demo_model_from_gguf(demo_dir):
    """The demo GGUF converts to a Llama checkpoint that answers like SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir)
    m = AutoModelForCausalLM.from_pretrained(demo_dir)
    assert m.config.model_type == "llama" and m.config.num_hidden_layers == 30
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = m.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_gguf_special_tokens_come_from_the_file(demo_dir, capsys):
    """The converted tokenizer's bos/eos/pad are the ids the GGUF file declares, also where a transformers release
    converts them wrongly (5.17 gave SmolLM2 eos = <|im_start|>): simulated here, then corrected and said."""
    from transformers import AutoTokenizer

    ids = gguf_source.gguf_special_token_ids(M.demo_gguf_path())
    assert ids == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    tok = AutoTokenizer.from_pretrained(demo_dir)
    assert (tok.bos_token_id, tok.eos_token_id) == (ids["bos"], ids["eos"])
    tok.eos_token = "<|im_start|>"  # what transformers 5.17 produced
    gguf_source._special_tokens_from_gguf(tok, M.demo_gguf_path())
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert "eos_token set to '<|im_end|>' (id 2)" in capsys.readouterr().out


def test_an_eval_pass_does_not_change_training_gradients(tiny_model_dir):
    """Regression: bitsandbytes' CPU inference repacking must not leak into training (it drops gradients)."""
    from lora_dpo.objective import dpo_forward
    from lora_dpo.recipe import DpoConfig

    def grad_after(eval_first: bool):
        m = qlora(tiny_model_dir)
        randomise_lora_b(m)
        if eval_first:
            m.eval()
            with torch.no_grad():
                dpo_forward(m, small_batch(), DpoConfig())
        m.train()
        dpo_forward(m, small_batch(), DpoConfig())[0].backward()
        return [p.grad for p in m.parameters() if p.requires_grad]

    for a, b in zip(grad_after(False), grad_after(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("resolvable", [True, False])
def test_offline_machine_switches_to_offline_mode_before_the_first_hub_access(monkeypatch, capsys, resolvable):
    """Without a network a hub id costs ~25 s of retries before failing; the check resolves the host name once
    (faked here: tests never touch the network) and, when it cannot, switches this process to offline mode."""
    import socket

    import datasets.config
    import huggingface_hub.constants as hc

    from lora_dpo import hub

    asked = []

    def fake_getaddrinfo(host, *args, **kw):
        asked.append(host)
        if not resolvable:
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443))]

    monkeypatch.setattr(hub, "_checked", False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    for var in hub.PROXY_VARS + ("HF_ENDPOINT",):
        monkeypatch.delenv(var, raising=False)
    src = M.resolve_source(ModelConfig(name_or_path="owner/some-model"))
    assert src.kind == "hub" and asked == ["huggingface.co"]
    assert hc.HF_HUB_OFFLINE is (not resolvable) and datasets.config.HF_HUB_OFFLINE is (not resolvable)
    assert ("cannot be resolved: working offline" in capsys.readouterr().out) is (not resolvable)
    M.resolve_source(ModelConfig(name_or_path="owner/other-model"))
    assert len(asked) == 1  # once per process


def test_offline_check_skipped_when_offline_or_behind_a_proxy(monkeypatch):
    import socket

    import huggingface_hub.constants as hc

    from lora_dpo import hub

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("resolved a host name"))
    monkeypatch.setattr(hub, "_checked", False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert hub.offline_if_unreachable()  # HF_HUB_OFFLINE=1: nothing to check
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert not hub.offline_if_unreachable()  # a proxy resolves names itself


def test_bitsandbytes_kernels_hub_notice_is_dropped_and_nothing_else():
    import logging

    M.drop_kernels_hub_notice()
    M.drop_kernels_hub_notice()  # once, not twice
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert sum(isinstance(f, M._NoKernelsHubNotice) for f in log.filters) == 1

    def record(msg):
        return logging.LogRecord(log.name, logging.WARNING, __file__, 1, msg, ("No module named 'kernels'",), None)

    assert not log.filter(record("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure "
                                 "you already `pip install kernels`"))
    assert log.filter(record("some other bitsandbytes warning: %s"))


@pytest.mark.parametrize("on, share, want", [(True, 1.0, [True, True]), (False, 1.0, [False, False]),
                                             (True, 0.5, [True, False]), (True, 0.01, [True, False])])
def test_attach_lora_turns_checkpointing_on_for_the_decoder_layers(tiny_model_dir, on, share, want):
    """Through whichever name this transformers has (activation_/gradient_checkpointing_enable): a run with
    checkpointing that silently ran without it would still match the plain run's losses. A share checkpoints the
    first layers (at least one)."""
    base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.float32,
                       torch.device("cpu"))
    m = M.attach_lora(base, LoraConfig(r=4), seed=0, gradient_checkpointing=on, checkpoint_share=share)
    layers = [mod for mod in m.modules() if type(mod).__name__ == "LlamaDecoderLayer"]
    assert layers == M.decoder_layers(m) and [mod.gradient_checkpointing for mod in layers] == want


def test_checkpointing_leaves_the_embeddings_output_without_grad(tiny_model_dir):
    """transformers' checkpointing switch makes the embeddings' output require grad (reentrant checkpointing needs
    it; lora-dpo's non-reentrant one does not): backward would run the first layer's input gradients for nothing.
    attach_lora takes that off — and every adapter matrix, the first layer's included, gets the gradient it gets
    without checkpointing."""
    from lora_dpo.batching import build
    from lora_dpo.data import Pair
    from lora_dpo.logps import batch_logps

    batch = build([Pair([1, 2, 3, 4, 5], [6, 7, 8], [9, 10], 0)], 0, "packed")
    grads, inputs = [], []
    for on in (False, True):
        base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.float32,
                           torch.device("cpu"))
        m = M.attach_lora(base, LoraConfig(r=4), seed=0, gradient_checkpointing=on)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        M.decoder_layers(m)[0].register_forward_pre_hook(
            lambda mod, args, kwargs: inputs.append((args or [kwargs["hidden_states"]])[0].requires_grad),
            with_kwargs=True)
        m.train()
        batch_logps(m, batch)[0].sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert inputs == [False, False]
    assert all(g.abs().sum() > 0 for g in grads[1].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7)
