"""Memory planner: will this recipe fit on that GPU, and what to change if not. Reads the model's config only.

The peak is the sum of the parts that lora_dpo/memory_model.py documents and computes (weights, adapters and
optimizer state, activations, the log-prob path, a stated overhead); here they are put together for a recipe's
worst-case micro-batch (`_parts`), the largest batch and sequence length that fit are searched, and the advice
for a recipe that does not fit is written. `Estimate.allocated` predicts `torch.cuda.max_memory_allocated`
(= `peak_memory_mb` in metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_dpo import prequantized
from lora_dpo.batching import pair_len
from lora_dpo.errors import LoraDpoError
from lora_dpo.memory_model import (  # noqa: F401 — Arch, the formulas: part of this module's API
    LAYOUTS,
    Arch,
    adapter_bytes,
    layer_activation_bytes,
    shapes,
    weight_bytes,
)
from lora_dpo.recipe import Recipe, checkpointed_layers

OVERHEAD_BYTES = 1 << 30
AUTO_SPARE = 0.10  # train.gradient_checkpointing_layers auto leaves this share of the GPU's memory unplanned
DEFAULT_GPU_BYTES = 16 << 30
LOGPS_CHUNK = 256  # lora_dpo.logps.DEFAULT_CHUNK (not imported: that pulls in torch; a test keeps them equal)


@dataclass
class Estimate:
    """Predicted peak GPU memory of one training step, in bytes, and what fits."""
    model: str
    model_type: str
    params: int
    lora_params: int
    dtype: str
    base: str                   # "nf4" | "fp4" | "int8" | the dtype
    layout: str
    attention: str              # the kernel planned for (attn_implementation auto resolved)
    batch_size: int             # pairs per micro-batch
    max_length: int
    max_prompt_length: int | None
    rows: int
    seq_len: int
    gradient_checkpointing: bool
    weights: int
    adapters: int               # adapters + gradients + optimizer state
    activations: int
    logps: int
    overhead: int
    gpu_memory: int
    gpu_memory_source: str      # "--gpu-memory" | "visible GPU" | "default"
    max_batch_size: int = 0     # at max_length; 0 = not even one pair fits
    max_max_length: int = 0     # at batch_size; 0 = nothing fits
    layers: int = 0             # decoder layers
    checkpointed_layers: int = 0  # of them, those that recompute in backward
    checkpointing_auto: bool = False  # train.gradient_checkpointing_layers auto chose checkpointed_layers
    embeddings_on_cpu: bool = False  # model.offload_embeddings (and the table is not tied to the LM head)
    sliding_window: int | None = None  # set when a pair outgrows the model's sliding window: concatenated layout
    data_pairs: int | None = None     # --data: planned for these many tokenised training pairs' longest rows
    data_longest: int | None = None   # the longest pair's prompt + chosen + rejected tokens
    # the same micro-batch with 1-token prompts, whose answers keep max_length − 1 tokens each: the longest rows
    # truncation allows (set when they are longer than the planned ones)
    short_prompt_seq_len: int | None = None
    short_prompt_total: int | None = None
    short_prompt_layers: int | None = None  # what auto would recompute for them
    advice: list[str] = field(default_factory=list)

    @property
    def allocated(self) -> int:
        """Comparable with torch.cuda.max_memory_allocated (metrics.jsonl peak_memory_mb)."""
        return self.weights + self.adapters + self.activations + self.logps

    @property
    def total(self) -> int:
        return self.allocated + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    def to_dict(self) -> dict:
        return asdict(self) | {"allocated": self.allocated, "total": self.total, "fits": self.fits}


# ---------------------------------------------------------------- reading the recipe

def load_config(recipe: Recipe):
    """The model's config (no weights): a local directory, a .gguf file's metadata, or a hub id."""
    from transformers import AutoConfig

    from lora_dpo.model import resolve_source

    cfg = recipe.model
    src = resolve_source(cfg)
    try:
        if src.kind == "gguf":
            path = Path(src.path)
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        kwargs = {"revision": src.revision} if src.revision else {}
        return AutoConfig.from_pretrained(src.path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        from lora_dpo.known_models import known_config

        known = known_config(src.path) if src.kind == "hub" else None
        if known is not None:
            # on stderr: stdout is the estimate itself (--json must stay parseable)
            print(f"model.name_or_path: the config of '{cfg.name_or_path}' is not reachable; planning with its "
                  "published shapes from lora-dpo's table", file=sys.stderr, flush=True)
            return known
        raise LoraDpoError(f"model.name_or_path: cannot read the config of '{cfg.name_or_path}' "
                           f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); point it at a local "
                           "model directory or .gguf file (this machine may be offline)") from None


def gpu_memory_default() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "visible GPU"
    return DEFAULT_GPU_BYTES, "default"


_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "kb": 10**3, "mb": 10**6,
          "gb": 10**9, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'16GiB' / '24GB' / '80G' / '16000MiB' → bytes (G and GiB are 2**30, GB is 10**9)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m and unit == "":  # a bare 16 would be 16 bytes: almost surely meant as GiB, so ask rather than guess
        raise LoraDpoError(f"--gpu-memory '{text}': give a unit, e.g. {m.group(1)}GiB (or GB, MiB)")
    if not m or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1 << 20:
        raise LoraDpoError(f"--gpu-memory '{text}': expected a size of at least 1 MiB, like 16GiB, 24GB, 80G or "
                           "40000MiB")
    return int(float(m.group(1)) * _UNITS[unit])


# ---------------------------------------------------------------- the estimate

def _auto_attention(layout: str) -> str:
    """The kernel attn_implementation auto trains with on the visible GPU, for an estimate's layout (concatenated or
    prefix-shared); sdpa when planning for a GPU not here (its dense mask is the larger of the two)."""
    import torch

    from lora_dpo.attention import resolve_attention

    if not torch.cuda.is_available():
        return "sdpa"
    return resolve_attention("auto", torch.device("cuda"), "shared" if layout == "prefix-shared" else layout)


def _value_bytes(dtype: str) -> int:
    """Bytes of one value in the training dtype ('fp32', 'bf16', 'fp16')."""
    return 4 if dtype == "fp32" else 2


def _parts(arch: Arch, recipe: Recipe, batch: int, max_length: int, layout: str, reference: str,
           ckpt_layers: int) -> dict:
    """ckpt_layers: how many decoder layers recompute in backward (0 = no checkpointing, arch.layers = all)."""
    q, lora, t = recipe.quantization, recipe.lora, recipe.train
    dtype = "bf16" if t.precision == "auto" else t.precision
    b = _value_bytes(dtype)
    base = q.bnb_4bit_quant_type if q.load_in_4bit else "int8" if q.load_in_8bit else dtype
    # max_prompt_length null: prompts are not cut, so the worst case is the shortest prompt (most completion tokens)
    prompt = recipe.data.max_prompt_length if recipe.data.max_prompt_length is not None else 1
    window = None  # like batching.resolve_layout: a pair longer than a sliding window trains concatenated
    if layout == "prefix-shared" and arch.sliding_window and shapes(layout, batch, max_length, prompt)[1] > \
            arch.sliding_window:
        layout, window = "concatenated", arch.sliding_window
    rows, T, N = shapes(layout, batch, max_length, prompt)
    targets = arch.lora_targets(lora.target_modules)
    attn = recipe.model.attn_implementation
    if attn == "auto":
        attn = _auto_attention(layout)
    split = None  # sdpa_causal on prefix-shared rows: the pairs' 2·batch sequences of up to max_length tokens
    if attn == "sdpa_causal" and layout == "prefix-shared":
        split = shapes("concatenated", batch, max_length, prompt)[:2]
    layer = layer_activation_bytes(arch, rows, T, targets, lora.r, b, masked=attn != "flex_attention" and not split,
                                   eager=attn == "eager", split=split, dropout=lora.lora_dropout > 0)
    residual = rows * T * arch.hidden * b
    # a checkpointed layer keeps only its input. The first layer's input norm saves nothing (frozen embeddings need
    # no gradient) and the final norm saves as much, so with the first layer kept whole they cancel out
    saved = (arch.layers - ckpt_layers) * layer
    if ckpt_layers:  # each checkpointed layer's input (in CPU memory with train.offload_activations, but for the
        # one fetched back ahead of its layer's backward) + final norm
        saved += (residual if t.offload_activations else ckpt_layers * residual) + rows * T * (4 * arch.hidden + 4)
    if split:  # the gather indices, int64
        saved += 8 * (split[0] * split[1] + rows * T)
    elif attn != "flex_attention":  # the boolean mask, built once (padding / 4-D)
        saved += rows * T * T
    transient = layer * (2 if ckpt_layers else 1)  # recomputed layer (checkpointing) + its gradients
    if base != dtype:  # a quantized Linear is dequantized to 16 bit for its matmul, forward and backward
        transient += max(i * o for i, o in arch.linears().values()) * b
    chunk = min(LOGPS_CHUNK, N)
    # logps._grad_in_forward: fp32/bf16 chunks work in place beside logsumexp's temporary; fp16 recomputes in
    # backward, whose peak holds the fp32 logits and three fp32 temporaries of logsumexp's backward (+ the tanh)
    per_logit = (16 if dtype == "fp16" else 8) + (4 if arch.softcap else 0)
    logps = 2 * N * arch.hidden * b + chunk * arch.vocab * per_logit
    needs_reference = reference == "live" and recipe.dpo.loss_type != "simpo"
    activations = saved + transient
    if needs_reference:  # its no-grad forward runs before the policy's (objective.py), alone: hidden states, a layer
        activations = max(activations, layer + 2 * residual)
    offload = recipe.model.offload_embeddings and not arch.tied  # a tied table stays: the LM head needs it
    weights = weight_bytes(arch, base, b, q.bnb_4bit_use_double_quant) - (arch.vocab * arch.hidden * b if offload
                                                                          else 0)
    return dict(dtype=dtype, base=base, attention=attn, layout=layout, sliding_window=window, rows=rows, seq_len=T,
                weights=weights,
                embeddings_on_cpu=offload, adapters=adapter_bytes(arch, lora.r, lora.target_modules, t.optim),
                activations=activations, logps=logps)


def _total(parts: dict) -> int:
    return parts["weights"] + parts["adapters"] + parts["activations"] + parts["logps"] + OVERHEAD_BYTES


def _largest(fits, lo: int, cap: int) -> int:
    """Largest n in [lo, cap] with fits(n), given fits is monotone (True then False); lo - 1 when none."""
    if not fits(lo):
        return lo - 1
    hi = lo
    while hi < cap and fits(min(cap, hi * 2)):
        hi = min(cap, hi * 2)
    bad = min(cap, hi * 2) + 1 if hi < cap else cap + 1
    while bad - hi > 1:
        mid = (hi + bad) // 2
        hi, bad = (mid, bad) if fits(mid) else (hi, mid)
    return hi


def estimate_for(recipe: Recipe, gpu_memory_bytes: int | None = None, layout: str | None = None,
                 reference: str | None = None, arch: Arch | None = None, short_prompt_rows: bool = False) -> Estimate:
    """Predict the peak memory of training `recipe`; reads the model config only (pass `arch` to skip even that).

    layout: "concatenated" or "prefix-shared" ("shared"; "packed" is estimated as shared: at the worst case every
    pair is full length and fills its row); default: the recipe's train.layout when the schema has it.
    reference: "live" (a no-grad reference forward each step) or "precompute" (cached log-probs); default: the
    recipe's dpo.reference when the schema has it, else "live".
    short_prompt_rows: also predict rows of 1-token prompts with full answers (est.short_prompt_*), which the
    recipe's worst case does not plan (`lora-dpo estimate` prints them; training plans from its data instead).
    """
    layout = layout or getattr(recipe.train, "layout", "concatenated")
    layout = {"shared": "prefix-shared", "packed": "prefix-shared"}.get(layout, layout.replace("_", "-"))
    shapes(layout, 1, 2, 1)  # validates the layout name
    if reference is None:
        reference = getattr(recipe.dpo, "reference", "live")
    if reference not in ("live", "precompute"):
        raise LoraDpoError(f"reference '{reference}': expected live or precompute")
    if arch is None:
        config = load_config(recipe)
        recipe = as_stored(recipe, prequantized.stored(config))
        arch = Arch.from_config(config)
    source = "--gpu-memory"
    if gpu_memory_bytes is None:
        gpu_memory_bytes, source = gpu_memory_default()
    t, d = recipe.train, recipe.data
    ckpt = checkpointed_layers(t.gradient_checkpointing, t.gradient_checkpointing_layers, arch.layers)
    auto = t.gradient_checkpointing and t.gradient_checkpointing_layers == "auto"
    if auto:  # the fewest recomputing layers that fit with AUTO_SPARE of the memory left over (all if none fit)
        budget = (1 - AUTO_SPARE) * gpu_memory_bytes
        ckpt = next((k for k in range(1, arch.layers + 1) if _total(_parts(
            arch, recipe, t.per_device_train_batch_size, d.max_length, layout, reference, k)) <= budget), arch.layers)
    parts = _parts(arch, recipe, t.per_device_train_batch_size, d.max_length, layout, reference, ckpt)
    est = Estimate(recipe.model.name_or_path, arch.model_type, arch.num_params(),
                   arch.lora_params(recipe.lora.r, recipe.lora.target_modules),
                   batch_size=t.per_device_train_batch_size, max_length=d.max_length,
                   max_prompt_length=d.max_prompt_length,
                   gradient_checkpointing=t.gradient_checkpointing, layers=arch.layers, checkpointed_layers=ckpt,
                   checkpointing_auto=auto, overhead=OVERHEAD_BYTES,
                   gpu_memory=gpu_memory_bytes, gpu_memory_source=source, **parts)

    # auto resolves the layers again for another batch or length (at training time): a candidate fits when it fits
    # with all of them recomputing (auto takes all when fewer do not fit with the spare)
    search_ckpt = arch.layers if auto else ckpt

    def fits(batch: int, length: int, ckpt_layers: int = search_ckpt) -> bool:
        return _total(_parts(arch, recipe, batch, length, layout, reference, ckpt_layers)) <= gpu_memory_bytes

    est.max_batch_size = _largest(lambda n: fits(n, d.max_length), 1, 1 << 16)
    shortest = _shortest_max_length(recipe)  # data.max_prompt_length must stay below data.max_length
    longest = _largest(lambda n: fits(t.per_device_train_batch_size, n), shortest, max(shortest, arch.max_positions))
    est.max_max_length = longest if longest >= shortest else 0
    est.advice = _advice(est, recipe, arch, layout, reference, fits)
    if short_prompt_rows and d.max_prompt_length is not None and d.max_prompt_length > 1:
        short = estimate_for(dataclasses.replace(recipe, data=dataclasses.replace(d, max_prompt_length=1)),
                             gpu_memory_bytes, layout, reference, arch)
        if short.seq_len > est.seq_len and short.total > est.total:  # longer rows (not the concatenated layout)
            est.short_prompt_seq_len, est.short_prompt_total = short.seq_len, short.total
            est.short_prompt_layers = short.checkpointed_layers if auto else None
    return est


def as_stored(recipe: Recipe, stored: dict | None) -> Recipe:
    """The recipe as a checkpoint stored already quantized (`stored`, its quantization_config) trains it: its own
    quant type and double quantization (0.4 bit per weight), whatever the recipe says; keys it cannot apply at all
    raise (lora_dpo/prequantized.py)."""
    q = recipe.quantization
    prequantized.check(recipe.model.name_or_path, stored, q)
    if not stored or not q.load_in_4bit:
        return recipe
    q = dataclasses.replace(q, bnb_4bit_quant_type=prequantized.quant_type(stored, q),
                            bnb_4bit_use_double_quant=bool(stored.get("bnb_4bit_use_double_quant", False)))
    return dataclasses.replace(recipe, quantization=q)


def for_data(recipe: Recipe, pairs: list) -> Recipe:
    """The recipe with data.max_length / max_prompt_length set so that the planner's worst-case micro-batch is the
    worst the tokenised `pairs` can make: rows as long as the longest [prompt | chosen | rejected] and completions as
    long as the longest chosen + rejected. Training's `gradient_checkpointing_layers: auto` plans with it, since the
    recipe's own worst case (prompts of max_prompt_length) is not the longest row: truncation lets a short prompt
    keep answers of up to max_length − prompt tokens each, and such pairs make rows of up to 2·max_length − 1."""
    if not pairs:
        return recipe
    row = max(pair_len(p) for p in pairs)
    half = max(1, math.ceil(max(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / 2))
    length = max(row - half, half + 1)  # shapes(): rows of 2·length − prompt tokens, 2·(length − prompt) scored
    data = dataclasses.replace(recipe.data, max_length=length, max_prompt_length=length - half)
    return dataclasses.replace(recipe, data=data)


def _shortest_max_length(recipe: Recipe) -> int:
    """The shortest data.max_length the recipe accepts (it must exceed data.max_prompt_length; 2 tokens at least)."""
    prompt = recipe.data.max_prompt_length
    return max(2, prompt + 1 if prompt is not None else 2)


def share_of_layers(k: int, layers: int) -> str:
    """train.gradient_checkpointing_layers as written for k of `layers` recomputing: the shortest decimal that
    recipe.checkpointed_layers maps back to exactly k (3 digits can round 7/32 up to 0.219, which is 8 layers)."""
    for digits in range(3, 18):
        text = f"{k / layers:.{digits}g}"
        if checkpointed_layers(True, float(text), layers) == k:
            return text
    return repr(k / layers)


def _advice(est: Estimate, recipe: Recipe, arch: Arch, layout: str, reference: str, fits) -> list[str]:
    t, d = recipe.train, recipe.data
    out = []
    if not t.gradient_checkpointing:  # as it would run: the recipe's share of the layers (all with auto)
        on = checkpointed_layers(True, t.gradient_checkpointing_layers, arch.layers)
        alt = _parts(arch, recipe, t.per_device_train_batch_size, d.max_length, layout, reference, on)
        gc_batch = _largest(lambda n: fits(n, d.max_length, on), 1, 1 << 16)
        out.append(f"train.gradient_checkpointing=true: activations {gib(est.activations)} → "
                   f"{gib(alt['activations'])}, largest batch {est.max_batch_size} → {gc_batch} (~30% slower steps)")
    if t.gradient_checkpointing and not est.checkpointing_auto:
        c, L = est.checkpointed_layers, arch.layers
        if est.fits:  # fewer recomputing = faster steps; n - 1 layers kept whole (the search starts at 1)
            k = c + 1 - _largest(lambda n: fits(t.per_device_train_batch_size, d.max_length, c + 1 - n), 1, c + 1)
        else:  # more recomputing = less memory: the fewest above c that fit, if any
            k = next((k for k in range(c + 1, L + 1) if fits(t.per_device_train_batch_size, d.max_length, k)), c)
        if k == 0:
            out.append("train.gradient_checkpointing=false: it fits without checkpointing (~30% faster steps)")
        elif k != c:
            out.append(f"train.gradient_checkpointing_layers={share_of_layers(k, L)}: {k} of {L} layers "
                       f"recompute instead of {c} and it " + ("still fits (faster steps)" if k < c else "fits"))
    if not est.fits and recipe.lora.lora_dropout > 0:  # each adapted Linear keeps its dropout mask
        plain = dataclasses.replace(recipe, lora=dataclasses.replace(recipe.lora, lora_dropout=0.0))
        alt = _parts(arch, plain, t.per_device_train_batch_size, d.max_length, layout, reference,
                     est.checkpointed_layers)
        out.append(f"lora.lora_dropout=0: activations {gib(est.activations)} → {gib(alt['activations'])} (each "
                   "adapted Linear keeps a 1-byte dropout mask per input value for backward)")
    if t.optim == "adamw_torch" and est.lora_params:
        saved = est.adapters - adapter_bytes(arch, recipe.lora.r, recipe.lora.target_modules, "paged_adamw_8bit")
        out.append(f"train.optim=paged_adamw_8bit: saves {gib(saved)} of optimizer state (LoRA state is small)")
    if not est.fits and not est.embeddings_on_cpu and not arch.tied:
        table = arch.vocab * arch.hidden * _value_bytes(est.dtype)
        out.append(f"model.offload_embeddings=true: the {gib(table)} embedding table moves to CPU memory")
    if not est.fits and t.gradient_checkpointing and not t.offload_activations and est.checkpointed_layers:
        rows, T, _ = shapes(est.layout, t.per_device_train_batch_size, d.max_length,
                            d.max_prompt_length if d.max_prompt_length is not None else 1)
        inputs = (est.checkpointed_layers - 1) * rows * T * arch.hidden * _value_bytes(est.dtype)  # one stays
        out.append(f"train.offload_activations=true: the {gib(inputs)} of layer inputs checkpointing keeps move to "
                   "CPU memory")
    if not est.fits and est.max_batch_size >= 1:
        pairs = t.per_device_train_batch_size * t.gradient_accumulation_steps
        b = est.max_batch_size
        n = math.ceil(pairs / b)
        out.append(f"train.per_device_train_batch_size={b} with train.gradient_accumulation_steps={n}: "
                   + (f"still {pairs} pairs per optimizer step" if n * b == pairs else
                      f"{n * b} pairs per optimizer step (now {pairs})") + ", and it fits")
    if not est.fits and est.max_batch_size < 1:
        shortest = _shortest_max_length(recipe)
        one = _largest(lambda n: fits(1, n), shortest, max(shortest, d.max_length - 1))  # one pair, shorter
        if est.max_max_length:
            out.append(f"data.max_length={est.max_max_length}: even one pair does not fit at data.max_length="
                       f"{d.max_length}, and this is the longest that fits at this batch")
        elif one >= shortest:
            out.append(f"train.per_device_train_batch_size=1 with data.max_length={one}: even one pair does not fit "
                       f"at data.max_length={d.max_length}, and this is the longest one pair fits")
        else:  # not even one short pair with the layers recomputing as set: with all of them, if anything
            one = _largest(lambda n: fits(1, n, arch.layers), shortest, max(shortest, d.max_length))
            if one >= shortest:
                out.append(f"train.gradient_checkpointing=true with train.gradient_checkpointing_layers=1, "
                           f"train.per_device_train_batch_size=1 and data.max_length={one}: only then does one pair "
                           "fit")
            else:
                floor = _total(_parts(arch, recipe, 1, shortest, layout, reference, arch.layers))
                out.append(f"a GPU with more memory: even one pair at data.max_length={shortest}, with every layer "
                           f"recomputing, predicts {gib(floor)} of {gib(est.gpu_memory)}")
    return out


# ---------------------------------------------------------------- output

def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_table(est: Estimate) -> str:
    ckpt = "gradient checkpointing off" if not est.gradient_checkpointing else "gradient checkpointing on" \
        if est.checkpointed_layers >= est.layers else f"checkpointing {est.checkpointed_layers}/{est.layers} layers"
    if est.checkpointing_auto:
        ckpt += ", auto"
    rows = [
        (f"weights ({est.base} linears; embeddings on CPU)" if est.embeddings_on_cpu
         else f"weights ({est.base} linears, {est.dtype} embeddings/norms)", est.weights),
        ("adapters + grads + optimizer", est.adapters),
        (f"activations ({ckpt})", est.activations),
        ("log-prob path (chunked LM head)", est.logps),
        ("CUDA/framework overhead (constant)", est.overhead),
    ]
    note = {"default": " — no GPU visible, assumed; pass --gpu-memory", "visible GPU": " (the visible GPU)",
            "--gpu-memory": ""}[est.gpu_memory_source]
    lines = [f"{est.model} ({est.model_type}, {est.params / 1e6:,.1f}M parameters; LoRA {est.lora_params:,} "
             f"trainable), {est.dtype}",
             f"micro-batch: {est.batch_size} pair{'s' * (est.batch_size != 1)} × "
             + (f"the longest of the {est.data_pairs:,} training pairs ({est.data_longest} tokens)"
                if est.data_pairs else f"max_length {est.max_length}") + " = "
             f"{est.rows} row{'s' * (est.rows != 1)} × "
             f"{est.seq_len} tokens ({est.layout} layout"
             + (f": a pair outgrows the model's {est.sliding_window}-token sliding window" if est.sliding_window
                else "") + f", {est.attention} attention)", ""]
    lines += [f"  {name:<48} {gib(n):>12}" for name, n in rows]
    lines += [f"  {'total':<48} {gib(est.total):>12}",
              f"  {'GPU memory':<48} {gib(est.gpu_memory):>12}{note}", "",
              f"{'fits' if est.fits else 'does NOT fit'}: predicted peak {gib(est.total)} of {gib(est.gpu_memory)}",
              f"largest per_device_train_batch_size at max_length {est.max_length}: {est.max_batch_size}",
              f"largest max_length at per_device_train_batch_size {est.batch_size}: "
              + (str(est.max_max_length) if est.max_max_length or est.max_prompt_length is None else
                 f"none above data.max_prompt_length {est.max_prompt_length}")]
    if est.data_pairs:  # lengths planned from the data: the max_length lines would speak of a stand-in length
        lines[-2:] = [f"largest per_device_train_batch_size for these pairs: {est.max_batch_size}"]
    lines += [f"  try {a}" for a in est.advice]
    if est.short_prompt_total:
        layers = "" if est.short_prompt_layers is None else \
            f" with {est.short_prompt_layers} of {est.layers} layers recomputing (auto)"
        lines.append(f"pairs with shorter prompts keep longer answers (max_length − prompt tokens each): rows of up to "
                     f"{est.short_prompt_seq_len} tokens predict {gib(est.short_prompt_total)}{layers}"
                     + ("" if est.short_prompt_total <= est.gpu_memory else ", which does NOT fit")
                     + (" (training's auto checkpointing plans for the data's own longest pairs)"
                        if est.checkpointing_auto else " (`lora-dpo inspect` shows the data's token lengths)"))
    return "\n".join(lines)


def format_json(est: Estimate) -> str:
    return json.dumps(est.to_dict(), indent=1)


def run(recipe: Recipe, gpu_memory: str | None = None, layout: str | None = None, as_json: bool = False,
        with_data: bool = False) -> str:
    if recipe.train.device == "cpu":  # a GPU plan (bf16, CUDA overhead) would answer a question nobody asked
        raise LoraDpoError("train.device: cpu trains in fp32 in CPU memory, which estimate does not plan; it plans a "
                           "GPU run: add train.device=auto (or cuda) to plan this recipe for one")
    gpu = None if gpu_memory is None else parse_size(gpu_memory)
    if not with_data:
        return (format_json if as_json else format_table)(estimate_for(recipe, gpu, layout=layout,
                                                                       short_prompt_rows=True))
    pairs = training_pairs(recipe)
    est = estimate_for(for_data(recipe, pairs), gpu, layout=layout)
    est.data_pairs = len(pairs)
    est.data_longest = max(pair_len(p) for p in pairs)
    est.advice = [a for a in est.advice if "data.max_length=" not in a]  # a stand-in length, not the recipe's
    return (format_json if as_json else format_table)(est)


def training_pairs(recipe: Recipe) -> list:
    """The tokenised training pairs, as training makes them (the tokenizer only: no weights are read)."""
    from lora_dpo import data as data_lib
    from lora_dpo.data_inspect import load_tokenizer_only

    train_rows, eval_rows = data_lib.read_data(recipe.data)
    prepared = data_lib.prepare(recipe.data, load_tokenizer_only(recipe.model), train_rows, eval_rows,
                                say=lambda *_: None, check=False)
    return prepared.train_pairs

