"""`lora-dpo eval RUN_DIR`: held-out metrics of a finished run, reference vs policy answers, eval.json."""

from __future__ import annotations

import json
import subprocess
import sys

from lora_dpo import evaluate, train
from lora_dpo.recipe import recipe_from_dict


def test_eval_of_a_finished_run(recipe_dict, tmp_path):
    recipe_dict["train"].update(max_steps=3, learning_rate=5e-3)
    recipe_dict["evaluation"] = {"generations": 2, "max_new_tokens": 4, "behaviour_regex": r"\d"}
    run = train(recipe_from_dict(recipe_dict))
    (run.output_dir / "eval.json").unlink()
    result = evaluate(run.output_dir)
    saved = json.loads((run.output_dir / "eval.json").read_text())
    assert saved["pairs"] == 8 and len(saved["generations"]) == 8  # every behaviour prompt (≤ 8 here)
    assert saved["after"]["eval/rewards/margins"] == result["after"]["eval/rewards/margins"]
    assert saved["after"]["eval/loss"] > 0 and 0 <= saved["after"]["eval/rewards/accuracies"] <= 1
    assert saved["before"]["behaviour_rate"] is not None
    # the eval numbers agree with the ones the training run logged at its end
    assert abs(saved["after"]["eval/rewards/margins"] - run.eval_metrics["eval/rewards/margins"]) < 1e-5
    res = subprocess.run([sys.executable, "-m", "lora_dpo", "eval", str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "not a finished run directory" in res.stderr
