"""lora-dpo vs TRL's DPOTrainer: same model, data, settings, seed and initial adapter, alternated in one run.

    python3 benchmarks/vs_trl.py                       # CPU: the demo model (SmolLM2-135M-Instruct, 4-bit NF4)
    python3 benchmarks/vs_trl.py --steps 8 --repeats 2 --batch 4
    python3 benchmarks/vs_trl.py --model llama3-8b-random --batch 4 --long-prompt 1536 --completion 512   # GPU

Each measurement runs in a fresh worker process (so peak memory belongs to one trainer), in the order
lora-dpo, TRL, lora-dpo, TRL, … per dataset. A worker loads the 4-bit base, attaches LoRA (the same initial adapter
on both sides: lora-dpo's seeded init, saved once and loaded into TRL's adapter), trains `--steps` optimizer steps
on the same pairs in the same order (lora-dpo's first micro-batches, grouped by length unless --no-group; TRL reads
them sequentially), and reports:
- pairs/s and tokens/s over steps 2..N (step 1 is warm-up), tokens = prompt + chosen + rejected of the pairs seen;
- peak memory during those steps: CUDA max allocated on a GPU; on CPU the peak RSS sampled every 5 ms;
- the loss of every step (both sides must agree: same maths, different work).
Prints a markdown table of medians and ratios (lora-dpo / TRL). Nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

WORDS = ("the a of to and in is it that for on with as was he be at by this had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so said "
         "what up its about into than them can only other new some could time these two may then do first any my "
         "now such like our over man me even most made after also did many before must through back years where "
         "much your way well down should because each just those people how too little state good very make world "
         "still own see men work long get here between both life being under never day same another know while "
         "last might us great old year off come since against go came right used take three").split()
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
STARTED = time.perf_counter()  # a worker's setup time counts from here (its imports, model load, compile)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def synthetic_rows(n: int, prompt_words: int, completion_words: int, seed: int) -> list[dict]:
    """Pairs of random English words; lengths vary ±50 % so padding matters."""
    r = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(r.choice(WORDS) for _ in range(max(1, int(k * r.uniform(0.5, 1.5)))))

    return [{"prompt": text(prompt_words) + "?", "chosen": " " + text(completion_words) + ".",
             "rejected": " " + text(completion_words) + "."} for _ in range(n)]


# ---------------------------------------------------------------- measurement inside a worker


class Probe:
    """Step end times and the peak memory between the end of the warm-up steps and the last step."""

    warmup = 1  # untimed first steps (--warmup 2 for compiled kernels such as flex_attention's: no compile is timed)

    def __init__(self, device: str) -> None:
        self.device, self.times, self.losses, self.peak, self.start = device, [], [], 0, 0.0
        self.resident = 0  # CUDA memory held between steps after the warm-up: weights, adapter, optimizer state
        self._stop = threading.Event()
        self._thread = None
        # Python's full (oldest-generation) garbage collections: (steps done, seconds) each; one walks every object
        # the libraries created, ~0.1-0.6 s, and can fall inside a timed step (lora_dpo/heap.py)
        self.collections, self._collecting = [], 0.0
        self.wait_shares = []  # lora-dpo's host_wait_share per step (lora_dpo/pace.py; CUDA only)
        self.graphs_at_warmup = 0  # torch.compile graphs made by the end of the warm-up steps
        self.allocator_at_warmup = {}  # CUDA caching-allocator counters at the end of the warm-up steps
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._collecting = time.perf_counter()
        else:
            self.collections.append((len(self.times), time.perf_counter() - self._collecting))

    def step(self, loss: float, host_wait_share: float | None = None) -> None:
        self.times.append(time.perf_counter())
        self.losses.append(float(loss))
        self.wait_shares.append(host_wait_share)
        if len(self.times) == self.warmup:  # warm-up done: measure memory from here
            self.graphs_at_warmup = unique_graphs()
            if self.device == "cpu":  # hand freed heap (e.g. the weights before quantization) back to the OS
                import ctypes

                ctypes.CDLL("libc.so.6").malloc_trim(0)
            if self.device == "cuda":
                import torch

                self.resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                self.allocator_at_warmup = allocator_counts()
            else:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.005)

    def result(self, pairs_per_step: int, tokens_per_step: list[int]) -> dict:
        self._stop.set()
        if self.device == "cuda":
            import torch

            self.peak = torch.cuda.max_memory_allocated()
        w = self.warmup
        elapsed = self.times[-1] - self.times[w - 1]
        steps = len(self.times) - w
        return {"pairs_per_s": pairs_per_step * steps / elapsed, "tokens_per_s": sum(tokens_per_step[w:]) / elapsed,
                "peak_bytes": self.peak, "resident_bytes": self.resident, "losses": self.losses,
                "seconds_per_step": elapsed / steps, "process_peak_bytes": process_peak(self.device),
                # each timed step on its own: one slow step (an allocator retry, a new shape) reads differently
                # from a uniformly slow run, and the rate per token tells a long batch from a slow one
                "step_seconds": [b - a for a, b in zip(self.times[w - 1:], self.times[w:])],
                "step_tokens": list(tokens_per_step[w:]),
                # where a worker's wall time goes (the GPU kit's stages are mostly load and compile): start-up to
                # the training loop, then the untimed warm-up steps
                "setup_seconds": self.start - STARTED, "warmup_seconds": self.times[w - 1] - self.start,
                # full collections inside timed steps: [timed step (1-based), seconds]
                "full_collections": [[n - w + 1, round(sec, 4)] for n, sec in self.collections
                                     if w <= n < len(self.times)],
                # the share of each timed step lora-dpo's host spent waiting for the GPU: near 0, the GPU waited
                "host_wait_shares": self.wait_shares[w:] if any(x is not None for x in self.wait_shares) else None,
                # graphs compiled inside timed steps (a new shape recompiling): a slow step's other suspect
                "graphs_in_timed_steps": unique_graphs() - self.graphs_at_warmup,
                # the CUDA caching allocator inside timed steps: new device memory (cudaMalloc: a new length every
                # step can outgrow the cached blocks), memory handed back (cudaFree waits for the GPU) and retries
                # (everything cached freed to satisfy a request): a third suspect for a slow or uneven step
                "allocator_in_timed_steps": {k: v - self.allocator_at_warmup.get(k, 0)
                                             for k, v in allocator_counts().items()} if self.device == "cuda" else None}


def allocator_counts() -> dict:
    """The CUDA caching allocator's cumulative device allocations, frees and retries in this process."""
    import torch

    stats = torch.cuda.memory_stats()
    return {"device_allocs": stats.get("num_device_alloc", 0), "device_frees": stats.get("num_device_free", 0),
            "retries": stats.get("num_alloc_retries", 0)}


