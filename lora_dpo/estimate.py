"""Memory planner: will this recipe fit on that GPU, and what to change if not. Reads the model's config only.

The peak is modelled as the sum of the parts below (bytes; b = bytes of the training dtype: 2 for bf16/fp16, 4 for
fp32; `precision: auto` is taken as bf16, i.e. a GPU). Every assumption is here so a GPU run can check it against
`torch.cuda.max_memory_allocated` (= `peak_memory_mb` in metrics.jsonl), which `Estimate.allocated` predicts.

weights      Parameters counted from the config: embeddings V·H, per layer q/k/v/o (GQA: k, v are H × kv_heads·d),
             gate/up/down, biases where the family has them, RMSNorms (2 or 4 per layer, per-head q/k norms for
             qwen3/gemma3), final norm, lm_head V·H unless tied. Decoder Linear layers in 4 bit (bitsandbytes NF4/FP4,
             blocksize 64): n/2 packed bytes + one absmax per 64 values (fp32, or with double quantization uint8 plus
             an fp32 absmax per 256 blocks, an offset and a 256-entry code), the 16-entry code; 8 bit: n + 4·out.
             Everything else (embeddings, norms, lm_head, biases) in the training dtype. model.offload_embeddings
             takes the V·H embedding table out (into CPU memory) unless the lm_head shares it (tied).
adapters     LoRA A (r × in) and B (out × r) on every targeted Linear ('all-linear' = every decoder Linear, not the
             lm_head), kept in fp32 by peft: 4 B/param, fp32 gradients 4 B, AdamW state 8 B (adamw_torch), or 8-bit
             state (bitsandbytes: 2 × 1 B + fp32 absmax per 256; tensors under 4096 values keep fp32 state).
activations  What autograd saves in the policy forward, per token per layer (the base is frozen, so a Linear saves
             its input only when LoRA targets it; each distinct input once; A = heads·d, K = kv_heads·d):
               each RMSNorm: an fp32 copy of its input + 1/rms, 4·H + 4 (the first layer's input norm saves nothing,
               the embeddings being frozen, and the final norm saves as much: layers × one layer in all);
               attention input b·H (if q/k/v targeted); SDPA: q, k, v, output (= o_proj's input) b·(2·A + 2·K) and
               an fp32 logsumexp 4·heads. With a mask (assumed: the concatenated layout pads, the shared/packed
               ones always pass a 4-D mask) transformers repeats k/v to A, and each layer's SDPA saves its own
               float copy of the boolean mask, rows·T²·b; eager attention saves q, k, v and the fp32 softmax
               (+ its 16-bit cast) rows·heads·T²·(4 [+ b]); flex_attention (block mask) has no T² term;
               sdpa_causal has no mask: its sdpa saves q, k, v (k, v repeated to A: the larger case; Ampere+ GPUs
               in 16 bit keep K) and the output over the pairs' gathered sequences, 2·batch × max_length tokens,
               b·4·A + 4·heads each, plus the output merged back into the rows (o_proj's input) if o_proj is
               targeted; the batch keeps two int64 gather indices (8 bytes per sequence and per row token);
               MLP input b·H (if gate/up targeted), gate, up and act(gate) 3·b·I, their product b·I (if down
               targeted); LoRA A's output b·r per targeted Linear; qwen3/gemma3 q/k norms 4·(A + K + heads + kv).
             tests/test_estimate.py checks this against the tensors autograd really saves (fp32, CPU, 4-bit and
             16-bit bases, with and without padding): equal to 0.3 % (RoPE's shared cos/sin are left out). On a GPU
             the same Python modules run; that the CUDA SDPA kernels save the same tensors is an assumption.
             With gradient checkpointing each layer keeps only its input, b·H per token, plus the final norm;
             with train.gradient_checkpointing_layers < 1 only the first ⌈share·layers⌉ do, the others save as
             without checkpointing.
             On top of the saved graph: one layer's activations as a transient (its gradients in backward, or the
             no-grad reference forward), two with checkpointing (the recomputed layer), and the largest quantized
             Linear dequantized to 16 bit (bitsandbytes' matmul).
log-prob     The completion hidden states gathered for the LM head (N·H·b, N = completion tokens) and one chunk of
             logits (lora_dpo.logps: chunk = min(256, N) tokens) at its backward peak: 16-bit logits + fp32
             logits, softmax and gradient, chunk·V·(b + 12).
overhead     A stated constant, OVERHEAD_BYTES = 1 GiB, for the CUDA context, cuBLAS workspaces and allocator
             fragmentation (not in max_memory_allocated). `Estimate.total` = allocated + overhead must fit.
shapes       Worst case: every row at max_length. Concatenated layout: 2·B rows of T = max_length (prompt +
             completion); prefix-shared (`shared`, and `packed`, whose rows hold one full-length pair each at the
             worst case): B rows of P + 2·(max_length − P); N = 2·B·(max_length − P), P = data.max_prompt_length.
             The reference forward is counted when dpo.reference is live and the loss needs one. Evaluation and
             the reference precompute pass run without grad and are assumed to peak lower.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import Recipe, checkpointed_layers

OVERHEAD_BYTES = 1 << 30
AUTO_SPARE = 0.10  # train.gradient_checkpointing_layers auto leaves this share of the GPU's memory unplanned
DEFAULT_GPU_BYTES = 16 << 30
LOGPS_CHUNK = 256  # lora_dpo.logps.DEFAULT_CHUNK (not imported: that pulls in torch; a test keeps them equal)
LAYOUTS = ("concatenated", "prefix-shared")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# model_type → (RMSNorms per layer, q/k/v bias rule, per-head q/k norms). Bias rule "config": attention_bias on
# q/k/v/o and mlp_bias on the MLP; "qkv": q/k/v always biased (qwen2); None: no biases.
FAMILIES = {
    "llama": (2, "config", False), "smollm3": (2, "config", False), "granite": (2, "config", False),
    "mistral": (2, None, False), "qwen2": (2, "qkv", False), "qwen3": (2, "config", True),
    "gemma": (2, "config", False), "gemma2": (4, "config", False), "gemma3_text": (4, "config", True),
}


@dataclass(frozen=True)
class Arch:
    """The shapes that memory depends on, read from a model config."""
    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    norms: int = 2
    qk_norm: bool = False
    bias: dict = field(default_factory=dict)  # Linear name → has a bias
    max_positions: int = 1 << 22               # the model's context: the longest max_length worth considering

    @classmethod
    def from_config(cls, config) -> Arch:
        mt = getattr(config, "model_type", "?")
        if mt not in FAMILIES:
            raise LoraDpoError(f"model.name_or_path: estimate models the {', '.join(sorted(FAMILIES))} families; "
                               f"'{mt}' is not one of them, so its memory cannot be predicted here")
        norms, rule, qk_norm = FAMILIES[mt]
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        attn_bias = bool(getattr(config, "attention_bias", False)) and rule == "config"
        mlp_bias = bool(getattr(config, "mlp_bias", False)) and rule == "config"
        bias = {n: attn_bias or (rule == "qkv" and n != "o_proj") for n in ATTN} | {n: mlp_bias for n in MLP}
        return cls(mt, config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   heads, getattr(config, "num_key_value_heads", None) or heads, head_dim,
                   bool(getattr(config, "tie_word_embeddings", False)), norms, qk_norm, bias,
                   getattr(config, "max_position_embeddings", None) or 1 << 22)

    def linears(self) -> dict[str, tuple[int, int]]:
        """Per decoder layer: Linear name → (in_features, out_features)."""
        H, A, K, F = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (H, A), "k_proj": (H, K), "v_proj": (H, K), "o_proj": (A, H),
                "gate_proj": (H, F), "up_proj": (H, F), "down_proj": (F, H)}

    def num_params(self) -> int:
        per_layer = sum(i * o + (o if self.bias.get(n) else 0) for n, (i, o) in self.linears().items())
        per_layer += self.norms * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * per_layer + self.hidden

    def lora_targets(self, target_modules) -> list[str]:
        if target_modules == "all-linear":
            return list(self.linears())
        targets = [t for t in target_modules if t in self.linears()]
        unknown = [t for t in target_modules if t not in self.linears()]
        if unknown:
            raise LoraDpoError(f"lora.target_modules: {unknown} are not Linear layers of a {self.model_type} decoder;"
                               f" use 'all-linear' or names from {list(self.linears())}")
        return targets

    def lora_params(self, r: int, target_modules) -> int:
        lin = self.linears()
        return self.layers * sum(r * (lin[n][0] + lin[n][1]) for n in self.lora_targets(target_modules))


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


# ---------------------------------------------------------------- the parts

def weight_bytes(arch: Arch, base: str, b: int, double_quant: bool = True) -> int:
    n_linear = 0
    out_features = 0
    for i, o in arch.linears().values():
        n_linear += i * o
        out_features += o
    n_linear, out_features = n_linear * arch.layers, out_features * arch.layers
    other = (arch.num_params() - n_linear) * b  # embeddings, norms, lm_head, biases: training dtype
    if base in ("nf4", "fp4"):
        per_layer = 0
        for i, o in arch.linears().values():
            blocks = math.ceil(i * o / 64)
            # double quantization: uint8 absmax, fp32 absmax per 256 blocks, offset, its own 256-value code
            absmax = blocks + 4 * math.ceil(blocks / 256) + 4 + 256 * 4 if double_quant else 4 * blocks
            per_layer += math.ceil(i * o / 2) + absmax + 16 * 4  # packed values, absmax, the 16-value code
        return other + arch.layers * per_layer
    if base == "int8":
        return other + n_linear + 4 * out_features
    return other + n_linear * b


def adapter_bytes(arch: Arch, r: int, target_modules, optim: str) -> int:
    """fp32 LoRA weights + fp32 gradients + optimizer state."""
    lin = arch.linears()
    total = 0
    for name in arch.lora_targets(target_modules):
        for n in (r * lin[name][0], r * lin[name][1]):  # A (r × in), B (out × r)
            if optim == "adamw_torch" or n < 4096:
                state = 8 * n
            else:
                state = 2 * n + 8 * math.ceil(n / 256)
            total += arch.layers * (8 * n + state)
    return total


def layer_activation_bytes(arch: Arch, rows: int, T: int, targets: list[str], r: int, b: int, *,
                           masked: bool, eager: bool = False, split: tuple[int, int] | None = None) -> int:
    """Bytes autograd saves in one decoder layer's forward (see the module docstring). split: sdpa_causal's
    (sequences, their length) when attention runs on the pairs' gathered sequences."""
    H, F, nh, nkv = arch.hidden, arch.intermediate, arch.heads, arch.kv_heads
    A, K = nh * arch.head_dim, nkv * arch.head_dim
    t = set(targets)
    per_tok = arch.norms * (4 * H + 4)
    if arch.qk_norm:
        per_tok += 4 * (A + K) + 4 * (nh + nkv)
    if t & {"q_proj", "k_proj", "v_proj"}:
        per_tok += b * H
    kv = 2 * A if masked or eager else 2 * K  # with a mask transformers repeats k/v to every head
    square = 0
    split_bytes = 0
    if split:  # sdpa_causal: q, k, v (repeated), output and logsumexp over the gathered sequences
        split_bytes = split[0] * split[1] * (b * 4 * A + 4 * nh)
        per_tok += b * A if "o_proj" in t else 0  # the output merged back into the rows
    elif eager:
        per_tok += b * (A + kv) + (b * A if "o_proj" in t else 0)  # q, k, v; o_proj's input is a fresh copy
        square = rows * nh * T * T * (4 if b == 4 else 4 + b)      # fp32 softmax (+ its 16-bit cast)
    else:
        per_tok += b * (2 * A + kv) + 4 * nh                        # q, k, v, output (= o_proj input), logsumexp
        square = rows * T * T * b if masked else 0                  # this layer's float copy of the mask
    if t & {"gate_proj", "up_proj"}:
        per_tok += b * H
    per_tok += b * F * (4 if "down_proj" in t else 3) + b * r * len(t)
    return rows * T * per_tok + square + split_bytes


