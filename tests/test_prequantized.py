"""Checkpoints stored already quantized by bitsandbytes (lora_dpo/prequantized.py): they train, evaluate and export
like the full-precision model they came from; recipe keys they make impossible fail before any weight loads; the
run's compute dtype wins over the one the checkpoint was saved with."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lora_dpo import model as M
from lora_dpo import prequantized, train
from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import ModelConfig, QuantizationConfig, recipe_from_dict

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prequantized_dir(tiny_model_dir, tokenizer, tmp_path_factory) -> Path:
    """The tiny model quantized to NF4 (double quantization) and saved, its config naming float16 as compute dtype
    — as hub checkpoints saved for fp16 GPUs do."""
    base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.float32, CPU)
    out = tmp_path_factory.mktemp("prequantized") / "model"
    base.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    config["quantization_config"]["bnb_4bit_compute_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(config))
    return out


def _linear4bit(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_loads_as_stored_computes_in_the_runs_dtype_and_equals_the_model_it_came_from(prequantized_dir,
                                                                                    tiny_model_dir):
    fresh = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.float32, CPU)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stored = M.load_base(ModelConfig(name_or_path=str(prequantized_dir)), QuantizationConfig(), torch.float32, CPU)
    assert not [w for w in caught if "quantization_config" in str(w.message)]  # nothing passed that it ignores
    layers = _linear4bit(stored)
    assert layers and all(m.compute_dtype == torch.float32 for m in layers)  # not the checkpoint's float16
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert torch.equal(stored(ids).logits, fresh(ids).logits)


def test_a_run_on_a_prequantized_checkpoint_trains_and_exports(prequantized_dir, recipe_dict, tmp_path, capsys):
    from lora_dpo.export import export

    recipe_dict["model"]["name_or_path"] = str(prequantized_dir)
    recipe_dict["data"].pop("eval")
    recipe_dict["train"]["max_steps"] = 2
    result = train(recipe_from_dict(recipe_dict))
    out = capsys.readouterr().out
    assert f"loading {prequantized_dir} (4-bit nf4, stored so, fp32 compute)" in out and "note:" not in out
    assert abs(result.step0_loss - 0.6931472) < 1e-4
    merged = export(result.output_dir, format="merged", dtype="fp32", out=tmp_path / "merged")
    parity = json.loads((merged / "parity.json").read_text())
    assert parity["max_abs_logp_diff"] < 1e-4 and parity["lora_deltas_merged"] > 0
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    with pytest.raises(LoraDpoError, match="--base original: .* stored quantized"):
        export(result.output_dir, format="merged", base="original", out=tmp_path / "original")
    assert not (tmp_path / "original").exists()


def test_recipe_keys_a_stored_checkpoint_makes_impossible_fail_before_loading(prequantized_dir, recipe_dict,
                                                                              tmp_path):
    recipe_dict["model"]["name_or_path"] = str(prequantized_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict))
    run = subprocess.run([sys.executable, "-m", "lora_dpo", str(recipe), "quantization.load_in_4bit=false"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert "quantization.load_in_4bit: false" in line and "stored in 4 bit" in line and "load_in_4bit: true" in line
    assert not Path(recipe_dict["output"]["dir"]).exists()
    est = subprocess.run([sys.executable, "-m", "lora_dpo", "estimate", str(recipe), "quantization.load_in_4bit=false"],
                         capture_output=True, text=True)
    assert est.returncode == 2 and "stored in 4 bit" in est.stderr and "Traceback" not in est.stderr


def test_check_says_what_the_stored_weights_fix_and_refuses_what_they_cannot_do():
    nf4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
           "bnb_4bit_use_double_quant": True}
    assert prequantized.check("m", None, QuantizationConfig()) == []
    assert prequantized.check("m", nf4, QuantizationConfig()) == []
    notes = prequantized.check("m", {**nf4, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False},
                               QuantizationConfig())
    assert notes == ["quantization.bnb_4bit_quant_type (nf4) does not apply: 'm' is stored as fp4",
                     "quantization.bnb_4bit_use_double_quant (true) does not apply: 'm' is stored without double "
                     "quantization"]
    assert prequantized.quant_type({**nf4, "bnb_4bit_quant_type": "fp4"}, QuantizationConfig()) == "fp4"
    with pytest.raises(LoraDpoError, match=r"quantization.load_in_8bit: true: 'm' is stored in 4 bit"):
        prequantized.check("m", nf4, QuantizationConfig(load_in_4bit=False, load_in_8bit=True))
    eight = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    assert prequantized.check("m", eight, QuantizationConfig(load_in_4bit=False, load_in_8bit=True)) == []
    with pytest.raises(LoraDpoError, match="stored in 8 bit .* set quantization.load_in_8bit: true and "
                                           "quantization.load_in_4bit: false"):
        prequantized.check("m", eight, QuantizationConfig())
    with pytest.raises(LoraDpoError, match="model.name_or_path: 'm' is stored quantized with gptq"):
        prequantized.check("m", {"quant_method": "gptq", "bits": 4}, QuantizationConfig())


def test_estimate_plans_a_stored_checkpoint_as_stored(recipe_dict):
    """A checkpoint stored without double quantization weighs 0.4 bit per weight more than the recipe's default
    (double quantization on) would plan: the planner takes the stored settings."""
    from lora_dpo.estimate import as_stored, estimate_for
    from lora_dpo.memory_model import Arch

    recipe = recipe_from_dict(recipe_dict)
    stored = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
              "bnb_4bit_use_double_quant": False}
    planned = as_stored(recipe, stored)
    assert planned.quantization.bnb_4bit_use_double_quant is False and as_stored(recipe, None) is recipe
    recipe_dict["quantization"] = {"bnb_4bit_use_double_quant": False}
    arch = Arch(model_type="llama", vocab=128256, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8,
                head_dim=128, tied=False)
    single = estimate_for(recipe_from_dict(recipe_dict), 16 << 30, arch=arch)
    double = estimate_for(recipe, 16 << 30, arch=arch)
    assert estimate_for(planned, 16 << 30, arch=arch).weights == single.weights > double.weights