def unique_graphs() -> int:
    """torch.compile graphs made so far in this process (flex_attention's kernels, train.compile's blocks)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def allocator(r: dict) -> str:
    c = r["allocator_in_timed_steps"]
    return f"{c['device_allocs']} cudaMalloc, {c['device_frees']} cudaFree, {c['retries']} retries"


def waits(r: dict) -> str:
    """lora-dpo's host_wait_share per timed step, as percentages (near 0: the GPU waited for the host)."""
    return ", ".join("?" if x is None else f"{x:.0%}" for x in r["host_wait_shares"])


def process_peak(device: str) -> int:
    """The whole process's peak — model load and the untimed first steps included: VmHWM on a CPU (the first step
    runs the epoch's longest batch, which the timed peak leaves out), CUDA's max allocated since start on a GPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()  # reset after the warm-up: the same as the timed peak there
    status = Path("/proc/self/status")
    if not status.exists():
        return 0
    return next((int(ln.split()[1]) * 1024 for ln in status.read_text().splitlines() if ln.startswith("VmHWM:")), 0)


def bench_pairs(model_dir: str, rows: list[dict], tokenizer=None) -> list:
    """The rows tokenized as the benchmark's recipes tokenize them (nothing truncated), index = row number."""
    from lora_dpo.data import tokenize_rows
    from lora_dpo.model import load_tokenizer
    from lora_dpo.recipe import DataConfig, ModelConfig

    tokenizer = tokenizer or load_tokenizer(ModelConfig(name_or_path=model_dir))
    pairs, _ = tokenize_rows(rows, tokenizer, DataConfig(train="x.jsonl", max_length=8192, max_prompt_length=4096),
                             source="bench")
    return pairs


