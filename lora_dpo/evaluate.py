"""Held-out metrics of a finished run and greedy generations of policy and reference side by side."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_dpo import batching
from lora_dpo import data as data_lib
from lora_dpo import model as model_lib
from lora_dpo.errors import LoraDpoError
from lora_dpo.objective import MetricMeter, dpo_forward
from lora_dpo.recipe import DpoConfig, load_recipe


@torch.no_grad()
def evaluate_pairs(model, pairs: list[data_lib.Pair], cfg: DpoConfig, batch_size: int, pad_id: int,
                   device: torch.device) -> dict:
    """Held-out metrics under the `eval/` names (adapter on vs off, no dropout)."""
    was_training = model.training
    model.eval()
    meter = MetricMeter()
    for chunk in batching.eval_batches(pairs, batch_size):
        loss, metrics = dpo_forward(model, batching.collate(chunk, pad_id).to(device), cfg)
        meter.add(loss * len(chunk), metrics)
    model.train(was_training)
    result = meter.result("eval/")
    result["eval/loss"] = meter.loss_sum / max(meter.pairs, 1)  # loss weighted per pair, not per batch
    return result


def load_run(run_dir: str | Path):
    """→ (recipe, PeftModel with the run's adapter, tokenizer, device)."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "adapter").is_dir():
        raise LoraDpoError(f"'{run_dir}' is not a finished run directory (needs recipe.yaml and adapter/)")
    recipe = load_recipe(run_dir / "recipe.yaml")
    device, dtype = model_lib.device_and_dtype(recipe.train.precision, recipe.train.device)
    tokenizer = model_lib.load_tokenizer(recipe.model)
    base = model_lib.load_base(recipe.model, recipe.quantization, dtype, device)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    model.eval()
    return recipe, model, tokenizer, device


def prompt_text_ids(row: dict, tokenizer, system_prompt: str | None = None) -> list[int]:
    """The prompt of a row as the model sees it at inference (chat template + generation prompt)."""
    p, _, _, _ = data_lib.tokenize_row(row, tokenizer, system_prompt)
    return p


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int = 32, reference: bool = False) -> str:
    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    ctx = model_lib.reference_mode(model) if reference else torch.no_grad()
    with ctx:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True).strip()


def side_by_side(model, tokenizer, rows: list[dict], system_prompt: str | None = None,
                 max_new_tokens: int = 32) -> list[dict]:
    out = []
    for row in rows:
        ids = prompt_text_ids(row, tokenizer, system_prompt)
        out.append({"prompt": row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"],
                    "reference": generate(model, tokenizer, ids, max_new_tokens, reference=True),
                    "policy": generate(model, tokenizer, ids, max_new_tokens)})
    return out


def evaluate(run_dir: str | Path, data: str | None = None, generations: int = 4) -> dict:
    run_dir = Path(run_dir)
    recipe, model, tokenizer, device = load_run(run_dir)
    path = data or recipe.data.eval
    if not path:
        raise LoraDpoError(f"run '{run_dir}' has no data.eval; pass --data FILE.jsonl")
    rows = data_lib.read_rows(path, "--data" if data else "data.eval")
    pairs, report = data_lib.tokenize_rows(rows, tokenizer, recipe.data, source=path)
    for line in report.lines():
        print(line)
    metrics = evaluate_pairs(model, pairs, recipe.dpo, recipe.train.per_device_eval_batch_size,
                             tokenizer.pad_token_id, device)
    gens = side_by_side(model, tokenizer, [rows[p.index] for p in pairs[:generations]], recipe.data.system_prompt)
    result = {"data": path, "pairs": len(pairs), **metrics, "generations": gens}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print("held-out: " + ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in metrics.items()))
    for g in gens:
        print(f"\nprompt:    {g['prompt']}\nreference: {g['reference']}\npolicy:    {g['policy']}")
    return result
