"""Memory planner: parameter, LoRA and 4-bit byte counts against real tiny models; the activation formula against
what autograd really saves; monotonicity; the largest-fit search at its boundary; the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from lora_dpo import estimate as est_lib
from lora_dpo.cli import main
from lora_dpo.errors import LoraDpoError
from lora_dpo.estimate import (
    Arch,
    estimate_for,
    format_table,
    gib,
    layer_activation_bytes,
    parse_size,
    weight_bytes,
)
from lora_dpo.recipe import recipe_from_dict

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kw = dict(SMALL, **overrides)
    if model_type in ("qwen3", "gemma", "gemma2", "gemma3_text"):
        kw.setdefault("head_dim", 24)  # ≠ hidden / heads, so a wrong head_dim rule shows
    return AutoConfig.for_model(model_type, **kw)


def real_numel(config) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # a tied lm_head is one parameter, counted once


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True, "num_key_value_heads": 4}),
    ("mistral", {}), ("qwen2", {"tie_word_embeddings": False}), ("qwen3", {"attention_bias": True}),
    ("gemma", {}), ("gemma2", {}), ("gemma3_text", {}), ("smollm3", {}), ("granite", {"mlp_bias": True}),
])
def test_parameter_count_equals_a_real_model(model_type, overrides):
    config = tiny_config(model_type, **overrides)
    assert Arch.from_config(config).num_params() == real_numel(config)


def test_unmodelled_family_is_a_clear_error():
    from transformers import GPT2Config

    with pytest.raises(LoraDpoError, match="'gpt2' is not one of them"):
        Arch.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2))


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["o_proj", "down_proj", "up_proj"]])
def test_lora_count_equals_peft(targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", head_dim=24)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert Arch.from_config(config).lora_params(8, targets) == trainable
    with pytest.raises(LoraDpoError, match="qkv_proj"):
        Arch.from_config(config).lora_params(8, ["qkv_proj"])


def _footprint(model) -> int:
    """Bytes held by parameters, buffers and bitsandbytes' quantization state, each storage once."""
    import bitsandbytes as bnb

    seen = {}
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            tensors += [qs.absmax, qs.code, qs.offset]
            if qs.nested:
                tensors += [qs.state2.absmax, qs.state2.code]
    for t in tensors:
        if torch.is_tensor(t):
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary inv_freq: not weights
    return sum(seen.values()) - buffers


@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_weight_bytes_match_bitsandbytes(tmp_path, double_quant):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # a small vocabulary, so the quantized layers dominate the footprint and an error in their bytes shows
    config = tiny_config("llama", vocab_size=128, hidden_size=128, intermediate_size=384)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization_config=q,
                                                 device_map={"": "cpu"})
    measured = _footprint(model)
    predicted = weight_bytes(Arch.from_config(config), "nf4", 4, double_quant)
    assert abs(predicted - measured) / measured < 0.02, (predicted, measured)
    assert weight_bytes(Arch.from_config(config), "bfloat16", 4) > 2 * measured  # 4 bit is really smaller


# ---------------------------------------------------------------- activations: formula vs autograd's saved tensors

def _saved_bytes(model, input_ids, attention_mask, **inputs) -> int:
    """Bytes of the tensors autograd saves in the decoder forward, each storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_base_model().model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs)
    return sum(seen.values())


def _frozen_base(tmp_path, model_type: str, quantized: bool):
    """A tiny model of `model_type` saved and loaded as lora-dpo loads bases (4-bit on CPU kept differentiable, the
    lean gated MLP, frozen): → (config, model)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_dpo.memory_model import LEAN_NORMS
    from lora_dpo.mlp import lean_gated_mlps
    from lora_dpo.model import _keep_cpu_4bit_differentiable
    from lora_dpo.rmsnorm import lean_rmsnorms

    config = tiny_config(model_type, hidden_size=96, intermediate_size=352, num_hidden_layers=3, head_dim=24)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    kw = {}
    if quantized:
        kw = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
                  device_map={"": "cpu"})
    base = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, **kw)
    _keep_cpu_4bit_differentiable(base)
    assert lean_gated_mlps(base) == config.num_hidden_layers  # as lora-dpo loads models
    assert lean_rmsnorms(base) == (2 * config.num_hidden_layers + 1) * (model_type in LEAN_NORMS) \
        + 2 * config.num_hidden_layers * (model_type == "qwen3")  # qwen3: its per-head q/k norms too
    for p in base.parameters():
        p.requires_grad_(False)
    return config, base