def _step_batches(a, order: list[int]) -> list[list[int]]:
    """The pairs of each optimizer step, in the order both trainers see them."""
    return [order[s * a.batch:(s + 1) * a.batch] for s in range(a.steps)]


def _step_tokens(a, pairs: list, order: list[int]) -> list[int]:
    """Each step's distinct tokens (a prompt once, both completions): what both sides' tokens/s count."""
    from lora_dpo.batching import pair_len

    return [sum(pair_len(pairs[i]) for i in b) for b in _step_batches(a, order)]


def _recipe_dict(a) -> dict:
    return {"model": {"name_or_path": a.model_dir, "attn_implementation": a.attn,
                      "offload_embeddings": a.offload in ("embeddings", "both")},
            "data": {"train": "train.jsonl", "max_length": 8192, "max_prompt_length": 4096},
            "lora": LORA, "dpo": {"beta": 0.1, "reference": "live"},
            "train": {"max_steps": a.steps, "learning_rate": 1e-4, "precision": a.precision,
                      "per_device_train_batch_size": a.batch,
                      "gradient_checkpointing": a.checkpointing, "seed": 42, "layout": a.layout,
                      "offload_activations": a.offload in ("activations", "both"), "compile": a.compile,
                      "group_by_length": a.group},
            "evaluation": {"generations": 0}, "output": {"dir": "run"}}


def probed_run(recipe: dict, rows: list[dict]) -> Probe:
    """Train lora-dpo on `rows` with this recipe (its data.train and output.dir replaced by temporary ones),
    probing every logged step."""
    import torch

    from lora_dpo.recipe import recipe_from_dict
    from lora_dpo.train import run

    train_mod = sys.modules["lora_dpo.train"]
    probe = Probe("cuda" if torch.cuda.is_available() else "cpu")
    real_log, real_progress = train_mod._log, train_mod._progress
    train_mod._log = lambda out, row, trackers, bar: (probe.step(row["loss"], row.get("host_wait_share")),
                                                      real_log(out, row, trackers, bar))
    train_mod._progress = lambda *args, **kw: (setattr(probe, "start", time.perf_counter()),
                                               real_progress(*args, **kw))[1]  # the loop starts
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data_file = Path(tmp) / "train.jsonl"
            data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
            run(recipe_from_dict({**recipe, "data": {**recipe["data"], "train": str(data_file)},
                                  "output": {"dir": str(Path(tmp) / "run"), "overwrite": True}}))
    finally:
        train_mod._log, train_mod._progress = real_log, real_progress
    return probe


def worker_ours(a, rows, order) -> dict:
    from lora_dpo import model as M

    real_attach = M.attach_lora

    def attach_and_save(*args, **kw):  # lora-dpo's seeded initial adapter, for TRL's workers (fp32 like ours)
        peft = real_attach(*args, **kw)
        if not Path(a.init_adapter).is_file():
            from safetensors.torch import save_file

            save_file({n: p.detach().float().cpu().contiguous() for n, p in peft.named_parameters() if "lora_" in n},
                      a.init_adapter)
        return peft

    M.attach_lora = attach_and_save
    try:
        with warnings.catch_warnings(record=True) as caught:  # torch warns once if flex_attention runs uncompiled
            warnings.simplefilter("always")
            probe = probed_run(_recipe_dict(a), rows)
    finally:
        M.attach_lora = real_attach
    pairs = bench_pairs(a.model_dir, rows)
    per_step = _step_tokens(a, pairs, order)
    result = probe.result(a.batch, per_step)
    result["padding"] = padding(a, pairs, order, a.layout)
    result["work_ratio"] = work_ratio(a, pairs, order, a.layout)
    result["compiled_graphs"] = unique_graphs()  # torch.compile graphs: flex_attention, bnb
    result["flex_uncompiled"] = any("without torch.compile" in str(w.message) for w in caught)
    if probe.device == "cuda":  # the planner's prediction for this data's longest pair, to compare with the peak
        result["predicted_bytes"] = predicted_peak(a, [pairs[i] for i in order[a.warmup * a.batch:]])  # timed
    return result


