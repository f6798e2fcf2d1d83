"""The attention kernels training runs on, and the one lora-dpo adds: `sdpa_causal`.

In the prefix-shared layouts a row holds [prompt | chosen | rejected] segments, and attention must let the rejected
part see its prompt but never the chosen part. Three ways to compute that, all equal to the unshared forward
(tests/test_layouts.py):

- **sdpa** with a dense (rows, 1, T, T) boolean mask. A mask takes sdpa off its flash kernel onto the masked one,
  which visits every (query, key) block, masked or not, and reads the mask.
- **flex_attention** with a block mask: skips the masked blocks; needs Triton (compiled kernels) and, for
  training, a CUDA GPU.
- **sdpa_causal** (this module): each pair's two sequences, prompt + chosen and prompt + rejected, are gathered
  from the rows' queries, keys and values into right-padded (2·pairs, L) batches and run through plain causal sdpa
  — no mask at all, so sdpa may take its flash kernel (or the memory-efficient one on older GPUs, or the CPU's),
  which skips the blocks above the diagonal. Right padding needs no mask under causal attention: a real token
  never sees a later position. The outputs are gathered back into the rows. Only attention sees the prompt twice
  (as in TRL's layout); the projections and MLPs, most of the FLOPs, still run on each prompt token once.

The gather plan travels to every layer as a keyword argument of the decoder call (transformers passes unknown
keyword arguments through to the attention function, and gradient checkpointing replays them); without one —
generation, or the concatenated layout's 2-D masks — `sdpa_causal` is plain sdpa.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from lora_dpo.errors import LoraDpoError

SDPA_CAUSAL = "sdpa_causal"
PLAN_KWARG = "lora_dpo_split"  # the decoder-call keyword that carries the gather plan to every layer


def resolve_attention(name: str, device: torch.device, layout: str | None = None) -> str:
    """model.attn_implementation → the kernel loaded. 'auto' is flex_attention for training in the prefix-shared
    layouts (shared, packed) on a CUDA GPU of compute capability 8.0+ (Ampere, Hopper, …): its block mask skips the
    masked blocks that sdpa's dense 4-D mask sends through the slower masked kernel — 2.3× the pairs/s of sdpa on an
    H200, 8B model, long prompts (benchmarks/RESULTS.md). sdpa everywhere else: CPU (no FlexAttention backward),
    older GPUs, machines without Triton (flex's compiler), TRL's concatenated layout (2-D padding masks), and
    loading for evaluation or export (layout None)."""
    if name != "auto":
        return name
    if (layout in ("shared", "packed") and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
            and _flex_compiles()):
        return "flex_attention"
    return "sdpa"


def _flex_compiles() -> bool:
    """FlexAttention exists in this torch and its kernels can be compiled: torch.compile generates them with Triton,
    which torch's Linux CUDA wheels bring and Windows installs lack."""
    return (importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
            and importlib.util.find_spec("triton") is not None)


def register(name: str) -> None:
    """Make `name` loadable by transformers where lora-dpo provides it (sdpa_causal); others are transformers' own.
    Its masks — generation's, the concatenated layout's — are made as for sdpa."""
    if name != SDPA_CAUSAL:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SDPA_CAUSAL, sdpa_causal_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_CAUSAL, sdpa_mask)


def split_plan(slot: torch.Tensor, part: torch.Tensor, position_ids: torch.Tensor, num_pairs: int,
               seq_len: int) -> dict:
    """Where each pair's two sequences lie in the rows, and where each row token's attention output comes from.

    slot, part, position_ids (R, T): a SharedBatch's (pair of each token, PROMPT/CHOSEN/REJECTED/PAD, positions —
    which run 0 … P + C - 1 over prompt and chosen and P … P + Rj - 1 over rejected, so they index the sequences).
    Sequence k < num_pairs is pair k's prompt + chosen, num_pairs + k its prompt + rejected; seq_len L is the
    longest. Returns {"gather": (2·pairs·L,) the flat row index (r·T + t) of each sequence token, right padding
    pointing at token 0 (causal attention never lets a real token see a later position), "merge": (R·T,) the flat
    sequence index (s·L + j) whose output each row token takes — prompt and chosen tokens from the chosen
    sequence, padding from sequence token 0 —, "shape": (2·pairs, L)}. Built with tensor ops: no host sync."""
    from lora_dpo.batching import CHOSEN, PAD, PROMPT, REJECTED

    R, T = slot.shape
    S = 2 * num_pairs
    flat = torch.arange(R * T, device=slot.device)
    dump = S * seq_len  # spare cells, one per row token, for the tokens outside a sequence; cut off after: every
    gather = torch.zeros(dump + R * T, dtype=torch.long, device=slot.device)  # index is written once (deterministic)
    for seq_of, member in ((slot, (part == PROMPT) | (part == CHOSEN)),
                           (slot + num_pairs, (part == PROMPT) | (part == REJECTED))):
        where = torch.where(member.reshape(-1), (seq_of * seq_len + position_ids).reshape(-1), dump + flat)
        gather.scatter_(0, where, flat)
    seq = torch.where(part == REJECTED, slot + num_pairs, slot)
    merge = torch.where(slot == PAD, 0, seq * seq_len + position_ids).reshape(-1)
    return {"gather": gather[:dump].clone(), "merge": merge, "shape": (S, seq_len)}  # without the spare cells


