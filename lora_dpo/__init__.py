"""lora-dpo: DPO on LoRA adapters over a 4-bit base, one copy of the weights.

    from lora_dpo import load_recipe, train
    run = train(load_recipe("recipes/quickstart.yaml", ["train.max_steps=20"]))
"""

from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import Recipe, load_recipe

__all__ = ["LoraDpoError", "Recipe", "evaluate", "load_recipe", "train"]
__version__ = "0.1.0"


def train(recipe: Recipe):
    """Train from a validated recipe; → RunResult (output_dir, adapter_dir, history, eval_metrics)."""
    from lora_dpo.train import run

    return run(recipe)


def evaluate(run_dir, data=None, generations: int = 4):
    """Held-out metrics and policy-vs-reference generations of a finished run; → dict (also eval.json)."""
    from lora_dpo.evaluate import evaluate as _evaluate

    return _evaluate(run_dir, data=data, generations=generations)