def predicted_peak(a, pairs: list) -> int:
    from lora_dpo.estimate import estimate_for
    from lora_dpo.recipe import recipe_from_dict

    d = _recipe_dict(a)
    d["data"].update(max_prompt_length=max(len(p.prompt_ids) for p in pairs),
                     max_length=max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs))
    return estimate_for(recipe_from_dict(d)).allocated


def worker_trl(a, rows, order) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lora_dpo.model import _keep_cpu_4bit_differentiable

    # the process setting lora-dpo's training makes: subnormal floats (softmax tails in backward) flushed to zero,
    # which x86 CPUs otherwise process ~100× slower; TRL runs under it too, so neither side pays for them
    torch.set_flush_denormal(True)
    cuda = torch.cuda.is_available()
    half = cuda and a.precision != "fp32"  # lora-dpo's precision auto: bf16 on a GPU (the kit's are Hopper)
    dtype = torch.bfloat16 if half else torch.float32
    probe = Probe("cuda" if cuda else "cpu")

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            probe.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                probe.step(logs["loss"])

    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=1e-4,
                         lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, beta=0.1, max_length=None,
                         use_cpu=not cuda, bf16=half, fp16=False, report_to="none", logging_steps=1,
                         save_strategy="no", seed=42, gradient_checkpointing=a.checkpointing,
                         train_sampling_strategy="sequential", dataset_num_proc=None, disable_tqdm=True,
                         model_init_kwargs={"dtype": dtype, "attn_implementation": "sdpa"})
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)
        trainer = DPOTrainer(a.model_dir, args=args, train_dataset=Dataset.from_list([rows[i] for i in order]),
                             processing_class=AutoTokenizer.from_pretrained(a.model_dir), quantization_config=bnb,
                             peft_config=LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA), callbacks=[Timer()])
        _keep_cpu_4bit_differentiable(trainer.model)  # the same bitsandbytes CPU workaround lora-dpo applies
        init = load_file(a.init_adapter)
        for name, p in trainer.model.named_parameters():  # lora-dpo's initial adapter, in fp32 like lora-dpo's
            if "lora_" in name:
                p.data = init[name].to(p.device, torch.float32)
        trainer.train()
        pairs = bench_pairs(a.model_dir, rows, trainer.processing_class)
    per_step = _step_tokens(a, pairs, order)
    return probe.result(a.batch, per_step)


# ---------------------------------------------------------------- orchestration


def prepare(a) -> None:
    """Resolve the model to a local directory; the first lora-dpo worker saves its seeded initial adapter there for
    TRL's workers to load (so no process loads the model only to make an adapter)."""
    a.model_dir = resolve_model(a.model)
    a.n_params = count_params(a.model_dir)
    a.init_adapter = str(Path(a.workdir) / "init_adapter.safetensors")


def resolve_model(name: str) -> str:
    """demo | llama3-8b-random | a local directory → a local Hugging Face directory."""
    from lora_dpo import model as M

    if name == "demo":
        return str(M.gguf_to_hf_dir(M.demo_gguf_path()))
    if name == "llama3-8b-random":
        return str(random_llama3_8b(Path(M.cache_dir()) / "bench-llama3-8b-random"))
    return name


def count_params(model_dir: str) -> int:
    """Parameters of the unquantized architecture (built on the meta device: no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
                   .parameters())


def mfu(n_params: int, tokens_per_s: float, device_name: str | None = None) -> str:
    """Model FLOPs utilisation: 6 × parameters × unique tokens / time / the card's peak dense bf16 FLOP/s."""
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return "n/a (CPU)"
        device_name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in device_name), None)
    return f"{6 * n_params * tokens_per_s / peak:.1%}" if peak else f"n/a ({device_name})"


