"""Generation from the policy and the reference: greedy answers side by side, and sampled completions for a
Monte-Carlo estimate of KL(π_θ ‖ π_ref)."""

from __future__ import annotations

import contextlib
import math

import torch

from lora_dpo import attention, batching, offload
from lora_dpo import compile as compile_blocks
from lora_dpo import model as model_lib
from lora_dpo.batching import Batch
from lora_dpo.data import Pair
from lora_dpo.logps import batch_logps

KL_ESTIMATOR = ("mean over held-out prompts x (one sampled completion y ~ π_θ(·|x) each: temperature 1, no top-k/"
                "top-p, at most max_new_tokens tokens, torch seed `seed`) of log π_θ(y|x) − log π_ref(y|x), "
                "log-probs summed over the completion's tokens (EOS included when generated); an unbiased estimate "
                "of KL(π_θ ‖ π_ref) over completions cut at max_new_tokens")


@contextlib.contextmanager
def _no_grad(model):
    with torch.no_grad():
        yield model


def _left_padded(chunk: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, p in enumerate(chunk):
        ids[j, width - len(p):] = torch.tensor(p)
        mask[j, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def _generate_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, reference: bool,
                  batch_size: int, sample: bool) -> list[list[int]]:
    """New token ids per prompt (cut after the first EOS), batched with left padding."""
    was_training = model.training
    model.eval()
    # sampling from π_θ itself: the model's generation_config may carry top-k/top-p/temperature defaults
    options = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=None, typical_p=1.0,
                   repetition_penalty=1.0) if sample else dict(do_sample=False)
    out_ids = []
    ctx = model_lib.reference_mode if reference else _no_grad
    with ctx(model), attention.sdpa_for_generation(model), offload.embeddings_on_device(model), \
            compile_blocks.eager():
        device = next(model.parameters()).device
        for i in range(0, len(prompts), batch_size):
            ids, mask = _left_padded(prompts[i: i + batch_size], tokenizer.pad_token_id)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **options,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for row in out[:, ids.shape[1]:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id) + 1]
                out_ids.append(row)
    model.train(was_training)
    return out_ids


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 32, reference: bool = False,
             batch_size: int = 16) -> list[str]:
    """Greedy answers for tokenised prompts, batched with left padding; `reference` switches the adapter off."""
    new = _generate_ids(model, tokenizer, prompts, max_new_tokens, reference, batch_size, sample=False)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def _completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
    """Each (prompt, completion) as a pair whose chosen and rejected are both the completion: the concatenated
    layout then scores it with the same code as training; the first half of the log-probs is the one we need."""
    return batching.collate([Pair(p, c, c, i) for i, (p, c) in enumerate(zip(prompts, completions))], pad_id)


@torch.no_grad()
def kl_estimate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, seed: int,
                batch_size: int = 8) -> dict:
    """Sample one completion per prompt from the policy and average log π_θ(y|x) − log π_ref(y|x) over them.

    The global RNG state is left as it was (sampling runs under a forked, seeded RNG), so calling this in the
    middle of training changes nothing that follows.
    """
    device = model.get_output_embeddings().weight.device  # where it computes (the embeddings may be offloaded)
    dtype = model.get_input_embeddings().weight.dtype  # the run's compute dtype
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        completions = _generate_ids(model, tokenizer, prompts, max_new_tokens, False, batch_size, sample=True)
    kept = [(p, c) for p, c in zip(prompts, completions) if c]  # an empty completion has no tokens to score
    was_training = model.training
    model.eval()
    diffs, tokens = [], 0
    for i in range(0, len(kept), batch_size):
        chunk = kept[i: i + batch_size]
        batch = _completion_batch([p for p, _ in chunk], [c for _, c in chunk], tokenizer.pad_token_id).to(device)
        with model_lib.autocast(device, dtype), compile_blocks.eager():  # as training computes, eagerly
            policy, n_tokens = batch_logps(model, batch)                     # (2R,): the R rows twice
            with model_lib.reference_mode(model):
                reference, _ = batch_logps(model, batch)
        R = len(chunk)
        diffs += (policy[:R] - reference[:R]).tolist()
        tokens += int(n_tokens[:R].sum())
    model.train(was_training)
    n = len(diffs)
    mean = sum(diffs) / n if n else None
    std_error = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
    return {"estimator": KL_ESTIMATOR, "kl": mean, "kl_per_token": sum(diffs) / tokens if tokens else None,
            "std_error": std_error, "samples": n, "empty_completions": len(prompts) - n,
            "tokens": tokens, "seed": seed, "max_new_tokens": max_new_tokens}
