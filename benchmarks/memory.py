"""Peak memory of a lora-dpo run on pairs of exact token lengths, next to `lora-dpo estimate`'s prediction.

    python3 benchmarks/memory.py                                   # CPU smoke run: demo model, short pairs
    python3 benchmarks/memory.py --model llama3-8b-random --prompt-tokens 1024 --completion-tokens 1024   # GPU

The default GPU case is the issue's "pairs of 2×2048 tokens": every pair is a 1024-token prompt with two 1024-token
completions, so chosen and rejected each span 2048 tokens. Each run is a fresh process; the peak is CUDA max
allocated over steps 2..N (on CPU: peak RSS, which `estimate` does not predict). Prints one line per setting and
a markdown table; nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from vs_trl import WORDS, machine, probed_run, resolve_model  # noqa: E402


def exact_rows(n: int, prompt_tokens: int, completion_tokens: int, seed: int) -> list[dict]:
    """Text long enough for the lengths asked; data.max_prompt_length / max_length then cut every pair to exactly
    prompt_tokens + completion_tokens per sequence (each word is at least one token)."""
    import random

    r = random.Random(seed)
    text = lambda k: " ".join(r.choice(WORDS) for _ in range(k + 8))
    return [{"prompt": text(prompt_tokens), "chosen": " " + text(completion_tokens),
             "rejected": " " + text(completion_tokens)} for _ in range(n)]


def recipe_dict(a) -> dict:
    return {"model": {"name_or_path": a.model_dir, "attn_implementation": a.attn,
                      "offload_embeddings": a.offload in ("embeddings", "both")},
            "data": {"train": "train.jsonl", "max_prompt_length": a.prompt_tokens,
                     "max_length": a.prompt_tokens + a.completion_tokens},
            "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
            "dpo": {"beta": 0.1, "reference": a.reference},
            "train": {"max_steps": a.steps, "learning_rate": 1e-4, "per_device_train_batch_size": a.batch,
                      "gradient_checkpointing": a.checkpointing != "off", "seed": 42, "layout": a.layout,
                      "offload_activations": a.offload in ("activations", "both") and a.checkpointing != "off",
                      "gradient_checkpointing_layers": 1.0 if a.checkpointing in ("on", "off") else
                      a.checkpointing if a.checkpointing == "auto" else float(a.checkpointing)},
            "evaluation": {"generations": 0}, "output": {"dir": "run"}}


def worker(a) -> dict:
    from lora_dpo.estimate import estimate_for
    from lora_dpo.recipe import recipe_from_dict

    recipe = recipe_dict(a)
    probe = probed_run(recipe, exact_rows(a.batch * a.steps, a.prompt_tokens, a.completion_tokens, seed=0))
    est = estimate_for(recipe_from_dict(recipe))
    result = probe.result(a.batch, [a.batch * (a.prompt_tokens + 2 * a.completion_tokens)] * a.steps)
    import torch

    from lora_dpo.attention import resolve_attention

    attn = resolve_attention(a.attn, torch.device(probe.device), a.layout)  # auto: the kernel it resolved to
    result.update(device=probe.device, attn=attn, predicted_bytes=est.allocated,
                  # what auto chose: the estimate plans it against the visible GPU, as training does (a CPU run: all)
                  checkpointed_layers=f"{est.checkpointed_layers}/{est.layers}" if probe.device == "cuda" else "all",
                  prompt_tokens=a.prompt_tokens, completion_tokens=a.completion_tokens,
                  predicted={k: getattr(est, k) for k in ("weights", "adapters", "activations", "logps", "overhead")})
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="demo | llama3-8b-random | a local HF directory")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--completion-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--attn", default="auto", help="comma-separated: auto,sdpa,sdpa_causal,flex_attention,eager")
    p.add_argument("--layout", default="packed")
    p.add_argument("--reference", default="live", choices=["live", "precompute"])
    p.add_argument("--checkpointing", default="on",
                   help="comma-separated: on | off | auto | a share of the layers "
                        "(train.gradient_checkpointing_layers)")
    p.add_argument("--offload", default="off",
                   help="comma-separated: off | embeddings (model.offload_embeddings: the embedding table in CPU "
                        "memory) | activations (train.offload_activations: the checkpointed layers' inputs) | both")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if set(a.offload.split(",")) - {"off", "embeddings", "activations", "both"}:
        p.error(f"--offload '{a.offload}': expected off, embeddings, activations or both (comma-separated)")
    for c in a.checkpointing.split(","):
        if c not in ("on", "off", "auto") and not (c.replace(".", "", 1).isdigit() and 0 < float(c) <= 1):
            p.error(f"--checkpointing '{c}': expected on, off, auto or a share of the layers in (0, 1]")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.worker:
        print("RESULT " + json.dumps(worker(a), default=str), flush=True)
        return
    model_dir = resolve_model(a.model)
    results = []
    settings = [(attn, ckpt, off) for attn in a.attn.split(",") for ckpt in a.checkpointing.split(",")
                for off in a.offload.split(",")]
    for attn, ckpt, off in settings:
        cmd = [sys.executable, __file__, "--worker", "--model-dir", model_dir, "--attn", attn,
               "--checkpointing", ckpt, "--offload", off, "--prompt-tokens", str(a.prompt_tokens),
               "--completion-tokens", str(a.completion_tokens), "--batch", str(a.batch), "--steps", str(a.steps),
               "--layout", a.layout, "--reference", a.reference]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{attn}, checkpointing {ckpt}: worker failed\n{proc.stderr[-3000:]}", flush=True)
            continue
        r = {"attn": attn} | json.loads(lines[-1][7:]) | {"checkpointing": ckpt, "offload": off}
        results.append(r)
        if a.json:  # after every setting: a run cut short by a time limit keeps what ran
            from lora_dpo.evaluate import write_json

            write_json(Path(a.json), results)
        print(f"{r['attn']}, checkpointing {ckpt}, offloaded {off}: peak "
              f"{r['peak_bytes'] / 2**30:.2f} GiB, predicted {r['predicted_bytes'] / 2**30:.2f} GiB, "
              f"{r['seconds_per_step']:.2f} s/step, "
              f"losses {[round(x, 4) for x in r['losses']]}", flush=True)
    gpu = bool(results) and results[0]["device"] == "cuda"
    print(f"\nmachine: {machine()}\nmodel: {a.model}, {a.batch} pair(s) per step of {a.prompt_tokens} prompt + 2 × "
          f"{a.completion_tokens} completion tokens (chosen and rejected {a.prompt_tokens + a.completion_tokens} "
          f"each), layout {a.layout}, reference {a.reference}, {a.steps} steps (peak over 2..{a.steps})\n")
    print(f"| attention | checkpointing | offloaded to CPU memory | measured peak "
          f"({'CUDA allocated' if gpu else 'RSS'}) | predicted by estimate | predicted / measured | s/step |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['predicted_bytes'] / r['peak_bytes']:.2f}" if gpu else "n/a (CPU RSS)"
        ckpt = r["checkpointing"] + (f" ({r['checkpointed_layers']})" if r["checkpointing"] == "auto" else "")
        print(f"| {r['attn']} | {ckpt} | {r['offload']} | {r['peak_bytes'] / 2**30:.2f} GiB | "
              f"{r['predicted_bytes'] / 2**30:.2f} GiB | {ratio} | {r['seconds_per_step']:.2f} |")
    if not results:
        sys.exit(1)


if __name__ == "__main__":
    main()