def shapes(layout: str, batch: int, max_length: int, prompt: int) -> tuple[int, int, int]:
    """→ (rows, tokens per row, completion tokens) of a worst-case micro-batch."""
    prompt = min(prompt, max_length - 1)
    completion = max_length - prompt
    if layout == "concatenated":
        return 2 * batch, max_length, 2 * batch * completion
    if layout == "prefix-shared":
        return batch, prompt + 2 * completion, 2 * batch * completion
    raise LoraDpoError(f"layout '{layout}': expected one of {', '.join(LAYOUTS)}")


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
            print(f"model.name_or_path: the config of '{cfg.name_or_path}' is not reachable; planning with its "
                  "published shapes from lora-dpo's table", flush=True)
            return known
        raise LoraDpoError(f"model.name_or_path: cannot read the config of '{cfg.name_or_path}' "
                           f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); point it at a local "
                           "model directory or .gguf file (this machine may be offline)") from None


def gpu_memory_default() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "visible GPU"
    return DEFAULT_GPU_BYTES, "default"


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "kb": 10**3, "mb": 10**6,
          "gb": 10**9, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'16GiB' / '24GB' / '80G' / '16000MiB' → bytes (G and GiB are 2**30, GB is 10**9)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise LoraDpoError(f"--gpu-memory '{text}': expected a size like 16GiB, 24GB, 80G or 40000MiB")
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


