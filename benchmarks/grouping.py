"""Shuffled vs length-grouped batches, and packed vs unpacked rows: lora-dpo alone, one whole epoch over the same
pairs, so every setting does the same real work and only the padding differs.

    python3 benchmarks/grouping.py                   # demo model, 64 pairs per dataset, batch 8
    python3 benchmarks/grouping.py --settings shuffled/packed,grouped/packed --repeats 3

Each setting runs in a fresh process: a one-step warm-up run on other pairs (kernels, allocator), then a timed run
of exactly one epoch (pairs // batch steps), timed from the first step's start to the last step's end. Prints the
epoch time, pairs/s, the padding share of the rows (computed from the batches) and the speed-up over
shuffled/shared. Nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from vs_trl import LORA, _pair_len, bench_pairs, machine, probed_run, resolve_model, synthetic_rows  # noqa: E402

SETTINGS = ("shuffled/shared", "shuffled/packed", "grouped/shared", "grouped/packed")


def worker(a) -> dict:
    from lora_dpo.batching import micro_batch_indices, row_tokens

    order, layout = a.setting.split("/")
    group = order == "grouped"
    steps = a.pairs // a.batch
    recipe = {"model": {"name_or_path": a.model_dir},
              "data": {"train": "train.jsonl", "max_length": 8192, "max_prompt_length": 4096},
              "lora": LORA, "dpo": {"beta": 0.1, "reference": "live"},
              "train": {"max_steps": 1, "learning_rate": 1e-4, "per_device_train_batch_size": a.batch, "seed": 42,
                        "layout": layout, "group_by_length": group},
              "evaluation": {"generations": 0}, "output": {"dir": "run"}}
    probed_run(recipe, synthetic_rows(a.batch, a.prompt, a.completion, seed=99))  # warm-up on other pairs
    rows = synthetic_rows(a.pairs, a.prompt, a.completion, seed=1 if a.dataset == "long" else 0)
    probe = probed_run({**recipe, "train": {**recipe["train"], "max_steps": steps}}, rows)
    pairs = bench_pairs(a.model_dir, rows)
    lengths = [_pair_len(p) for p in pairs]
    batches = [b for b, _ in zip(micro_batch_indices(lengths, a.batch, 42, group_by_length=group), range(steps))]
    distinct, total = row_tokens(pairs, batches, layout)
    seconds = probe.times[-1] - probe.start
    return {"seconds": seconds, "pairs_per_s": steps * a.batch / seconds, "padding": 1 - distinct / total,
            "row_tokens": total, "tokens": distinct, "final_loss": probe.losses[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--datasets", default="short,long")
    p.add_argument("--short-prompt", type=int, default=24)
    p.add_argument("--long-prompt", type=int, default=160)
    p.add_argument("--completion", type=int, default=48)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--prompt", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.worker:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return
    model_dir = resolve_model(a.model)
    settings = a.settings.split(",")
    results: dict = {}
    for ds in a.datasets.split(","):
        prompt = a.long_prompt if ds == "long" else a.short_prompt
        for _ in range(a.repeats):
            for s in settings:  # interleaved, so drift on a shared machine hits every setting alike
                cmd = [sys.executable, __file__, "--worker", "--model-dir", model_dir, "--setting", s, "--dataset", ds,
                       "--prompt", str(prompt), "--completion", str(a.completion), "--pairs", str(a.pairs),
                       "--batch", str(a.batch)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    sys.exit(f"{s} failed on {ds}:\n{proc.stderr[-3000:]}")
                r = json.loads(lines[-1][7:])
                results.setdefault(ds, {}).setdefault(s, []).append(r)
                print(f"[{ds}] {s}: {r['seconds']:.1f} s/epoch, {r['pairs_per_s']:.3f} pairs/s, padding "
                      f"{r['padding']:.1%}, final loss {r['final_loss']:.4f}", flush=True)
    print(f"\nmachine: {machine()}\nmodel: {a.model}, {a.pairs} pairs per dataset, batch {a.batch}, one epoch "
          f"({a.pairs // a.batch} steps) per run, median of {a.repeats}\n")
    print("| data | batches / rows | s per epoch | pairs/s | padding of the rows | row tokens | vs shuffled/shared |")
    print("|---|---|---|---|---|---|---|")
    for ds, by in results.items():
        base = statistics.median(r["seconds"] for r in by.get("shuffled/shared", by[settings[0]]))
        for s, rs in by.items():
            sec = statistics.median(r["seconds"] for r in rs)
            print(f"| {ds} | {s} | {sec:.1f} | {statistics.median(r['pairs_per_s'] for r in rs):.3f} | "
                  f"{rs[0]['padding']:.1%} | {rs[0]['row_tokens']:,} | {base / sec:.2f}× |")


if __name__ == "__main__":
    main()
