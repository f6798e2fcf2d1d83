"""The README's quickstart path on the demo model (SmolLM2-135M-Instruct from its GGUF file), a handful of steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lora_dpo import load_recipe, train

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_recipe_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository root, as the README runs it
    recipe = load_recipe("recipes/quickstart.yaml", [
        f"output.dir={tmp_path / 'run'}", "train.max_steps=3", "train.logging_steps=1", "train.eval_steps=2",
        "evaluation.behaviour_prompts=4", "evaluation.generations=2", "evaluation.max_new_tokens=8"])
    assert recipe.model.name_or_path == "demo:smollm2-135m-instruct"
    run = train(recipe)
    printed = capsys.readouterr().out
    # the recipe adds the RPO term (NLL of the chosen answer) to DPO's ln 2 at step 0
    assert run.step0_loss > math.log(2) and "= ln 2 + RPO NLL" in printed and "✓, margins 0 ✓" in printed
    assert "400 rows read, 400 pairs kept, 0 dropped" in printed
    assert "held-out, before training: reward accuracy 0.50, margin +0.000" in printed
    assert "held-out, after training (policy):" in printed and printed.count("  reference: ") == 2
    report = json.loads((run.output_dir / "eval.json").read_text())
    assert report["before"]["behaviour_rate"] == 0.0  # the base model never opens with "Ahoy"
    assert report["after"]["eval/rewards/margins"] > 0  # three steps already push the margin the right way
    assert len(report["generations"]) == 4
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()
    # the main job ends with the export the recipe asks for: a merged model, checked against the policy
    parity = json.loads((run.output_dir / "export" / "merged-dequantized" / "parity.json").read_text())
    assert parity["format"] == "merged" and parity["max_abs_logp_diff"] < 0.5
    assert (run.output_dir / "export" / "merged-dequantized" / "config.json").is_file()