def _parts(arch: Arch, recipe: Recipe, batch: int, max_length: int, layout: str, reference: str,
           ckpt_layers: int) -> dict:
    """ckpt_layers: how many decoder layers recompute in backward (0 = no checkpointing, arch.layers = all)."""
    q, lora, t = recipe.quantization, recipe.lora, recipe.train
    dtype = "bf16" if t.precision == "auto" else t.precision
    b = 4 if dtype == "fp32" else 2
    base = q.bnb_4bit_quant_type if q.load_in_4bit else "int8" if q.load_in_8bit else dtype
    # max_prompt_length null: prompts are not cut, so the worst case is the shortest prompt (most completion tokens)
    prompt = recipe.data.max_prompt_length if recipe.data.max_prompt_length is not None else 1
    rows, T, N = shapes(layout, batch, max_length, prompt)
    targets = arch.lora_targets(lora.target_modules)
    attn = recipe.model.attn_implementation
    if attn == "auto":
        attn = _auto_attention(layout)
    split = None  # sdpa_causal on prefix-shared rows: the pairs' 2·batch sequences of up to max_length tokens
    if attn == "sdpa_causal" and layout == "prefix-shared":
        split = shapes("concatenated", batch, max_length, prompt)[:2]
    layer = layer_activation_bytes(arch, rows, T, targets, lora.r, b, masked=attn != "flex_attention" and not split,
                                   eager=attn == "eager", split=split)
    residual = rows * T * arch.hidden * b
    # a checkpointed layer keeps only its input. The first layer's input norm saves nothing (frozen embeddings need
    # no gradient) and the final norm saves as much, so with the first layer kept whole they cancel out
    saved = (arch.layers - ckpt_layers) * layer
    if ckpt_layers:
        saved += ckpt_layers * residual + rows * T * (4 * arch.hidden + 4)
    if split:  # the gather indices, int64
        saved += 8 * (split[0] * split[1] + rows * T)
    elif attn != "flex_attention":  # the boolean mask, built once (padding / 4-D)
        saved += rows * T * T
    transient = layer * (2 if ckpt_layers else 1)  # recomputed layer (checkpointing) + its gradients
    if base != dtype:  # a quantized Linear is dequantized to 16 bit for its matmul, forward and backward
        transient += max(i * o for i, o in arch.linears().values()) * b
    chunk = min(LOGPS_CHUNK, N)
    logps = N * arch.hidden * b + chunk * arch.vocab * (b + 12)
    needs_reference = reference == "live" and recipe.dpo.loss_type != "simpo"
    if needs_reference:  # no-grad forward while the policy graph is alive: hidden states and one layer
        transient = max(transient, layer + 2 * residual)
    offload = recipe.model.offload_embeddings and not arch.tied  # a tied table stays: the LM head needs it
    weights = weight_bytes(arch, base, b, q.bnb_4bit_use_double_quant) - (arch.vocab * arch.hidden * b if offload
                                                                          else 0)
    return dict(dtype=dtype, base=base, attention=attn, rows=rows, seq_len=T, weights=weights,
                embeddings_on_cpu=offload, adapters=adapter_bytes(arch, lora.r, lora.target_modules, t.optim),
                activations=saved + transient, logps=logps)


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
                 reference: str | None = None, arch: Arch | None = None) -> Estimate:
    """Predict the peak memory of training `recipe`; reads the model config only (pass `arch` to skip even that).

    layout: "concatenated" or "prefix-shared" ("shared"; "packed" is estimated as shared: at the worst case every
    pair is full length and fills its row); default: the recipe's train.layout when the schema has it.
    reference: "live" (a no-grad reference forward each step) or "precompute" (cached log-probs); default: the
    recipe's dpo.reference when the schema has it, else "live".
    """
    layout = layout or getattr(recipe.train, "layout", "concatenated")
    layout = {"shared": "prefix-shared", "packed": "prefix-shared"}.get(layout, layout.replace("_", "-"))
    shapes(layout, 1, 2, 1)  # validates the layout name
    if reference is None:
        reference = getattr(recipe.dpo, "reference", "live")
    if reference not in ("live", "precompute"):
        raise LoraDpoError(f"reference '{reference}': expected live or precompute")
    arch = arch or Arch.from_config(load_config(recipe))
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
                   arch.lora_params(recipe.lora.r, recipe.lora.target_modules), layout=layout,
                   batch_size=t.per_device_train_batch_size, max_length=d.max_length,
                   gradient_checkpointing=t.gradient_checkpointing, layers=arch.layers, checkpointed_layers=ckpt,
                   checkpointing_auto=auto, overhead=OVERHEAD_BYTES,
                   gpu_memory=gpu_memory_bytes, gpu_memory_source=source, **parts)

    def fits(batch: int, length: int, ckpt_layers: int = ckpt) -> bool:
        return _total(_parts(arch, recipe, batch, length, layout, reference, ckpt_layers)) <= gpu_memory_bytes

    est.max_batch_size = _largest(lambda n: fits(n, d.max_length), 1, 1 << 16)
    longest = _largest(lambda n: fits(t.per_device_train_batch_size, n), 2, max(2, arch.max_positions))
    est.max_max_length = longest if longest >= 2 else 0
    est.advice = _advice(est, recipe, arch, layout, reference, fits)
    return est