def random_llama3_8b(path: Path) -> Path:
    """A randomly initialised model with Llama-3-8B's architecture (speed and memory only), saved once in bf16."""
    if (path / "config.json").is_file():
        return path
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_dpo.model import demo_gguf_path, gguf_to_hf_dir

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    print(f"building a random Llama-3-8B-shaped model into {path} (once) ...", flush=True)
    start = time.perf_counter()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    partial = path.with_name(path.name + ".partial")  # renamed when complete: an interrupted build is redone
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    del model
    if torch.cuda.is_available():  # the workers, not this parent process, should hold the GPU's memory
        torch.cuda.empty_cache()
    from transformers import AutoTokenizer  # any tokenizer whose ids fit the vocabulary; the demo's is offline

    tokenizer = os.environ.get("LORA_DPO_BENCH_TOKENIZER")  # a saved tokenizer dir (the GPU kit carries one)
    AutoTokenizer.from_pretrained(tokenizer or gguf_to_hf_dir(demo_gguf_path())).save_pretrained(partial)
    partial.rename(path)
    print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def run_worker(a, which: str, dataset: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--dataset", dataset, "--model-dir", a.model_dir,
           "--init-adapter", a.init_adapter, *a.worker_args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{which} worker failed on {dataset}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:]) | {"worker_seconds": time.perf_counter() - t0}


def dataset_rows(a, name: str) -> tuple[list[dict], list[int]]:
    """The rows, and the order both sides see them in: lora-dpo's first micro-batches (TRL runs them sequentially)."""
    from itertools import islice

    from lora_dpo.batching import micro_batch_indices, pair_len

    prompt = a.long_prompt if name == "long" else a.short_prompt
    rows = synthetic_rows(max(64, a.batch * a.steps), prompt, a.completion, seed=1 if name == "long" else 0)
    lengths = [pair_len(p) for p in bench_pairs(a.model_dir, rows)]
    batches = islice(micro_batch_indices(lengths, a.batch, 42, group_by_length=a.group), a.steps)
    return rows, [i for b in batches for i in b]


def padding(a, pairs: list, order: list[int], layout: str) -> float:
    """Share of padding among the tokens lora-dpo's forward runs on, over the timed steps."""
    from lora_dpo.batching import row_tokens

    steps = _step_batches(a, order)[a.warmup:]  # the timed steps
    distinct, total = row_tokens(pairs, steps, layout)
    return 1 - distinct / total


def work_ratio(a, pairs: list, order: list[int], layout: str) -> float:
    """Tokens TRL's forward runs on (prompt twice, chosen and rejected padded to the batch's longest) ÷ tokens
    lora-dpo's runs on, over the timed steps: the speed-up that fewer tokens alone would give."""
    from lora_dpo.batching import row_tokens

    steps = _step_batches(a, order)[a.warmup:]  # the timed steps
    return row_tokens(pairs, steps, "concatenated")[1] / row_tokens(pairs, steps, layout)[1]


def machine() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} CPU threads {torch.get_num_threads()}, " \
           f"{platform.python_version()}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="demo | llama3-8b-random | a local HF directory")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps (timed: warmup+1..steps)")
    p.add_argument("--short-prompt", type=int, default=24, help="words per prompt, short dataset")
    p.add_argument("--long-prompt", type=int, default=160, help="words per prompt, long dataset")
    p.add_argument("--completion", type=int, default=48, help="words per completion")
    p.add_argument("--layout", default="packed", choices=["packed", "shared", "concatenated"])
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa", "sdpa_causal", "flex_attention", "eager"],
                   help="lora-dpo's attention kernel, as model.attn_implementation (TRL runs sdpa, its default)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32"],
                   help="fp32: both trainers compute in fp32 on a GPU too (the losses must then agree as on a CPU)")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="lora-dpo with train.compile (TRL as it is)")
    p.add_argument("--trainers", default="ours,trl", choices=["ours,trl", "ours"],
                   help="ours alone: the GPU kit compares such a variant with an earlier stage's TRL run")
    p.add_argument("--offload", default="off", choices=["off", "embeddings", "activations", "both"],
                   help="lora-dpo's memory savers: model.offload_embeddings, train.offload_activations (needs "
                        "--checkpointing) or both (TRL has neither)")
    p.add_argument("--no-group", dest="group", action="store_false",
                   help="plainly shuffled batches instead of lora-dpo's default train.group_by_length (both sides get "
                        "the same order either way)")
    p.add_argument("--datasets", default="short,long")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--build-only", action="store_true", help="only resolve (build, for llama3-8b-random) the model")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--init-adapter", help=argparse.SUPPRESS)
    return p