def _native_gqa(query: torch.Tensor, key: torch.Tensor) -> bool:
    """sdpa's own grouped-query attention (enable_gqa), where its flash kernel takes these very tensors (CUDA,
    Ampere or newer, 16 bit; torch says so per call). Elsewhere enable_gqa could send sdpa to its math kernel, so
    keys and values are repeated per head instead, as transformers does with a mask."""
    if not query.is_cuda:
        return False
    try:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention

        return bool(can_use_flash_attention(SDPAParams(query, key, key, None, 0.0, True, True), False))
    except (ImportError, TypeError, RuntimeError):  # a torch without these (or with another signature)
        return False


def sdpa_causal_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                        dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. query (R, heads, T, d), key and value (R, kv_heads, T, d)
    → (R, T, heads, d). With the gather plan (keyword PLAN_KWARG) the pairs' sequences run as plain causal sdpa;
    without it, this is transformers' sdpa."""
    plan = kwargs.pop(PLAN_KWARG, None)
    if plan is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    S, L = plan["shape"]
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise LoraDpoError("model.attn_implementation: sdpa_causal has no attention-logit softcapping or sink "
                           "tokens, which this model uses; use flex_attention or eager")
    window = kwargs.get("sliding_window")
    if window is not None and window < L:  # train.layout falls back to concatenated before this can happen
        raise LoraDpoError(f"model.attn_implementation: sdpa_causal cannot apply a {window}-token sliding window "
                           f"to {L}-token sequences; use sdpa")
    R, heads, T, d = query.shape

    def sequences(x: torch.Tensor) -> torch.Tensor:  # (R, h, T, d) → (S, h, L, d)
        h = x.shape[1]
        rows = x.transpose(1, 2).reshape(R * T, h * d)  # (R·T, h·d)
        return rows.index_select(0, plan["gather"]).view(S, L, h, d).transpose(1, 2)

    q, k, v = sequences(query), sequences(key), sequences(value)
    gqa = {}
    if k.shape[1] != heads:
        if _native_gqa(q, k):
            gqa["enable_gqa"] = True
        else:
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True,
                                                           **gqa)  # (S, heads, L, d)
    out = out.transpose(1, 2).reshape(S * L, heads * d).index_select(0, plan["merge"])  # (R·T, heads·d)
    return out.view(R, T, heads, d), None


FLEX_RECOMPILE_LIMIT = 64


def compile_flex_for_any_length() -> None:
    """FlexAttention runs as a torch.compile'd kernel. Compiled for the first batch's exact length, it is compiled
    again for the second batch's length (now for any length) and once more past some sizes: each a pause of
    seconds to a minute, mid-training, since lengths vary from batch to batch. Compiled for symbolic lengths from the
    start, it compiles once (tests/test_layouts.py counts).

    It is still compiled once per state it runs in: grad on (policy) or off (reference, eval), under an autocast or
    not (lora-dpo's own passes all run under the training autocast; a caller's may not), for several rows and for
    one, … — easily past torch's default limit of 8, after which torch silently runs flex_attention *uncompiled*,
    materialising every (query, key) score: slow, and enough memory to run out of it. The limit is raised for that
    (tests/test_attention.py). Both settings are process-wide; lora-dpo compiles nothing else (but the blocks of
    train.compile, lora_dpo/compile.py)."""
    import torch._dynamo

    torch._dynamo.config.assume_static_by_default = False
    raise_recompile_limit(FLEX_RECOMPILE_LIMIT)


def raise_recompile_limit(n: int) -> None:
    """At least `n` compiled graphs per compiled function before torch falls back to running it eagerly."""
    import torch._dynamo

    cfg = torch._dynamo.config
    if hasattr(cfg, "recompile_limit"):
        cfg.recompile_limit = max(cfg.recompile_limit, n)
    else:  # its name before torch 2.6
        cfg.cache_size_limit = max(cfg.cache_size_limit, n)


@contextlib.contextmanager
def sdpa_for_generation(model):
    """Token-by-token decoding on sdpa: a flex_attention model would build a block mask and run its compiled kernel
    for every new token. The same weights; the kernel is switched back afterwards. (sdpa_causal is plain sdpa
    without a gather plan, as in generation.)"""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    attn = lm.config._attn_implementation
    if attn != "flex_attention" or not hasattr(lm, "set_attn_implementation"):
        yield
        return
    lm.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        lm.set_attn_implementation(attn)
