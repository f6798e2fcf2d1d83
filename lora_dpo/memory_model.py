"""The memory model behind `lora-dpo estimate`: a model's shapes (`Arch`, from its config) and the bytes of each
part of a training step's peak. lora_dpo/estimate.py composes them for a recipe and plans with them.

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
               each RMSNorm: its input + 1/rms, b·H + 4 (lora_dpo/rmsnorm.py; families whose norm reads otherwise,
               Gemma's, keep an fp32 copy, 4·H + 4) (the first layer's input norm saves nothing, the embeddings
               being frozen, and the final norm saves as much: layers × one layer in all);
               attention input b·H (if q/k/v targeted); SDPA: q, k, v, output (= o_proj's input) b·(2·A + 2·K) and
               an fp32 logsumexp 4·heads. With a mask (assumed: the concatenated layout pads, the shared/packed
               ones always pass a 4-D mask) transformers repeats k/v to A, and each layer's SDPA saves its own
               float copy of the boolean mask, rows·T²·b; eager attention saves q, k, v and the fp32 softmax
               (+ its 16-bit cast) rows·heads·T²·(4 [+ b]); flex_attention (block mask) has no T² term;
               sdpa_causal has no mask: its sdpa saves q, k, v (k, v repeated to A: the larger case; Ampere+ GPUs
               in 16 bit keep K) and the output over the pairs' gathered sequences, 2·batch × max_length tokens,
               b·4·A + 4·heads each, plus the output merged back into the rows (o_proj's input) if o_proj is
               targeted; the batch keeps two int64 gather indices (8 bytes per sequence and per row token);
               MLP input b·H (if gate/up targeted), gate and up 2·b·I (act(gate) is recomputed in backward:
               lora_dpo/mlp.py), their product b·I (if down targeted); LoRA A's output b·r per targeted Linear;
               qwen3/gemma3 q/k norms b·(A + K) + 4·(heads + kv) (gemma3: 4·(A + K + heads + kv)). With
               lora.lora_dropout > 0 (training mode) each targeted Linear keeps its dropout's boolean mask, 1·in:
               lora-dpo folds the dropout into LoRA A
               (lora_dpo/lora_dropout.py), which keeps the layer input the base layer keeps anyway instead of a
               dropped copy (peft's own forward keeps (b + 1)·in: +76 % on a Llama-3-8B all-linear layer, +25 % folded).
             tests/test_estimate.py checks this against the tensors autograd really saves (fp32, CPU, 4-bit and
             16-bit bases, with and without padding): equal to 0.3 % (RoPE's shared cos/sin are left out). On a GPU
             the same Python modules run; that the CUDA SDPA kernels save the same tensors is an assumption.
             With gradient checkpointing each layer keeps only its input, b·H per token, plus the final norm;
             with train.gradient_checkpointing_layers < 1 only the first ⌈share·layers⌉ do, the others save as
             without checkpointing; with train.offload_activations those inputs are in CPU memory (0 here).
             On top of the saved graph: one layer's activations as a transient (its gradients in backward), two
             with checkpointing (the recomputed layer), and the largest quantized Linear dequantized to 16 bit
             (bitsandbytes' matmul). The no-grad reference forward runs first, with no graph alive: its peak, the
             hidden states and one layer, counts when it is the larger.
log-prob     The completion hidden states gathered for the LM head (N·H·b, N = completion tokens), the gradient of
             the log-probs with respect to them that each chunk computes in forward (N·H·b more by the last chunk),
             and one chunk's logits (lora_dpo.logps: chunk = min(256, N) tokens) worked on in place: fp32 logits
             beside logsumexp's fp32 temporary (or beside the 16-bit logits or the gradient's 16-bit cast: less),
             chunk·V·8; a soft-capped head (Gemma 2) keeps its fp32 tanh as well, chunk·V·12. In fp16 (T4s) each
             chunk recomputes its logits in backward instead, peaking there: the fp32 logits and three fp32
             temporaries of logsumexp's backward, chunk·V·16 (20 soft-capped: the tanh kept as well).
overhead     A stated constant, estimate.OVERHEAD_BYTES = 1 GiB, for the CUDA context, cuBLAS workspaces and allocator
             fragmentation (not in max_memory_allocated). `Estimate.total` = allocated + overhead must fit.
shapes       Worst case: every row at max_length. Concatenated layout: 2·B rows of T = max_length (prompt +
             completion); prefix-shared (`shared`, and `packed`, whose rows hold one full-length pair each at the
             worst case): B rows of P + 2·(max_length − P); N = 2·B·(max_length − P), P = data.max_prompt_length.
             A model with an active sliding window shorter than such a row trains concatenated (as
             batching.resolve_layout decides), and is planned so.
             The reference forward is counted when dpo.reference is live and the loss needs one. Evaluation and
             the reference precompute pass run without grad and are assumed to peak lower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lora_dpo.errors import LoraDpoError

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
# families whose RMSNorm lora_dpo/rmsnorm.py makes keep its input in the training dtype (tests/test_rmsnorm.py checks
# this set against the norms it really switches); the others keep an fp32 copy
LEAN_NORMS = {"llama", "smollm3", "granite", "mistral", "qwen2", "qwen3"}


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
    sliding_window: int | None = None          # an active sliding window (a longer pair trains concatenated)
    softcap: bool = False                      # the LM head's logits are soft-capped (final_logit_softcapping)

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
        window = getattr(config, "sliding_window", None)  # as batching.resolve_layout reads it
        active = bool(window) and getattr(config, "use_sliding_window", True) is not False
        return cls(mt, config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   heads, getattr(config, "num_key_value_heads", None) or heads, head_dim,
                   bool(getattr(config, "tie_word_embeddings", False)), norms, qk_norm, bias,
                   getattr(config, "max_position_embeddings", None) or 1 << 22, window if active else None,
                   bool(getattr(config, "final_logit_softcapping", None)))

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
                           masked: bool, eager: bool = False, split: tuple[int, int] | None = None,
                           dropout: bool = False) -> int:
    """Bytes autograd saves in one decoder layer's forward (see the module docstring). split: sdpa_causal's
    (sequences, their length) when attention runs on the pairs' gathered sequences. dropout: lora.lora_dropout > 0
    (training mode)."""
    H, F, nh, nkv = arch.hidden, arch.intermediate, arch.heads, arch.kv_heads
    A, K = nh * arch.head_dim, nkv * arch.head_dim
    t = set(targets)
    nb = b if arch.model_type in LEAN_NORMS else 4  # bytes per value a norm keeps of its input
    per_tok = arch.norms * (nb * H + 4)
    if dropout:  # each targeted Linear keeps its dropout mask, 1 byte per input value (lora_dpo/lora_dropout.py)
        lin = arch.linears()
        per_tok += sum(lin[n][0] for n in t)
    if arch.qk_norm:
        per_tok += nb * (A + K) + 4 * (nh + nkv)
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
    per_tok += b * F * (3 if "down_proj" in t else 2) + b * r * len(t)  # gate, up (lora_dpo/mlp.py), product
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