# options only the controller reads; a worker gets every other option it was given (worker_args)
CONTROLLER_ONLY = {"help", "model", "repeats", "datasets", "json", "build_only", "worker", "dataset", "model_dir",
                   "init_adapter", "trainers"}


def worker_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> list[str]:
    """The options a worker must see, as command-line arguments: all of `a` but the controller's own — so a new
    option cannot be left behind (as --offload once was: its stage measured lora-dpo without offloading)."""
    args = []
    for act in p._actions:
        if act.dest in CONTROLLER_ONLY:
            continue
        value = getattr(a, act.dest)
        if act.nargs == 0:  # a flag: given only where it differs from its default
            args += [act.option_strings[0]] if value != act.default else []
        else:
            args += [act.option_strings[0], str(value)]
    return args


def main() -> None:
    p = parser()
    a = p.parse_args()
    a.worker_args = worker_args(p, a)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.offload in ("activations", "both") and not a.checkpointing:
        p.error(f"--offload {a.offload}: train.offload_activations moves what checkpointing keeps; add --checkpointing")
    if a.steps <= a.warmup:
        p.error(f"--steps {a.steps} leaves no timed step after --warmup {a.warmup}")
    Probe.warmup = a.warmup
    if a.worker:
        rows, order = dataset_rows(a, a.dataset)
        result = (worker_ours if a.worker == "ours" else worker_trl)(a, rows, order)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if a.build_only:
        print(resolve_model(a.model))
        return
    with tempfile.TemporaryDirectory() as tmp:
        a.workdir = tmp
        prepare(a)
        results: dict = {}
        for ds in a.datasets.split(","):
            for _ in range(a.repeats):
                for which in a.trainers.split(","):  # ours first: it saves the initial adapter TRL starts from
                    r = run_worker(a, which, ds)
                    results.setdefault(ds, {}).setdefault(which, []).append(r)
                    print(f"[{ds}] {which}: {r['pairs_per_s']:.3f} pairs/s, {r['tokens_per_s']:.0f} tok/s, "
                          f"peak {r['peak_bytes'] / 2**30:.2f} GiB, losses {[round(x, 4) for x in r['losses']]}"
                          + (f", {r['compiled_graphs']} compiled graphs" if r.get("compiled_graphs") else "")
                          + (" — flex_attention ran UNCOMPILED" if r.get("flex_uncompiled") else "")
                          + f"; worker {r['worker_seconds']:.0f} s: set-up {r['setup_seconds']:.0f} s, warm-up "
                            f"steps {r['warmup_seconds']:.0f} s, timed steps {sum(r['step_seconds']):.0f} s"
                          + (f"; host waiting for the GPU {waits(r)} of each timed step" if r.get("host_wait_shares")
                             else "")
                          + (f"; full garbage collections in timed steps {r['full_collections']}"
                             if r.get("full_collections") else "")
                          + (f"; {r['graphs_in_timed_steps']} graphs compiled in timed steps"
                             if r.get("graphs_in_timed_steps") else "")
                          + (f"; CUDA allocator in timed steps: {allocator(r)}" if r.get("allocator_in_timed_steps")
                             else ""),
                          flush=True)
                    write_json(a, results)  # after every worker: a run cut short by a time limit keeps what ran
    report(a, results)


def write_json(a, results: dict) -> None:
    """--json: the raw results so far, with the run's settings (replaced whole each time: never half-written)."""
    if not a.json:
        return
    import torch

    from lora_dpo.evaluate import write_json as save

    meta = {"machine": machine(), "cuda": torch.cuda.is_available(), "model": a.model, "n_params": a.n_params,
            "batch": a.batch, "steps": a.steps,
            "checkpointing": a.checkpointing, "grouped": a.group, "layout": a.layout, "attn": attention(a),
            "offload": a.offload, "compile": a.compile,
            "precision": a.precision,
            "command": sys.argv}
    save(Path(a.json), {"meta": meta, "results": results})


def attention(a) -> str:
    """The kernel lora-dpo trains with here (--attn auto resolved as lora-dpo resolves it)."""
    import torch

    from lora_dpo.attention import resolve_attention

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_attention(a.attn, device, a.layout)


