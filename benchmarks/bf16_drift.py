"""How far rounding alone moves the first losses: lora-dpo against itself, the packed layout against TRL's
concatenated one (the same log-probs in exact arithmetic, tested), in fp32 and in bf16. The quickstart recipe's model
and data with plain DPO (β 0.1, no RPO), lr 1e-4, 4 pairs per step, 4 steps; prints the losses of each setting and
the largest difference per precision. Prints; asserts nothing.

    python3 benchmarks/bf16_drift.py
"""

from __future__ import annotations

import argparse
import json
import tempfile

import yaml

from lora_dpo.recipe import recipe_from_dict
from lora_dpo.train import run


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with open("recipes/quickstart.yaml") as f:
        base = yaml.safe_load(f)
    losses = {}
    for precision in ("fp32", "bf16"):
        for layout in ("packed", "concatenated"):
            d = json.loads(json.dumps(base))
            d["dpo"] = {"beta": 0.1, "loss_type": "sigmoid"}
            d["data"].pop("eval", None)
            d["train"].update({"max_steps": 4, "learning_rate": 1e-4, "precision": precision, "layout": layout,
                               "logging_steps": 1})
            d["evaluation"] = {"generations": 0}
            with tempfile.TemporaryDirectory() as tmp:
                d["output"] = {"dir": f"{tmp}/run"}
                losses[precision, layout] = [h["loss"] for h in run(recipe_from_dict(d)).history]
    print("\n| precision | packed | concatenated | max Δ |\n|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        a, b = losses[precision, "packed"], losses[precision, "concatenated"]
        print(f"| {precision} | {', '.join(f'{x:.6f}' for x in a)} | {', '.join(f'{x:.6f}' for x in b)} | "
              f"{max(abs(x - y) for x, y in zip(a, b)):.1e} |")


if __name__ == "__main__":
    main()
