"""A reward model the user names (a sequence-classification model with one output) scores the policy's and the
reference's greedy answers to the same prompts → a policy-vs-reference win rate."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_dpo.errors import LoraDpoError
from lora_dpo.hub import could_be_hub_id


def _architectures(name: str) -> list[str] | None:
    """The `architectures` of a local model directory (None for a hub id: checked after loading its config)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraDpoError(f"--reward-model: directory '{name}' has no config.json; point it at a saved "
                               "sequence-classification model (save_pretrained output) or a hub id")
        return json.loads((path / "config.json").read_text()).get("architectures") or []
    if not could_be_hub_id(name):
        raise LoraDpoError(f"--reward-model: '{name}' is not a model directory or a hub id (owner/name); check it")
    from lora_dpo.hub import offline_if_unreachable

    offline_if_unreachable()
    return None


def load(name: str, device: torch.device):
    """→ (model, tokenizer). Refuses what is not a one-output sequence classifier: loading a causal LM through
    AutoModelForSequenceClassification would attach a randomly initialised score head and score noise."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    archs = _architectures(name)
    try:
        if archs is None:
            archs = AutoConfig.from_pretrained(name, trust_remote_code=False).architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise LoraDpoError(f"--reward-model '{name}' is a {', '.join(archs) or 'model of unknown class'}, not a "
                               "sequence-classification model (…ForSequenceClassification); name a reward model")
        from lora_dpo.model import device_and_dtype

        dtype = device_and_dtype("auto", device.type)[1]  # bf16 where native, fp16 on older GPUs, fp32 on CPU
        model = AutoModelForSequenceClassification.from_pretrained(name, trust_remote_code=False, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except OSError as e:
        raise LoraDpoError(f"--reward-model '{name}' could not be loaded ({str(e).splitlines()[0]}); give a local "
                           "directory or a reachable hub id") from None
    if model.config.num_labels != 1:
        raise LoraDpoError(f"--reward-model '{name}' has {model.config.num_labels} outputs; a reward model gives "
                           "one score per text (num_labels 1)")
    return model.to(device).eval(), tokenizer


def _messages(prompt) -> list[dict]:
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


def _text_ids(tokenizer, prompt, answer: str) -> list[int]:
    """Prompt + answer as the reward model reads them: through its chat template when it has one, else as plain
    text (message lists rendered 'role: content')."""
    messages = _messages(prompt) + [{"role": "assistant", "content": answer}]
    if tokenizer.chat_template:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
        return list(out["input_ids"])
    text = prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in messages[:-1])
    return tokenizer(f"{text}\n\n{answer}")["input_ids"]


@torch.no_grad()
def score(model, tokenizer, prompts: list, answers: list[str]) -> tuple[list[float], int]:
    """→ (one score per (prompt, answer), how many texts were longer than the model's context and lost their
    beginning). Texts are scored one at a time: no padding, so a score cannot depend on which other texts share a
    batch, and identical texts get identical scores."""
    device = next(model.parameters()).device
    limit = getattr(model.config, "max_position_embeddings", None)
    out, cut = [], 0
    for prompt, answer in zip(prompts, answers):
        ids = _text_ids(tokenizer, prompt, answer)
        if limit and len(ids) > limit:  # keep the end: the answer is what is being scored
            ids, cut = ids[-limit:], cut + 1
        ids = torch.tensor([ids], device=device)
        out.append(float(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0].float()))
    return out, cut


def win_rate(policy_scores: list[float], reference_scores: list[float]) -> dict:
    """A win is a strictly higher policy score; equal scores (e.g. identical answers) are ties, counted apart."""
    n = len(policy_scores)
    wins = sum(p > r for p, r in zip(policy_scores, reference_scores))
    ties = sum(p == r for p, r in zip(policy_scores, reference_scores))
    return {"prompts": n, "wins": wins, "ties": ties, "losses": n - wins - ties,
            "win_rate": wins / n if n else None, "tie_rate": ties / n if n else None,
            "loss_rate": (n - wins - ties) / n if n else None,
            "mean_score_policy": sum(policy_scores) / n if n else None,
            "mean_score_reference": sum(reference_scores) / n if n else None}
