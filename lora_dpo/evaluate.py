"""Held-out metrics of a finished run and greedy generations of policy and reference side by side."""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
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
                   device: torch.device, ties: bool = False) -> dict:
    """Held-out metrics under the `eval/` names (adapter on vs off, no dropout); `ties` adds the share of pairs
    whose margin is exactly 0."""
    was_training = model.training
    model.eval()
    meter = MetricMeter()
    for chunk in batching.eval_batches(pairs, batch_size):
        loss, metrics = dpo_forward(model, batching.collate(chunk, pad_id).to(device), cfg)
        if ties:
            metrics["ties"] = (metrics["rewards/margins"] == 0).float()
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


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 32, reference: bool = False,
             batch_size: int = 16) -> list[str]:
    """Greedy answers for tokenised prompts, batched with left padding; `reference` switches the adapter off."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers = []
    ctx = model_lib.reference_mode if reference else _no_grad
    with ctx(model):
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i: i + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, p in enumerate(chunk):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            answers += [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    model.train(was_training)
    return answers


@contextlib.contextmanager
def _no_grad(model):
    with torch.no_grad():
        yield model


@dataclass
class Snapshot:
    """Held-out numbers and greedy answers of one model state (the reference before training, the policy after)."""
    metrics: dict | None  # None for the reference alone: no policy to compare it with
    answers: list[str]
    behaviour_rate: float | None
    strict: dict | None = None  # the same metrics with TRL's accuracy convention (ties count as wrong)

    def summary(self) -> str:
        m = self.metrics
        parts = [] if m is None else [f"reward accuracy {m['eval/rewards/accuracies']:.2f}",
                                      f"margin {m['eval/rewards/margins']:+.3f}", f"loss {m['eval/loss']:.4f}"]
        if self.behaviour_rate is not None:
            parts.append(f"behaviour rate {self.behaviour_rate:.0%}")
        return ", ".join(parts)


def snapshot(model, tokenizer, pairs: list, recipe, device, reference: bool = False) -> Snapshot:
    """Held-out metrics (policy vs reference) and greedy answers on the first held-out prompts (of the reference
    alone, without metrics, when `reference`).

    Before training the policy IS the reference, so every reward is 0 and every pair a tie; ties count as half a
    correct ranking here (and as wrong in `eval/rewards/accuracies`, TRL's convention), so 'before' reads as chance.
    """
    ev = recipe.evaluation
    metrics = strict = None
    if not reference:
        strict = evaluate_pairs(model, pairs, recipe.dpo, recipe.train.per_device_eval_batch_size,
                                tokenizer.pad_token_id, device, ties=True)
        ties = strict.pop("eval/ties")
        metrics = {**strict, "eval/rewards/accuracies": strict["eval/rewards/accuracies"] + 0.5 * ties}
    n = max(ev.generations, ev.behaviour_prompts if ev.behaviour_regex else 0)
    chosen = pairs[:n]
    answers = generate(model, tokenizer, [p.prompt_ids for p in chosen], ev.max_new_tokens, reference=reference)
    rate = None
    if ev.behaviour_regex:
        pattern = re.compile(ev.behaviour_regex)
        rate = sum(bool(pattern.search(a)) for a in answers) / max(len(answers), 1)
    return Snapshot(metrics, answers, rate, strict)


def print_before_after(before: Snapshot, after: Snapshot, rows: list[dict], pairs: list, n: int) -> None:
    print(f"held-out, before training (reference): {before.summary()}")
    print(f"held-out, after training (policy):     {after.summary()}")
    for pair, ref, pol in list(zip(pairs, before.answers, after.answers))[:n]:
        prompt = rows[pair.index]["prompt"]
        prompt = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        one_line = {"\n": " ⏎ "}
        ref, pol = (a.translate(str.maketrans(one_line)) for a in (ref, pol))
        print(f"\n  prompt:    {prompt}\n  reference: {ref}\n  policy:    {pol}")


def evaluate(run_dir: str | Path, data: str | None = None, generations: int | None = None) -> dict:
    """Held-out metrics of a finished run, and reference vs policy answers side by side; writes eval.json."""
    run_dir = Path(run_dir)
    recipe, model, tokenizer, device = load_run(run_dir)
    if generations is not None:
        recipe.evaluation.generations = generations
    path = data or recipe.data.eval
    if not path:
        raise LoraDpoError(f"run '{run_dir}' has no data.eval; pass --data FILE.jsonl")
    rows = data_lib.read_rows(path, "--data" if data else "data.eval")
    pairs, report = data_lib.tokenize_rows(rows, tokenizer, recipe.data, source=path)
    for line in report.lines():
        print(line)
    before = snapshot(model, tokenizer, pairs, recipe, device, reference=True)
    after = snapshot(model, tokenizer, pairs, recipe, device)
    print_before_after(before, after, rows, pairs, recipe.evaluation.generations)
    result = snapshots_json(path, pairs, rows, before, after)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return result


def snapshots_json(path: str, pairs: list, rows: list[dict], before: Snapshot, after: Snapshot) -> dict:
    prompts = [rows[p.index]["prompt"] for p in pairs[: len(after.answers)]]
    return {"data": path, "pairs": len(pairs), "before": {"behaviour_rate": before.behaviour_rate,
                                                           **(before.metrics or {})},
            "after": {"behaviour_rate": after.behaviour_rate, **after.metrics},
            "generations": [{"prompt": p, "reference": r, "policy": q}
                            for p, r, q in zip(prompts, before.answers, after.answers)]}
