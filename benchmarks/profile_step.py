"""Where a lora-dpo training step spends its time, per attention kernel and layout: one model load, then for each
setting a few untimed steps, a few timed ones, and one step under torch.profiler, whose busiest kernels it prints.

    python3 benchmarks/profile_step.py                                        # CPU smoke run: demo model
    python3 benchmarks/profile_step.py --model llama3-8b-random --shapes 170x330,1300x330 \\
        --settings packed:flex_attention,packed:flex_attention:peft,concatenated:sdpa   # a GPU: the kit's shapes

A step is what training runs: the policy forward (adapter on) with backward, and the reference forward (adapter
off, no grad), under the training autocast, with gradient checkpointing unless --no-checkpointing. Pairs are
random token ids of exact lengths. `concatenated:sdpa` is TRL's layout on lora-dpo's code (two causal rows per
pair, sdpa's flash path): seconds per step over the tokens each layout runs tells whether a kernel, not the token
count, is what makes a setting slow. Two options bring the step closer to the training loop's, to tell what the
loop adds: `loop` adds what it runs around a step (the loss and the gradient norm read back, clipping, fused
AdamW); `vary` gives every timed step pairs of lengths no step had before (a few tokens more each step; its batch
and mask built inside the step, as the loop's are), then times the same lengths a second time ("seen"). Prints;
asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from vs_trl import machine, resolve_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="demo | llama3-8b-random | a local HF directory")
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--completion-tokens", type=int, default=48)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--shapes", help="comma-separated PROMPTxCOMPLETION token counts, each run with every setting "
                                    "after one model load (instead of --prompt-tokens / --completion-tokens)")
    p.add_argument("--settings", default="packed:sdpa,packed:sdpa_causal,concatenated:sdpa",
                   help="comma-separated layout:attention[:option…] (layouts packed, shared, concatenated; "
                        "attention sdpa, sdpa_causal, flex_attention, eager; options: a forced sdpa kernel, "
                        "efficient (the memory-efficient one, which older GPUs such as the T4 run), flash or math; "
                        "peft: peft's own LoRA forward instead of lora-dpo's fused one, lora_dpo/lora_forward.py; "
                        "recompute: log-prob chunks checkpointed and recomputed in backward instead of their "
                        "gradient computed in forward, lora_dpo/logps.py; base-first: down_proj's base GEMM before "
                        "its LoRA update, so the checkpointed recompute runs it too, lora_forward.base_gemm_last; "
                        "loop: the training loop's work around a step too (results and gradient norm read back, "
                        "clipping, fused AdamW); vary: new pair lengths every timed step, then the same ones again)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    p.add_argument("--rows", type=int, default=15, help="kernels listed per setting")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from lora_dpo import attention, batching, logps
    from lora_dpo import model as model_lib
    from lora_dpo.data import Pair
    from lora_dpo.logps import causal_lm
    from lora_dpo.lora_forward import base_gemm_last, fuse_lora_forward, unfuse_lora_forward
    from lora_dpo.objective import dpo_forward
    from lora_dpo.optim import fused_adamw
    from lora_dpo.recipe import DpoConfig, LoraConfig, ModelConfig, QuantizationConfig

    torch.set_flush_denormal(True)  # as training does (lora_dpo/train.py)
    grad_in_forward = logps._grad_in_forward
    settings = [s.split(":") for s in a.settings.split(",")]
    device, dtype = model_lib.device_and_dtype("auto", "auto")
    cfg = ModelConfig(name_or_path=resolve_model(a.model), attn_implementation="sdpa")
    tokenizer = model_lib.load_tokenizer(cfg)
    model = model_lib.attach_lora(model_lib.load_base(cfg, QuantizationConfig(), dtype, device),
                                  LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), seed=0,
                                  gradient_checkpointing=a.checkpointing)
    model.train()  # as lora_dpo/train.py before its loop: transformers checkpoints a layer only in training mode,
    # and the loaded base's layers start in eval mode (peft's wrapper does not: it says training either way)
    lm = causal_lm(model)
    try:
        shapes = [tuple(int(n) for n in s.split("x")) for s in a.shapes.split(",")] if a.shapes else \
            [(a.prompt_tokens, a.completion_tokens)]
    except ValueError:
        p.error(f"--shapes {a.shapes}: expected PROMPTxCOMPLETION token counts, e.g. 128x256,1024x256")
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(100, lm.config.vocab_size) for _ in range(n)]  # noqa: E731
    autocast = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32 \
        else torch.autocast(device.type, enabled=False)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = fused_adamw(params, lr=1e-4)  # only the `loop` option steps it

    def step(batch, loop=False):
        if isinstance(batch, list):  # pairs: their batch and mask built here, as the training loop does per step
            batch = batching.build(batch, tokenizer.pad_token_id, layout).to(device)
            batch.model_inputs(attn, dtype)
        with autocast, forced():
            loss, _ = dpo_forward(model, batch, DpoConfig())
        loss.backward()
        if loop:  # what lora_dpo/train.py runs around a step: its results and the gradient norm read back (each
            float(loss)  # waits for the GPU), clipping, the optimizer
            float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            optimizer.step()
        model.zero_grad(set_to_none=True)

    def timed(batches, loop) -> float:
        sync()
        t0 = time.perf_counter()
        for b in batches:
            step(b, loop)
        sync()
        return (time.perf_counter() - t0) / len(batches)

    layers = model_lib.decoder_layers(model)
    recompute = sum(bool(getattr(layer, "gradient_checkpointing", False)) and layer.training for layer in layers)
    print(f"machine: {machine()}\nmodel: {a.model}, {dtype}, {a.batch} pairs per step, gradient checkpointing: "
          f"{recompute} of {len(layers)} decoder layers recompute in backward\n")
    summary = []
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "math": SDPBackend.MATH}
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    for prompt_tokens, completion_tokens in shapes:
        shape = f"{prompt_tokens}+2×{completion_tokens}"
        print(f"##### {a.batch} pairs of {prompt_tokens} prompt + 2 × {completion_tokens} completion tokens\n")
        pairs = [Pair(ids(prompt_tokens), ids(completion_tokens), ids(completion_tokens), i) for i in range(a.batch)]
        for layout, attn, *options in settings:
            name = ":".join([layout, attn, *options])
            kernel = [o for o in options if o in kernels]
            unknown = [o for o in options if o not in kernels and o not in OPTIONS]
            if unknown:
                p.error(f"--settings {name}: unknown option {unknown[0]} (efficient, flash, math, "
                        f"{', '.join(OPTIONS)})")
            loop, vary = "loop" in options, "vary" in options
            (unfuse_lora_forward if "peft" in options else fuse_lora_forward)(model)
            if a.checkpointing:
                base_gemm_last(model_lib.decoder_layers(model), on="base-first" not in options)
            logps._grad_in_forward = (lambda head: False) if "recompute" in options else grad_in_forward
            if attn == "flex_attention" and not cuda:
                print(f"=== {name}: skipped (FlexAttention has no backward on a CPU)\n")
                continue
            if kernel and kernel[0] == "efficient" and not cuda:
                print(f"=== {name}: skipped (the memory-efficient kernel is CUDA's)\n")
                continue
            forced = (lambda k=kernels[kernel[0]]: sdpa_kernel(k)) if kernel else contextlib.nullcontext  # noqa: E731
            attention.register(attn)
            lm.set_attn_implementation(attn)
            if attn == "flex_attention":
                attention.compile_flex_for_any_length()
            batch = batching.build(pairs, tokenizer.pad_token_id, layout).to(device)
            tokens = int(batch.input_ids.numel())
            sync()
            t_mask = time.perf_counter()
            batch.model_inputs(attn, dtype)  # the mask, once per micro-batch (memoised: the steps reuse it)
            sync()
            t_mask = time.perf_counter() - t_mask
            for _ in range(a.warmup):
                step(batch, loop)
            if vary:  # k more prompt and completion tokens at step k: a length no step had; the last one profiled
                grown = [[Pair(q.prompt_ids + ids(k), q.chosen_ids + ids(k), q.rejected_ids + ids(k), q.index)
                          for q in pairs] for k in range(1, a.steps + 2)]
                seconds = timed(grown[:-1], loop)
                grown_tokens = sum(int(batching.build(g, tokenizer.pad_token_id, layout).input_ids.numel())
                                   for g in grown[:-1]) // a.steps  # row tokens, on average
                summary.append((shape, f"{name} (new lengths)", grown_tokens, seconds))
                seen = timed(grown[:-1], loop)
                summary.append((shape, f"{name} (lengths seen)", grown_tokens, seen))
                print(f"=== {name}: {seconds:.3f} s/step on new lengths, {seen:.3f} s/step on the same lengths again")
            else:
                seconds = timed([batch] * a.steps, loop)
                summary.append((shape, name, tokens, seconds))
            with torch.profiler.profile(activities=activities) as prof:
                t_prof = time.perf_counter()
                step(grown[-1] if vary else batch, loop)
                sync()
                t_prof = time.perf_counter() - t_prof
            from torch._dynamo.utils import counters

            print(f"=== {name}: {seconds:.3f} s/step, {tokens} row tokens; building the mask took "
                  f"{1e3 * t_mask:.1f} ms; {counters['stats']['unique_graphs']} compiled graphs so far")
            print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "self_cpu_time_total",
                                            row_limit=a.rows, max_name_column_width=60))
            print(by_kind(prof.key_averages(), cuda, t_prof) + "\n")
            if cuda:  # the host's side: what keeps a GPU waiting when it is not busy
                print(host_side(prof.key_averages(), t_prof, a.rows) + "\n")
            else:  # what the host dispatches either way: a device-independent count of the step's operators
                print(f"operator calls: {sum(r.count for r in prof.key_averages() if '::' in r.key)}\n")
    print("| pair tokens | layout:attention[:options] | row tokens | s/step | ms per 1k row tokens |\n"
          "|---|---|---|---|---|")
    for shape, name, tokens, seconds in summary:
        print(f"| {shape} | {name} | {tokens} | {seconds:.3f} | {1e6 * seconds / tokens:.1f} |")
    for shape in dict.fromkeys(s for s, *_ in summary):
        shared = [(seconds, name) for s, name, _, seconds in summary
                  if s == shape and not name.startswith("concatenated")]
        if shared:  # the same pairs in the same rows: s/step compares the kernels directly
            print(f"\n{shape}: fastest prefix-shared setting here: {min(shared)[1]} ({min(shared)[0]:.3f} s/step)")

OPTIONS = ("peft", "recompute", "base-first", "loop", "vary")
KINDS = (  # (kind, pattern over the lower-cased kernel or op name); the first that matches names the kind
    ("attention", r"attention|flash|fmha|sdpa|flex|triton_tem"),
    ("4-bit weights (bitsandbytes dequantize; on a CPU its matmul too)", r"dequant|bitsandbytes|gemm_4bit"),
    ("GEMM", r"gemm|gemv|xmma|cutlass|cublas|nvjet|^sm\d+_|^aten::(mm|addmm|bmm|matmul|linear)$"),
    ("copies, casts, concatenation", r"copy|memcpy|memset|^aten::(cat|fill_|zero_|index|gather|scatter)|catarray|fill"),
)


def kind_of(name: str) -> str:
    import re

    low = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, low)), "elementwise, norms, reductions, other")


def by_kind(rows, cuda: bool, wall: float) -> str:
    """Where the profiled step's time went, by kind of work: on a GPU the kernels' own time (rows that are kernels,
    so nothing counts twice) and how busy the GPU was over the step's wall time (well under 100 %: the step waits
    on the host, i.e. on Python and kernel launches); on a CPU the operators' self time."""
    from torch.autograd import DeviceType

    if cuda:
        times = [(r.key, r.self_device_time_total) for r in rows if r.device_type == DeviceType.CUDA]
    else:
        times = [(r.key, r.self_cpu_time_total) for r in rows if "::" in r.key]
    if not times:
        return "time by kind: no kernel or operator rows in this profile"
    total = sum(t for _, t in times) or 1
    kinds: dict = {}
    for key, t in times:
        kinds[kind_of(key)] = kinds.get(kind_of(key), 0) + t
    ranked = sorted(kinds.items(), key=lambda kv: -kv[1])
    lines = [f"  {kind}: {t / 1e3:.1f} ms ({t / total:.0%})" for kind, t in ranked]
    head = (f"{'GPU kernels' if cuda else 'CPU operators (self time)'}: {total / 1e3:.1f} ms over a {1e3 * wall:.1f} ms"
            f" step" + (f", the GPU busy {total / 1e6 / wall:.0%} of it" if cuda else ""))
    return "\n".join([head, *lines])


def host_side(rows, wall: float, limit: int) -> str:
    """The profiled step on the host: operator calls, their self CPU time (dispatch, launches, Python-implemented
    ops such as bitsandbytes') against the step's wall time, and the operators costing the host most."""
    ops = [r for r in rows if "::" in r.key]
    cpu = sum(r.self_cpu_time_total for r in ops)
    top = sorted(ops, key=lambda r: -r.self_cpu_time_total)[:limit]
    lines = [f"  {r.key[:60]}: {r.self_cpu_time_total / 1e3:.1f} ms over {r.count} calls" for r in top]
    return "\n".join([f"host: {sum(r.count for r in ops)} operator calls, {cpu / 1e3:.1f} ms of their own CPU time "
                      f"over a {1e3 * wall:.1f} ms step; most:", *lines])


if __name__ == "__main__":
    main()
