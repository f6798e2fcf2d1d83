"""The derivation DPO rests on, as a test: with preferences drawn from a Bradley–Terry model with true rewards r,
P(a ≻ b) = σ(r_a − r_b), the DPO optimum's implicit reward β·log(π_θ/π_ref) recovers r up to a per-prompt constant
(Rafailov et al. 2023, §4–5). We draw noisy pairs, train, and check the implicit rewards against r."""

from __future__ import annotations

import math
import random

import torch
from conftest import write_jsonl

from lora_dpo import train
from lora_dpo.batching import collate
from lora_dpo.data import tokenize_rows
from lora_dpo.evaluate import load_run
from lora_dpo.logps import batch_logps
from lora_dpo.model import reference_mode
from lora_dpo.recipe import recipe_from_dict

PROMPTS = ["Pick a colour:", "Name a fruit:", "Say a number:"]
CANDIDATES = [[" red", " green", " blue", " yellow"], [" apple", " pear", " plum", " fig"],
              [" one", " two", " three", " four"]]
TRUE_R = [[-1.5, -0.5, 0.5, 1.5], [1.0, -1.2, 0.2, -0.3], [0.4, 1.3, -1.0, -0.6]]
BETA = 1.0


def bt_pairs(n_per_prompt: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for prompt, cands, rewards in zip(PROMPTS, CANDIDATES, TRUE_R):
        for _ in range(n_per_prompt):
            a, b = rng.sample(range(len(cands)), 2)
            a_wins = rng.random() < 1 / (1 + math.exp(-(rewards[a] - rewards[b])))  # noise included
            w, lose = (a, b) if a_wins else (b, a)
            rows.append({"prompt": prompt, "chosen": cands[w], "rejected": cands[lose]})
    rng.shuffle(rows)
    return rows


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return sxy / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def test_implicit_rewards_recover_bradley_terry_rewards(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "bt.jsonl", bt_pairs(160))
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(tiny_model_dir)},
        "lora": {"r": 8, "lora_alpha": 16},
        # repeated pairs are the Bradley–Terry frequencies: keep them
        "data": {"train": str(data), "max_length": 32, "max_prompt_length": 16, "drop_duplicates": False},
        "dpo": {"beta": BETA},
        "train": {"max_steps": 150, "learning_rate": 3e-3, "per_device_train_batch_size": 16,
                  "lr_scheduler_type": "constant", "logging_steps": 50},
        "output": {"dir": str(tmp_path / "run")},
    })
    run = train(recipe)
    _, model, tokenizer, _ = load_run(run.output_dir)
    # every candidate as a "pair" with itself as rejected: we only read the chosen rows' log-probs
    rows = [{"prompt": p, "chosen": c, "rejected": c + "!"} for p, cands in zip(PROMPTS, CANDIDATES) for c in cands]
    pairs, _ = tokenize_rows(rows, tokenizer, recipe.data, "candidates")
    batch = collate(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        policy = batch_logps(model, batch)[0].chunk(2)[0]
    with reference_mode(model):
        reference = batch_logps(model, batch)[0].chunk(2)[0]
    implicit = (BETA * (policy - reference)).tolist()
    k = len(CANDIDATES[0])
    centred_implicit, centred_true = [], []
    for i, rewards in enumerate(TRUE_R):  # rewards are identified only up to a per-prompt constant
        imp = implicit[i * k: (i + 1) * k]
        centred_implicit += [v - sum(imp) / k for v in imp]
        centred_true += [v - sum(rewards) / k for v in rewards]
    r = pearson(centred_implicit, centred_true)
    print("implicit", [round(v, 2) for v in centred_implicit], "\ntrue    ", centred_true, "\npearson", r)
    assert r >= 0.9