def report(a, results: dict) -> None:
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    print(f"\nmachine: {machine()}\nmodel: {a.model} ({a.n_params / 1e6:.0f}M parameters), "
          f"batch {a.batch} pairs, {a.steps} steps (timed: {a.warmup + 1}..{a.steps}), "
          f"layout {a.layout}, lora-dpo attention {attention(a)} (TRL: sdpa), precision {a.precision}, "
          f"batches {'grouped by length' if a.group else 'shuffled'} (the same on both sides), "
          f"gradient checkpointing {'on' if a.checkpointing else 'off'}, lora-dpo offloading {a.offload}, "
          f"lora-dpo train.compile {'on' if a.compile else 'off'} (TRL: off), "
          f"{a.repeats} repeats\n")
    print("| data | TRL pairs/s | lora-dpo pairs/s | speed-up | TRL peak | lora-dpo peak | memory ratio | "
          "max |Δ loss| steps 1-3 | MFU TRL / lora-dpo | lora-dpo padding | tokens TRL / lora-dpo |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for ds, r in results.items():
        if not (r.get("trl") and r.get("ours")):  # --trainers ours: nothing to compare here (the GPU kit pairs it)
            notes.append(f"{ds}: only {' and '.join(k for k in r if r[k])} ran (--trainers)")
            continue
        t, o = r["trl"], r["ours"]
        dl = max(abs(x - y) for x, y in zip(t[0]["losses"][:3], o[0]["losses"][:3]))
        if "predicted_bytes" in o[0]:
            notes.append(f"{ds}: lora-dpo's peak predicted by `lora-dpo estimate` "
                         f"{o[0]['predicted_bytes'] / 2**30:.2f} GiB, measured {med(o, 'peak_bytes') / 2**30:.2f} GiB "
                         f"({o[0]['predicted_bytes'] / med(o, 'peak_bytes') - 1:+.0%})")
        print(f"| {ds} | {med(t, 'pairs_per_s'):.3f} | {med(o, 'pairs_per_s'):.3f} | "
              f"{med(o, 'pairs_per_s') / med(t, 'pairs_per_s'):.2f}× | {med(t, 'peak_bytes') / 2**30:.2f} GiB | "
              f"{med(o, 'peak_bytes') / 2**30:.2f} GiB | {med(o, 'peak_bytes') / med(t, 'peak_bytes'):.2f} | "
              f"{dl:.2e} | {mfu(a.n_params, med(t, 'tokens_per_s'))} / {mfu(a.n_params, med(o, 'tokens_per_s'))} | "
              f"{o[0]['padding']:.1%} | {o[0]['work_ratio']:.2f} |")

        if all(x.get("process_peak_bytes") for x in t + o) and "predicted_bytes" not in o[0]:  # a CPU
            notes.append(f"{ds}: whole-process peak RSS (load and the untimed first steps included): TRL "
                         f"{med(t, 'process_peak_bytes') / 2**30:.2f} GiB, lora-dpo "
                         f"{med(o, 'process_peak_bytes') / 2**30:.2f} GiB, ratio "
                         f"{med(o, 'process_peak_bytes') / med(t, 'process_peak_bytes'):.2f}")
        for name, side in (("TRL", t), ("lora-dpo", o)):
            if "step_seconds" in side[0]:
                notes.append(f"{ds}: {name}'s timed steps, s (tokens/s): " + ", ".join(
                    f"{s:.2f} ({n / s:.0f})" for s, n in zip(side[0]["step_seconds"], side[0]["step_tokens"])))
            if "full_collections" in side[0]:  # Python's full garbage collections that fell in a timed step
                notes.append(f"{ds}: {name}'s full garbage collections in timed steps, per repeat: " + "; ".join(
                    ", ".join(f"step {k} ({sec:.2f} s)" for k, sec in x["full_collections"]) or "none"
                    for x in side))
            if side[0].get("allocator_in_timed_steps"):  # new device memory, frees, retries (CUDA)
                notes.append(f"{ds}: {name}'s CUDA allocator in timed steps, per repeat: "
                             + "; ".join(allocator(x) for x in side))
    for note in notes:
        print("\n" + note)


if __name__ == "__main__":
    main()
