"""lora-dpo: DPO on LoRA adapters over a 4-bit base, one copy of the weights.

    from lora_dpo import load_recipe, train, evaluate
    run = train(load_recipe("recipes/quickstart.yaml", ["train.max_steps=20"]))
    evaluate(run.output_dir)

The public names share theirs with the modules that implement them (`lora_dpo/train.py` …): the modules are
imported first, then the names are bound to the functions, so `lora_dpo.train` is always the function. Inside the
package, import from the modules (`from lora_dpo.train import run`), never `from lora_dpo import train`.
"""

from lora_dpo.errors import LoraDpoError
from lora_dpo.evaluate import evaluate as _evaluate
from lora_dpo.export import export as _export
from lora_dpo.recipe import Recipe, load_recipe
from lora_dpo.train import RunResult
from lora_dpo.train import run as _run

__all__ = ["LoraDpoError", "Recipe", "RunResult", "evaluate", "export", "load_recipe", "train"]
__version__ = "0.1.0"


def train(recipe: Recipe) -> RunResult:
    """Train from a validated recipe; → RunResult (output_dir, adapter_dir, history, eval_metrics)."""
    return _run(recipe)


def evaluate(run_dir, data: str | None = None, generations: int | None = None, reward_model: str | None = None,
             reward_prompts: int | None = None) -> dict:
    """Held-out metrics, a KL estimate and reference-vs-policy answers of a finished run, with `reward_model` (a
    sequence-classification model) its win rate; → dict (also written to eval.json; report.html is refreshed)."""
    return _evaluate(run_dir, data=data, generations=generations, reward_model=reward_model,
                     reward_prompts=reward_prompts)


def export(run_dir, format: str = "adapter", base: str = "dequantized", dtype: str = "bf16", out=None,
           force: bool = False, gguf_type: str = "bf16", data: str | None = None):
    """Write the run's adapter, a merged model or a GGUF file (format "adapter" | "merged" | "gguf"), with a
    parity.json against the trained policy; → the export directory (pathlib.Path)."""
    return _export(run_dir, format=format, base=base, dtype=dtype, out=out, force=force, gguf_type=gguf_type,
                   data=data)