def _advice(est: Estimate, recipe: Recipe, arch: Arch, layout: str, reference: str, fits) -> list[str]:
    t, d = recipe.train, recipe.data
    out = []
    if not t.gradient_checkpointing:
        alt = _parts(arch, recipe, t.per_device_train_batch_size, d.max_length, layout, reference, arch.layers)
        gc_batch = _largest(lambda n: fits(n, d.max_length, arch.layers), 1, 1 << 16)
        out.append(f"train.gradient_checkpointing=true: activations {gib(est.activations)} → "
                   f"{gib(alt['activations'])}, largest batch {est.max_batch_size} → {gc_batch} (~30% slower steps)")
    if t.gradient_checkpointing and est.fits and not est.checkpointing_auto:  # fewer recomputing = faster steps
        c = est.checkpointed_layers  # n - 1 layers kept whole (the search starts at 1)
        k = c + 1 - _largest(lambda n: fits(t.per_device_train_batch_size, d.max_length, c + 1 - n), 1, c + 1)
        if k == 0:
            out.append("train.gradient_checkpointing=false: it fits without checkpointing (~30% faster steps)")
        elif k < est.checkpointed_layers:
            out.append(f"train.gradient_checkpointing_layers={k / arch.layers:.3g}: {k} of {arch.layers} layers "
                       f"recompute instead of {est.checkpointed_layers} and it still fits (faster steps)")
    if t.optim == "adamw_torch" and est.lora_params:
        saved = est.adapters - adapter_bytes(arch, recipe.lora.r, recipe.lora.target_modules, "paged_adamw_8bit")
        out.append(f"train.optim=paged_adamw_8bit: saves {gib(saved)} of optimizer state (LoRA state is small)")
    if not est.fits and not est.embeddings_on_cpu and not arch.tied:
        table = arch.vocab * arch.hidden * (4 if est.dtype == "fp32" else 2)
        out.append(f"model.offload_embeddings=true: the {gib(table)} embedding table moves to CPU memory")
    if not est.fits and est.max_batch_size >= 1:
        pairs = t.per_device_train_batch_size * t.gradient_accumulation_steps
        b = est.max_batch_size
        out.append(f"train.per_device_train_batch_size={b} with train.gradient_accumulation_steps="
                   f"{math.ceil(pairs / b)} keeps ~{pairs} pairs per optimizer step and fits")
    if not est.fits and est.max_batch_size < 1:
        out.append(f"even one pair does not fit at data.max_length={d.max_length}; lower it (largest that fits at "
                   f"this batch: {est.max_max_length or 'none'}) or use a GPU with more memory")
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
             f"micro-batch: {est.batch_size} pairs × max_length {est.max_length} = {est.rows} rows × "
             f"{est.seq_len} tokens ({est.layout} layout, {est.attention} attention)", ""]
    lines += [f"  {name:<48} {gib(n):>12}" for name, n in rows]
    lines += [f"  {'total':<48} {gib(est.total):>12}",
              f"  {'GPU memory':<48} {gib(est.gpu_memory):>12}{note}", "",
              f"{'fits' if est.fits else 'does NOT fit'}: predicted peak {gib(est.total)} of {gib(est.gpu_memory)}",
              f"largest per_device_train_batch_size at max_length {est.max_length}: {est.max_batch_size}",
              f"largest max_length at per_device_train_batch_size {est.batch_size}: {est.max_max_length}"]
    lines += [f"  try {a}" for a in est.advice]
    return "\n".join(lines)


def format_json(est: Estimate) -> str:
    return json.dumps(est.to_dict(), indent=1)


def run(recipe: Recipe, gpu_memory: str | None = None, layout: str | None = None, as_json: bool = False) -> str:
    est = estimate_for(recipe, None if gpu_memory is None else parse_size(gpu_memory), layout=layout)
    return format_json(est) if as_json else format_table(est)