@pytest.mark.parametrize("model_type,targets,padded,quantized", [
    ("llama", "all-linear", False, True),
    ("llama", "all-linear", True, True),
    ("llama", ["q_proj", "v_proj"], True, True),
    ("llama", ["k_proj", "o_proj", "gate_proj"], True, False),
    ("qwen3", "all-linear", True, False),
])
def test_activation_formula_equals_what_autograd_saves(tmp_path, model_type, targets, padded, quantized):
    """fp32 on CPU runs the same Python modules as bf16 on a GPU; the formula must predict the saved bytes."""
    from peft import LoraConfig, get_peft_model

    from lora_dpo.lora_forward import fuse_lora_forward

    config, base = _frozen_base(tmp_path, model_type, quantized)
    model = get_peft_model(base, LoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM"))
    rows, T = 3, 37
    ids = torch.randint(0, config.vocab_size, (rows, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(rows, T, dtype=torch.long)
    if padded:
        mask[1, 20:] = 0
    measured = _saved_bytes(model, ids, mask)
    arch = Arch.from_config(config)
    predicted = arch.layers * layer_activation_bytes(arch, rows, T, arch.lora_targets(targets), 8, 4, masked=padded)
    # the formula leaves out RoPE's cos/sin (2·T·head_dim·4 bytes, shared by all layers)
    assert abs(predicted - measured) / measured < 0.01, (predicted, measured)
    assert fuse_lora_forward(model) > 0  # lora-dpo's own forward keeps what peft's keeps, to the same 1 %
    fused = _saved_bytes(model, ids, mask)
    assert abs(predicted - fused) / fused < 0.01, (predicted, fused)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_sdpa_causal_formula_equals_what_autograd_saves(tmp_path, targets):
    """sdpa_causal saves its attention tensors over the pairs' gathered sequences, not the rows; the formula with
    split=(sequences, length) must predict the bytes, the batch's two gather indices included."""
    import random

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_dpo import attention
    from lora_dpo.batching import build
    from lora_dpo.data import Pair
    from lora_dpo.mlp import lean_gated_mlps

    config = tiny_config("llama", hidden_size=96, intermediate_size=352, num_hidden_layers=3, head_dim=24)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    attention.register("sdpa_causal")
    base = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="sdpa_causal")
    lean_gated_mlps(base)
    for p in base.parameters():
        p.requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM"))
    r = random.Random(0)
    ids = lambda n: [r.randrange(5, config.vocab_size) for _ in range(n)]  # noqa: E731
    batch = build([Pair(ids(20), ids(9), ids(12), 0), Pair(ids(7), ids(15), ids(4), 1),
                   Pair(ids(11), ids(6), ids(6), 2)], 0, "shared")
    inputs = batch.model_inputs("sdpa_causal", torch.float32)
    measured = _saved_bytes(model, **inputs)
    arch = Arch.from_config(config)
    (rows, T), split = batch.input_ids.shape, (2 * batch.num_pairs, batch.seq_len)
    predicted = arch.layers * layer_activation_bytes(arch, rows, T, arch.lora_targets(targets), 8, 4, masked=False,
                                                     split=split) + 8 * (split[0] * split[1] + rows * T)
    assert abs(predicted - measured) / measured < 0.01, (predicted, measured)


def test_planner_counts_sdpa_causal_on_the_gathered_sequences_and_as_sdpa_elsewhere(monkeypatch):
    """Prefix-shared rows: no T² mask, the attention tensors over 2·batch sequences of max_length (the formula tested
    above) plus the two gather indices; the concatenated layout has no gather plan, so sdpa_causal is sdpa there."""
    from lora_dpo import estimate

    calls = []
    formula = estimate.layer_activation_bytes
    monkeypatch.setattr(estimate, "layer_activation_bytes",
                        lambda *a, **kw: calls.append((a[2], kw)) or formula(*a, **kw))

    def est(attn, layout):
        raw = {"model": {"name_or_path": "org/model", "attn_implementation": attn},
               "data": {"train": "t.jsonl", "max_length": 4096, "max_prompt_length": 2048},
               "train": {"per_device_train_batch_size": 2, "gradient_checkpointing": False},
               "output": {"dir": "runs/x"}}
        calls.clear()
        e = estimate_for(recipe_from_dict(raw), 80 << 30, layout=layout, reference="live", arch=DEMO_LIKE)
        return e, calls[0]  # the recipe itself (the search for the largest batch and length follows)

    (plain, (_, kw_plain)), (causal, (_, kw_causal)) = est("sdpa", "concatenated"), est("sdpa_causal", "concatenated")
    assert causal.activations == plain.activations and kw_causal == kw_plain and kw_plain["masked"]
    (sdpa, (T, kw_sdpa)), (causal, (_, kw)) = est("sdpa", "prefix-shared"), est("sdpa_causal", "prefix-shared")
    assert kw_sdpa["split"] is None and kw == {"masked": False, "eager": False, "split": (4, 4096),
                                                  "dropout": False}
    rows = 2
    layer = lambda **k: formula(DEMO_LIKE, rows, T, DEMO_LIKE.lora_targets("all-linear"), 16, 2, **k)  # noqa: E731
    # no checkpointing: every layer saves, one more is the transient (the live reference pass's no-grad layer);
    # the boolean mask goes, the gather indices come
    per_layer = (DEMO_LIKE.layers + 1) * (layer(**kw) - layer(**kw_sdpa))
    assert causal.activations - sdpa.activations == per_layer + 8 * (4 * 4096 + rows * T) - rows * T * T


# ---------------------------------------------------------------- the planner

DEMO_LIKE = Arch("llama", 49152, 576, 1536, 30, 9, 3, 64, True)


def recipe(**train):
    raw = {"model": {"name_or_path": "org/model"}, "data": {"train": "t.jsonl", "max_length": 512},
           "train": {"per_device_train_batch_size": 4, **train}, "output": {"dir": "runs/x"}}
    return recipe_from_dict(raw)


def plan(gpu=16 << 30, layout="concatenated", **train):
    return estimate_for(recipe(**train), gpu, layout=layout, reference="live", arch=DEMO_LIKE)


def test_parts_add_up_and_lora_count_is_the_demo_runs():
    e = plan()
    assert e.lora_params == 4_884_480  # what a real training run of the demo model prints
    assert e.total == e.weights + e.adapters + e.activations + e.logps + est_lib.OVERHEAD_BYTES
    assert e.allocated == e.total - e.overhead
    assert e.rows == 8 and e.seq_len == 512
    d = json.loads(est_lib.format_json(e))
    assert d["total"] == e.total and d["fits"] is True


def test_monotone_in_batch_length_and_checkpointing():
    base = plan()
    assert plan(per_device_train_batch_size=8).total > base.total
    assert estimate_for(recipe(), 16 << 30, layout="concatenated", arch=DEMO_LIKE).total == base.total
    longer = estimate_for(recipe_from_dict({**recipe().to_dict(), "data": {"train": "t", "max_length": 1024}}),
                          16 << 30, layout="concatenated", reference="live", arch=DEMO_LIKE)
    assert longer.total > base.total
    ckpt = plan(gradient_checkpointing=True)
    assert ckpt.activations < base.activations and ckpt.weights == base.weights
    assert ckpt.max_batch_size > base.max_batch_size
    assert plan(optim="paged_adamw_8bit").adapters < base.adapters
    precomputed = estimate_for(recipe(), 16 << 30, layout="concatenated", reference="precompute", arch=DEMO_LIKE)
    assert precomputed.total <= base.total
    shared = plan(layout="shared")
    assert shared.rows == 4 and shared.seq_len == 512 + 512 - 256  # prompt + chosen + rejected


@pytest.mark.parametrize("which", ["batch", "length"])
def test_largest_fit_is_exact_at_the_boundary(which):
    r = recipe()
    if which == "batch":
        at = lambda n: estimate_for(recipe(per_device_train_batch_size=n), 1 << 40, layout="concatenated",  # noqa: E731
                                    reference="live", arch=DEMO_LIKE)
        field, n = "max_batch_size", 7
    else:
        raw = r.to_dict()
        at = lambda n: estimate_for(recipe_from_dict({**raw, "data": {**raw["data"], "max_length": n}}),  # noqa: E731
                                    1 << 40, layout="concatenated", reference="live", arch=DEMO_LIKE)
        field, n = "max_max_length", 700
    budget = at(n).total
    assert at(n + 1).total > budget
    assert getattr(plan(gpu=budget), field) == n          # exactly enough memory: n fits
    assert getattr(plan(gpu=budget - 1), field) == n - 1  # one byte less: it does not


def test_checkpointing_a_share_of_the_layers_lies_between_none_and_all():
    """Each layer kept whole adds its saved activations and takes off its checkpointed input: with all layers
    checkpointed it is the full-checkpointing figure, and it grows as the share falls, to about no checkpointing."""
    L = DEMO_LIKE.layers
    none, full = plan(), plan(gradient_checkpointing=True)
    shares = [plan(gradient_checkpointing=True, gradient_checkpointing_layers=k / L) for k in (L, 20, 10, 1)]
    assert shares[0].activations == full.activations and shares[0].checkpointed_layers == L
    assert [e.checkpointed_layers for e in shares] == [L, 20, 10, 1]
    acts = [e.activations for e in shares]
    assert acts == sorted(acts) and len(set(acts)) == 4
    assert acts[-1] == pytest.approx(none.activations, rel=0.01)  # one layer recomputing ≈ none (+ its transient)
    step = (acts[2] - acts[1]) / 10  # linear in the layers kept whole
    assert acts[3] - acts[2] == pytest.approx(9 * step)


def test_advice_names_the_lowest_share_that_still_fits():
    full = plan(gradient_checkpointing=True)
    none = plan()
    roomy = plan(gpu=none.total + (1 << 20), gradient_checkpointing=True)
    assert "train.gradient_checkpointing=false: it fits without checkpointing" in "\n".join(roomy.advice)
    middle = (full.total + none.total) // 2
    e = plan(gpu=middle, gradient_checkpointing=True)
    line = next(a for a in e.advice if a.startswith("train.gradient_checkpointing_layers="))
    share = float(line.split("=")[1].split(":")[0])
    k = round(share * DEMO_LIKE.layers)
    assert plan(gpu=middle, gradient_checkpointing=True, gradient_checkpointing_layers=share).fits
    assert not plan(gpu=middle, gradient_checkpointing=True,
                    gradient_checkpointing_layers=(k - 1) / DEMO_LIKE.layers).fits  # the lowest that fits
    assert not any("gradient_checkpointing_layers" in a for a in plan(gpu=full.total, gradient_checkpointing=True)
                   .advice)  # only just fits with all layers: nothing to gain


def test_auto_share_is_the_fewest_layers_that_fit_with_memory_to_spare():
    from lora_dpo.estimate import AUTO_SPARE

    L = DEMO_LIKE.layers
    full, none = plan(gradient_checkpointing=True), plan()
    gpu = int((full.total + none.total) / 2 / (1 - AUTO_SPARE))  # the spare-adjusted budget sits midway
    auto = plan(gpu=gpu, gradient_checkpointing=True, gradient_checkpointing_layers="auto")
    k = auto.checkpointed_layers
    assert auto.checkpointing_auto and 1 < k < L
    budget = (1 - AUTO_SPARE) * gpu
    assert auto.total <= budget  # fits, with the spare left over
    assert plan(gpu=gpu, gradient_checkpointing=True, gradient_checkpointing_layers=(k - 1) / L).total > budget
    assert not any("gradient_checkpointing_layers=" in a for a in auto.advice)  # it already is the lowest
    assert f"checkpointing {k}/{L} layers, auto" in format_table(auto)
    roomy = plan(gpu=1 << 40, gradient_checkpointing=True, gradient_checkpointing_layers="auto")
    assert roomy.checkpointed_layers == 1  # at least one while checkpointing is on
    tight = plan(gpu=full.total, gradient_checkpointing=True, gradient_checkpointing_layers="auto")
    assert tight.checkpointed_layers == L  # nothing fits with the spare: all layers, the least memory
    assert plan(gradient_checkpointing=False, gradient_checkpointing_layers="auto").checkpointed_layers == 0


def test_advice_when_it_does_not_fit():
    e = plan(gpu=3 << 30, per_device_train_batch_size=64, gradient_accumulation_steps=2)
    assert not e.fits and 1 <= e.max_batch_size < 64
    text = "\n".join(e.advice)
    assert "gradient_checkpointing=true" in text and "paged_adamw_8bit" in text
    steps = -(-128 // e.max_batch_size)
    assert f"per_device_train_batch_size={e.max_batch_size} with train.gradient_accumulation_steps={steps}" in text
    kept = e.max_batch_size * steps  # the pairs per optimizer step it names are the ones it makes
    assert (f"still {kept} pairs" if kept == 128 else f"{kept} pairs per optimizer step (now 128)") in text
    assert plan(gpu=est_lib.OVERHEAD_BYTES).max_batch_size == 0


@pytest.mark.parametrize("text,expected", [("16GiB", 16 << 30), ("24GB", 24 * 10**9), ("80G", 80 << 30),
                                           ("40000MiB", 40000 << 20), ("1.5 GiB", 3 << 29)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["16 gigs", "", "-4GiB", "GiB", "16", "0.0000001b", "1000KB"])
def test_parse_size_rejects(bad):
    with pytest.raises(LoraDpoError, match="--gpu-memory"):
        parse_size(bad)


def test_demo_model_config_read_from_the_gguf_file():
    r = recipe_from_dict({"model": {"name_or_path": "demo:smollm2-135m-instruct"}, "data": {"train": "t"},
                          "output": {"dir": "x"}})
    e = estimate_for(r, 16 << 30)
    assert e.model_type == "llama" and e.lora_params == 4_884_480
    assert 134e6 < e.params < 135e6


# ---------------------------------------------------------------- CLI

@pytest.fixture
def recipe_file(tmp_path):
    tiny_config("llama", vocab_size=1000, hidden_size=256, intermediate_size=512).save_pretrained(tmp_path / "m")
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {{name_or_path: {tmp_path / 'm'}}}\ndata: {{train: t.jsonl, max_length: 256, "
                    "max_prompt_length: 64}\noutput: {dir: runs/x}\n")
    return path


def test_cli_prints_the_table(recipe_file, capsys):
    assert main(["estimate", str(recipe_file), "train.per_device_train_batch_size=2", "--gpu-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    for needle in ("weights", "adapters + grads + optimizer", "activations", "log-prob path", "overhead", "total",
                   "largest per_device_train_batch_size at max_length 256:", "2 pairs × max_length 256"):
        assert needle in out
    assert main(["estimate", str(recipe_file), "--json", "--gpu-memory", "8GiB", "--layout", "concatenated"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["gpu_memory"] == 8 << 30 and d["layout"] == "concatenated" and d["max_batch_size"] > 0
    # overrides may also follow the options
    args = ["estimate", str(recipe_file), "--json", "--gpu-memory", "8GiB", "train.per_device_train_batch_size=3"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["batch_size"] == 3


@pytest.mark.parametrize("args,needle", [(["--gpu-memory", "lots"], "--gpu-memory 'lots'"),
                                         (["--gpu-memory", "16"], "give a unit, e.g. 16GiB"),
                                         (["--gpu-memory", "8GiB", "--bogus"], "unrecognized arguments: --bogus"),
                                         (["--gpu-memory", "16", "GiB"], "as one word: --gpu-memory 16GiB"),
                                         ([], "not found")])
def test_cli_errors_are_one_line_exit_2(recipe_file, tmp_path, capsys, args, needle):
    path = str(recipe_file) if args else str(tmp_path / "missing.yaml")
    assert main(["estimate", path, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_unreachable_hub_id_is_a_clear_error():
    r = recipe_from_dict({"model": {"name_or_path": "no-such-org/no-such-model"}, "data": {"train": "t"},
                          "output": {"dir": "x"}})
    with pytest.raises(LoraDpoError, match="cannot read the config of 'no-such-org/no-such-model'"):
        estimate_for(r, 16 << 30)


def test_shipped_recipes_plan_offline_from_the_table_of_published_shapes(monkeypatch, capsys):
    """The hub unreachable (simulated): a model lora-dpo ships a recipe for is planned from its published config
    shapes, and the run says so; the numbers equal those from the config itself."""
    from pathlib import Path

    from transformers import AutoConfig

    from lora_dpo.known_models import KNOWN_CONFIGS, known_config
    from lora_dpo.recipe import load_recipe

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(AutoConfig, "from_pretrained", unreachable)
    path = Path(__file__).resolve().parents[1] / "recipes" / "llama-3.1-8b-instruct-ultrafeedback-t4.yaml"
    assert main(["estimate", str(path), "--gpu-memory", "16GiB", "--json"]) == 0
    captured = capsys.readouterr()
    assert "planning with its published shapes from lora-dpo's table" in captured.err  # said, on stderr:
    got = json.loads(captured.out)  # stdout is the JSON alone, so `--json | jq` works offline too
    r = load_recipe(path)
    want = estimate_for(r, 16 << 30, arch=Arch.from_config(known_config(r.model.name_or_path)))
    assert got["total"] == want.total and got["params"] == 8_030_261_248  # Llama-3.1-8B's published count
    assert set(KNOWN_CONFIGS) >= {load_recipe(p).model.name_or_path for p in path.parent.glob("*-t4.yaml")}


def test_planner_puts_2x2048_token_pairs_on_an_8b_model_under_12_gib():
    """The issue's memory target as the planner sees it (the GPU kit measures the real peak against this): Llama-3-8B
    shapes, one pair of a 1024-token prompt and two 1024-token completions, gradient checkpointing, packed rows."""
    from lora_dpo.known_models import known_config

    r = recipe_from_dict({"model": {"name_or_path": "meta-llama/Llama-3.1-8B-Instruct"},
                          "data": {"train": "t", "max_prompt_length": 1024, "max_length": 2048},
                          "train": {"per_device_train_batch_size": 1, "gradient_checkpointing": True},
                          "output": {"dir": "x"}})
    e = estimate_for(r, 80 << 30, arch=Arch.from_config(known_config(r.model.name_or_path)))
    assert e.rows == 1 and e.seq_len == 3072  # prompt once, both completions: prefix sharing
    assert e.allocated + e.overhead <= 12 << 30, e.allocated / 2**30
    concatenated = estimate_for(r, 80 << 30, layout="concatenated",
                                arch=Arch.from_config(known_config(r.model.name_or_path)))
    assert concatenated.activations > e.activations  # two rows of 2048: the prompt twice


def test_log_prob_chunk_is_the_one_training_uses():
    from lora_dpo.logps import DEFAULT_CHUNK

    assert est_lib.LOGPS_CHUNK == DEFAULT_CHUNK


def test_offloaded_embeddings_leave_the_gpu_unless_tied():
    """model.offload_embeddings takes the V·H table out of the GPU's weights (Llama-3-8B: 128,256 × 4,096 in bf16),
    not a table the LM head shares; when a recipe does not fit, the advice names it."""
    from lora_dpo.known_models import known_config

    def plan8b(gpu: int, **model) -> est_lib.Estimate:
        r = recipe_from_dict({"model": {"name_or_path": "meta-llama/Llama-3.1-8B-Instruct", **model},
                              "data": {"train": "t", "max_length": 1024},
                              "train": {"per_device_train_batch_size": 1, "gradient_checkpointing": True},
                              "output": {"dir": "x"}})
        return estimate_for(r, gpu, arch=Arch.from_config(known_config(r.model.name_or_path)))

    on, off = plan8b(8 << 30, offload_embeddings=True), plan8b(8 << 30)
    assert off.weights - on.weights == 128_256 * 4_096 * 2 and on.embeddings_on_cpu
    assert "embeddings on CPU" in format_table(on)
    assert not off.fits and on.fits  # an 8 GiB GPU: 1 pair of 1024 tokens fits only with the table on the CPU
    assert any(a.startswith("model.offload_embeddings=true") for a in off.advice)
    assert not any("offload_embeddings" in a for a in on.advice)
    tied = Arch.from_config(tiny_config("llama", tie_word_embeddings=True))
    r = recipe_from_dict({"model": {"name_or_path": "x", "offload_embeddings": True}, "data": {"train": "t"},
                          "output": {"dir": "x"}})
    assert not estimate_for(r, 1 << 30, arch=tied).embeddings_on_cpu


def test_offloaded_activations_leave_the_checkpointed_inputs_out_and_are_advised():
    on = plan(layout="prefix-shared", gradient_checkpointing=True)
    off = plan(layout="prefix-shared", gradient_checkpointing=True, offload_activations=True)
    rows, T = on.rows, on.seq_len
    # all layers' inputs but one: the input fetched back ahead of its layer's backward stays on the GPU
    assert on.activations - off.activations == (DEMO_LIKE.layers - 1) * rows * T * DEMO_LIKE.hidden * 2
    big = plan(on.total - (50 << 20), layout="prefix-shared", gradient_checkpointing=True)  # does not fit: advised
    assert not big.fits
    inputs = (DEMO_LIKE.layers - 1) * rows * T * DEMO_LIKE.hidden * 2  # but the one fetched ahead
    assert f"train.offload_activations=true: the {gib(inputs)} of layer inputs" in "\n".join(big.advice)
    assert not any("offload_activations" in a for a in on.advice)  # it fits: no advice


def test_the_readme_example_is_what_estimate_prints(monkeypatch, capsys):
    """README's "Will it fit?" block, regenerated from the planner: the figures there drifted twice before."""
    import re
    from pathlib import Path

    from transformers import AutoConfig

    def unreachable(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(AutoConfig, "from_pretrained", unreachable)  # planned from the published Llama-3.1-8B shapes
    root = Path(__file__).resolve().parents[1]
    block = re.search(r"\$ lora-dpo estimate recipe\.yaml --gpu-memory 24GiB --layout concatenated\n(.*?)```",
                      (root / "README.md").read_text(), re.S).group(1)
    assert main(["estimate", str(root / "recipes" / "llama-3.1-8b-instruct-orca-dpo-pairs-a100.yaml"),
                 "train.gradient_checkpointing=false", "train.gradient_checkpointing_layers=1.0",
                 "train.gradient_accumulation_steps=1", "train.per_device_train_batch_size=4", "data.max_length=1024",
                 "--gpu-memory", "24GiB", "--layout", "concatenated"]) == 0
    printed = capsys.readouterr().out
    for line in block.strip().splitlines():
        assert line in printed, line


# ---------------------------------------------------------------- audit fixes

@pytest.mark.parametrize("targets,quantized", [("all-linear", True), ("all-linear", False),
                                               (["q_proj", "v_proj"], True)])
def test_lora_dropout_formula_equals_what_autograd_saves(tmp_path, targets, quantized):
    """lora.lora_dropout > 0 in training mode (every shipped GPU recipe: 0.05): with the dropout folded into LoRA A
    (as lora-dpo attaches adapters) each targeted Linear keeps a 1-byte mask per input value; peft's own forward keeps
    a dropped copy of each input as well, far more. The formula must count what lora-dpo keeps."""
    from peft import LoraConfig, get_peft_model

    from lora_dpo.lora_dropout import fuse_lora_dropout

    config, base = _frozen_base(tmp_path, "llama", quantized)
    model = get_peft_model(base, LoraConfig(r=8, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM"))
    model.train()  # as training runs: dropout on
    rows, T = 3, 37
    ids = torch.randint(0, config.vocab_size, (rows, T), generator=torch.Generator().manual_seed(0))
    peft_kept = _saved_bytes(model, ids, torch.ones(rows, T, dtype=torch.long))
    assert fuse_lora_dropout(model) > 0
    measured = _saved_bytes(model, ids, torch.ones(rows, T, dtype=torch.long))
    arch = Arch.from_config(config)
    layer = lambda **k: layer_activation_bytes(arch, rows, T, arch.lora_targets(targets), 8, 4,  # noqa: E731
                                               masked=False, **k)
    assert abs(arch.layers * layer(dropout=True) - measured) / measured < 0.03, (layer(dropout=True), measured)
    plain = arch.layers * layer()
    assert plain < measured and peft_kept - plain > 4 * (measured - plain)  # fp32: masks of 1 byte, not 4 + 1


def test_planner_counts_lora_dropout():
    def with_dropout(p: float) -> est_lib.Estimate:
        r = recipe_from_dict({**recipe().to_dict(), "lora": {"lora_dropout": p}})
        return estimate_for(r, 16 << 30, layout="concatenated", reference="live", arch=DEMO_LIKE)

    off, on = with_dropout(0.0), with_dropout(0.05)
    assert on.weights == off.weights and on.adapters == off.adapters
    ins = sum(i for i, _ in DEMO_LIKE.linears().values())  # all-linear: every Linear's input, a 1-byte mask each
    # every layer saves it, and one layer more: the transient (its gradients in backward)
    assert on.activations - off.activations == (DEMO_LIKE.layers + 1) * on.rows * on.seq_len * 1 * ins
    assert on.max_batch_size < off.max_batch_size
    r = recipe_from_dict({**recipe(per_device_train_batch_size=64).to_dict(), "lora": {"lora_dropout": 0.05}})
    tight = estimate_for(r, 4 << 30, layout="concatenated", reference="live", arch=DEMO_LIKE)
    assert not tight.fits and f"lora.lora_dropout=0: activations {gib(tight.activations)} → " in "\n".join(tight.advice)


def test_auto_checkpointing_plans_the_largest_batch_and_length_with_the_layers_auto_would_pick():
    """With gradient_checkpointing_layers auto, a larger batch makes auto recompute more layers (at training time):
    the largest batch / max_length must not be searched with the layer count auto chose for the recipe's batch."""
    full = plan(gradient_checkpointing=True)  # all layers recompute
    gpu = int(plan(gradient_checkpointing=True, gradient_checkpointing_layers=0.5).total / (1 - est_lib.AUTO_SPARE))
    auto = plan(gpu=gpu, gradient_checkpointing=True, gradient_checkpointing_layers="auto")
    assert auto.checkpointed_layers < DEMO_LIKE.layers
    every = plan(gpu=gpu, gradient_checkpointing=True)
    assert auto.max_batch_size == every.max_batch_size > full.batch_size
    assert auto.max_max_length == every.max_max_length
    bigger = plan(gpu=gpu, gradient_checkpointing=True, gradient_checkpointing_layers="auto",
                  per_device_train_batch_size=auto.max_batch_size)  # applied: it fits, auto recomputing more
    assert bigger.fits and bigger.checkpointed_layers >= auto.checkpointed_layers
    assert not plan(gpu=gpu, gradient_checkpointing=True, gradient_checkpointing_layers="auto",
                    per_device_train_batch_size=auto.max_batch_size + 1).fits


def test_the_advised_share_of_layers_is_the_count_it_names():
    """A share printed with 3 digits can round up past a layer (7/32 → 0.219 → 8 layers): the advised share must
    recompute exactly the layers the advice names."""
    from lora_dpo.recipe import checkpointed_layers

    for L in range(1, 129):
        for k in range(1, L + 1):
            assert checkpointed_layers(True, float(est_lib.share_of_layers(k, L)), L) == k, (k, L)
    assert est_lib.share_of_layers(16, 32) == "0.5" and est_lib.share_of_layers(32, 32) == "1"


def test_a_share_that_does_not_fit_is_advised_up_to_the_fewest_layers_that_do():
    L = DEMO_LIKE.layers
    low = plan(gradient_checkpointing=True, gradient_checkpointing_layers=3 / L)
    full = plan(gradient_checkpointing=True)
    gpu = (low.total + full.total) // 2
    e = plan(gpu=gpu, gradient_checkpointing=True, gradient_checkpointing_layers=3 / L)
    assert not e.fits
    line = next(a for a in e.advice if a.startswith("train.gradient_checkpointing_layers="))
    share = float(line.split("=")[1].split(":")[0])
    applied = plan(gpu=gpu, gradient_checkpointing=True, gradient_checkpointing_layers=share)
    assert applied.fits and f"{applied.checkpointed_layers} of {L} layers recompute instead of 3" in line
    assert not plan(gpu=gpu, gradient_checkpointing=True,
                    gradient_checkpointing_layers=(applied.checkpointed_layers - 1) / L).fits  # the fewest


def _with(r, **data):
    raw = r.to_dict()
    return recipe_from_dict({**raw, "data": {**raw["data"], **data}})


def test_the_largest_max_length_is_one_the_recipe_accepts_and_it_fits():
    """data.max_prompt_length must stay below data.max_length: a "largest max_length" at or under it cannot be
    applied (the recipe is refused), so the search stays above it and says when nothing there fits."""
    base = _with(recipe(), max_prompt_length=256)
    at = lambda r, gpu: estimate_for(r, gpu, layout="concatenated", reference="live", arch=DEMO_LIKE)  # noqa: E731
    gpu = at(_with(base, max_length=300), 1 << 40).total  # 300 tokens just fit
    e = at(base, gpu)
    assert e.max_max_length == 300
    assert at(_with(base, max_length=e.max_max_length), gpu).fits
    tight = at(base, at(_with(base, max_length=257), 1 << 40).total - 1)  # not even 257 (> 256) fits
    assert tight.max_max_length == 0
    assert "largest max_length at per_device_train_batch_size 4: none above data.max_prompt_length 256" in \
        format_table(tight)
    with pytest.raises(LoraDpoError, match="max_prompt_length"):  # why: 256 or less is refused
        _with(base, max_length=256)


def test_when_no_pair_fits_the_advice_is_an_override_that_fits():
    """Every advice line reads `try KEY=VALUE: why` (never "try even one pair …"), and the one for a batch where not
    even one pair fits, applied, fits."""
    r = _with(recipe(per_device_train_batch_size=2), max_length=2048, max_prompt_length=256)
    at = lambda r, gpu: estimate_for(r, gpu, layout="concatenated", reference="live", arch=DEMO_LIKE)  # noqa: E731
    gpu = at(_with(recipe(per_device_train_batch_size=1), max_length=1024, max_prompt_length=256), 1 << 40).total
    e = at(r, gpu)
    assert not e.fits and e.max_batch_size == 0
    table = format_table(e)
    assert "try even" not in table
    last = e.advice[-1]
    assert last.startswith(("data.max_length=", "train.per_device_train_batch_size=1 with data.max_length=")), last
    applied = _with(r, max_length=int(last.split("data.max_length=")[1].split(":")[0]))
    if last.startswith("train."):
        applied.train.per_device_train_batch_size = 1
    assert at(applied, gpu).fits
    nothing = at(r, est_lib.OVERHEAD_BYTES)
    assert nothing.advice[-1].startswith("a GPU with more memory: even one pair at data.max_length=257")


def test_one_pair_and_one_row_are_singular():
    e = plan(layout="shared", per_device_train_batch_size=1)
    assert "micro-batch: 1 pair × max_length 512 = 1 row × 768 tokens" in format_table(e)
    assert "micro-batch: 4 pairs × max_length 512 = 8 rows × 512 tokens" in format_table(plan())


def test_known_hub_ids_match_case_insensitively_as_the_hub_does():
    from lora_dpo.known_models import known_config

    assert known_config("meta-llama/llama-3.1-8b-instruct").vocab_size == 128_256
    assert known_config("Qwen/Qwen2.5-7B-Instruct").hidden_size == 3584
    assert known_config("meta-llama/Llama-3.1-8B") is None  # the base model is another model


def test_a_cpu_recipe_is_not_planned_as_a_gpu_run(recipe_file, capsys):
    assert main(["estimate", str(recipe_file), "train.device=cpu", "--gpu-memory", "8GiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.device: cpu" in err and "train.device=auto" in err and len(err.splitlines()) == 1
    assert main(["estimate", str(recipe_file), "train.device=auto", "--gpu-memory", "8GiB"]) == 0


def test_a_pair_longer_than_the_sliding_window_is_planned_concatenated_as_it_trains():
    """batching.resolve_layout trains a model whose sliding window is shorter than a [prompt | chosen | rejected] row
    in the concatenated layout; the plan must be that layout's, not the shared one's."""
    from lora_dpo.known_models import known_config

    windowed = Arch.from_config(tiny_config("mistral", sliding_window=600))
    assert windowed.sliding_window == 600
    r = _with(recipe(), max_length=512, max_prompt_length=256)  # shared rows: 256 + 2 × 256 = 768 > 600
    e = estimate_for(r, 16 << 30, layout="shared", reference="live", arch=windowed)
    concatenated = estimate_for(r, 16 << 30, layout="concatenated", reference="live", arch=windowed)
    assert (e.layout, e.rows, e.seq_len, e.total) == ("concatenated", 8, 512, concatenated.total)
    assert "concatenated layout: a pair outgrows the model's 600-token sliding window" in format_table(e)
    short = estimate_for(_with(r, max_length=400), 16 << 30, layout="shared", reference="live", arch=windowed)
    assert short.layout == "prefix-shared" and short.seq_len == 544 and short.sliding_window is None
    off = Arch.from_config(tiny_config("qwen2", sliding_window=600, use_sliding_window=False))
    assert off.sliding_window is None  # configured but off: shared rows
    # Mistral-7B-Instruct-v0.3 publishes sliding_window null (transformers' MistralConfig defaults to 4096)
    assert Arch.from_config(known_config("mistralai/Mistral-7B-Instruct-v0.3")).sliding_window is None


def test_checkpointing_advice_plans_the_recipes_share_of_the_layers():
    """train.gradient_checkpointing=true, applied to a recipe that sets gradient_checkpointing_layers 0.5, recomputes
    half the layers: the advice's figures must be that run's, not all layers'."""
    e = plan(gpu=3 << 30, gradient_checkpointing_layers=0.5)
    half = plan(gpu=3 << 30, gradient_checkpointing=True, gradient_checkpointing_layers=0.5)
    line = next(a for a in e.advice if a.startswith("train.gradient_checkpointing=true:"))
    assert f"→ {gib(half.activations)}, largest batch {e.max_batch_size} → {half.max_batch_size} " in line


def test_training_plans_auto_checkpointing_for_the_longest_rows_its_pairs_make():
    """A short prompt keeps answers of up to max_length − prompt tokens each, so its row is longer than the recipe's
    worst case (prompts of max_prompt_length); for_data plans the pairs' real longest row and completions."""
    from lora_dpo.data import Pair
    from lora_dpo.estimate import for_data
    from lora_dpo.memory_model import shapes

    recipe = recipe_from_dict({"model": {"name_or_path": "x"}, "output": {"dir": "x"},
                               "data": {"train": "t.jsonl", "max_length": 64, "max_prompt_length": 32},
                               "train": {"per_device_train_batch_size": 1}})
    arch = Arch.from_config(tiny_config("llama", max_position_embeddings=4096))
    short_prompt = Pair([1], list(range(63)), list(range(63)), 0)   # 1 + 63 + 63 = 127 tokens in one row
    long_prompt = Pair(list(range(32)), list(range(10)), list(range(5)), 1)
    assert estimate_for(recipe, 80 * 2**30, arch=arch).seq_len == 32 + 2 * 32  # the recipe's "worst case": 96
    for pairs, row, scored in (([short_prompt, long_prompt], 127, 126), ([long_prompt], 47, 15)):
        planned = for_data(recipe, pairs)
        rows, T, N = shapes("prefix-shared", 1, planned.data.max_length, planned.data.max_prompt_length)
        assert T == row and scored <= N <= scored + 1  # completions rounded up to an even count
        assert estimate_for(planned, 80 * 2**30, arch=arch).seq_len == row
    assert for_data(recipe, []) is recipe


def test_the_estimate_says_what_rows_of_short_prompts_and_long_answers_need():
    """Truncation keeps max_length − prompt tokens of each answer, so a short prompt makes a row longer than the
    planned one (prompts of max_prompt_length): the estimate prints the peak of those rows too, with the layers auto
    would recompute for them."""
    raw = {"model": {"name_or_path": "org/model"}, "output": {"dir": "x"},
           "data": {"train": "t.jsonl", "max_length": 1024, "max_prompt_length": 512},
           "train": {"per_device_train_batch_size": 4, "gradient_checkpointing": True,
                     "gradient_checkpointing_layers": "auto"}}
    est = estimate_for(recipe_from_dict(raw), 24 << 30, arch=DEMO_LIKE, short_prompt_rows=True)
    assert estimate_for(recipe_from_dict(raw), 24 << 30, arch=DEMO_LIKE).short_prompt_total is None  # not asked
    assert est.seq_len == 512 + 2 * 512 and est.short_prompt_seq_len == 1 + 2 * 1023
    assert est.short_prompt_total > est.total and est.short_prompt_layers >= est.checkpointed_layers
    assert "rows of up to 2047 tokens predict" in format_table(est)
    raw["data"]["max_prompt_length"] = None  # prompts not cut: the plan is already for 1-token prompts
    assert estimate_for(recipe_from_dict(raw), 24 << 30, arch=DEMO_LIKE, short_prompt_rows=True).short_prompt_total \
        is None


def test_data_flag_plans_for_the_training_pairs_longest_rows(recipe_dict, tmp_path, capsys):
    """`lora-dpo estimate R.yaml --data` tokenises the training data (no weights) and plans micro-batches of its
    longest pair, and the max_length lines, which would speak of a stand-in length, give way to one for the pairs."""
    import yaml

    from lora_dpo.estimate import training_pairs

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict))
    pairs = training_pairs(recipe_from_dict(recipe_dict))
    longest = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert main(["estimate", str(path), "--data", "--gpu-memory", "8GiB", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["data_pairs"], got["data_longest"], got["seq_len"]) == (len(pairs), longest, longest)
    assert longest < recipe_from_dict(recipe_dict).data.max_length  # the data's rows are shorter than the plan's
    assert main(["estimate", str(path), "--data", "--gpu-memory", "8GiB"]) == 0
    table = capsys.readouterr().out
    assert f"the longest of the {len(pairs)} training pairs ({longest} tokens)" in table
    assert "largest per_device_train_batch_size for these pairs:" in table and "largest max_length" not in table


def test_activation_formula_holds_for_a_16_bit_base_under_autocast(tmp_path):
    """A bf16 base under bf16 autocast with lora-dpo's fused LoRA forward: what autograd keeps is the formula's
    per-token bytes plus autocast's bf16 casts of the LoRA weights (a fixed size: r·(in + out)·2 bytes per adapted
    Linear). peft's own forward keeps more — its 16-bit layers cast each input to fp32 and autocast casts it back, a
    copy per adapted Linear — which is what the fused forward removes (lora_dpo/lora_forward.py)."""
    from peft import LoraConfig, get_peft_model

    from lora_dpo.lora_forward import fuse_lora_forward

    config, base = _frozen_base(tmp_path, "llama", False)
    model = get_peft_model(base.to(torch.bfloat16), LoraConfig(r=8, target_modules="all-linear",
                                                               task_type="CAUSAL_LM"))
    rows, T = 3, 37
    ids = torch.randint(0, config.vocab_size, (rows, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(rows, T, dtype=torch.long)
    arch = Arch.from_config(config)
    predicted = arch.layers * layer_activation_bytes(arch, rows, T, arch.lora_targets("all-linear"), 8, 2,
                                                     masked=False)
    casts = sum(p.numel() * 2 for n, p in model.named_parameters() if "lora_" in n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_kept = _saved_bytes(model, ids, mask)
        assert fuse_lora_forward(model) == 7 * arch.layers
        fused_kept = _saved_bytes(model, ids, mask)
    assert abs(fused_kept - casts - predicted) / predicted < 0.01, (fused_kept, casts, predicted)
    assert peft_kept - casts > 1.15 * predicted  # peft's forward: the copies the formula does not count
