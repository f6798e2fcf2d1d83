"""Per-sequence log-probs of completion tokens, from hidden states, in chunks along tokens, in fp32.

The decoder runs once; the LM head and log-softmax run only on completion positions, a chunk of tokens at a time,
so a (rows, T, vocab) logits tensor never exists. With grad on, each chunk computes its log-probs' gradient with
respect to the hidden states in the forward pass (`_TokenLogps`; a frozen LM head, as in every LoRA run) or, for a
trainable head, runs under activation checkpointing and recomputes its logits in backward; neither stores logits.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from lora_dpo.batching import Batch, SharedBatch, Targets

DEFAULT_CHUNK = 256


def causal_lm(model):
    """The *ForCausalLM module under a PeftModel (LoRA layers are injected in place, so they are in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def logit_transform(lm) -> tuple[float, float | None]:
    """(scale, softcap): what the model's own forward does to lm_head's output before it is a logit — Granite divides
    by logits_scaling, Cohere multiplies by logit_scale, Falcon-H1 by lm_head_multiplier, Gemma 2/3 soft-cap. Left
    out, every log-prob would be another model's. `check_head` verifies the result against the model's forward."""
    cfg = getattr(lm.config, "text_config", None) or lm.config
    scale = 1.0
    for name, invert in (("logits_scaling", True), ("logit_scale", False), ("lm_head_multiplier", False)):
        value = vars(cfg).get(name)  # names from the fixed list above
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
            scale = scale / value if invert else scale * value
    return scale, getattr(cfg, "final_logit_softcapping", None)


def _token_logps(hidden: torch.Tensor, labels: torch.Tensor, lm_head, transform: tuple) -> torch.Tensor:
    """hidden (N, H), labels (N,) → log p(label) (N,) fp32. transform: `logit_transform`'s (scale, softcap)."""
    scale, softcap = transform
    logits = lm_head(hidden).float()  # (N, V)
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class _TokenLogps(torch.autograd.Function):
    """`_token_logps` (the same forward values, bit for bit) with its gradient with respect to `hidden` computed in
    the forward pass, while the chunk's logits exist: d log p(label) / d hidden = (onehot(label) − softmax) ·
    (d cap / d logit) · scale · W for a frozen linear LM head (weight W). Backward only scales that (N, H) tensor by
    each token's incoming gradient. The checkpointed chunk it replaces runs the LM head and the log-softmax again in
    backward (a (N, vocab) GEMM and three passes over fp32 logits per chunk); this works on one fp32 (N, vocab)
    tensor in place, beside logsumexp's temporary (`memory_model`: chunk·V·8, 12 with a soft-cap)."""

    @staticmethod
    def forward(ctx, hidden, labels, head, transform):
        scale, softcap = transform
        logits = head(hidden).float()                                           # (N, V), as _token_logps
        if scale != 1.0:
            logits.mul_(scale)
        capped = None
        if softcap:
            capped = logits.div_(softcap).tanh_()
            logits = capped * softcap
        lse = torch.logsumexp(logits, dim=-1)
        out = logits.gather(-1, labels[:, None]).squeeze(-1) - lse
        grad = logits.sub_(lse[:, None]).exp_().neg_()                          # −softmax, in the logits' memory
        grad.scatter_add_(-1, labels[:, None], torch.ones_like(lse)[:, None])   # + onehot(label)
        if capped is not None:
            grad.mul_(capped.square_().neg_().add_(1))                          # d (cap·tanh(z/cap)) / dz
        if scale != 1.0:
            grad.mul_(scale)
        weight = head.weight
        ctx.save_for_backward((grad.to(weight.dtype) @ weight).to(hidden.dtype))  # (N, H)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative would need the softmax: refused, not 0
    def backward(ctx, grad_out):
        (dhidden,) = ctx.saved_tensors
        return (grad_out[:, None] * dhidden).to(dhidden.dtype), None, None, None


def _plain_call(head) -> bool:
    """`head(x)` is exactly F.linear(x, head.weight, head.bias): no hooks, the module's own or global ones, and no
    forward replaced on the instance (accelerate's device hooks do that). A hook that changes the output would be
    in the forward values but not in the gradient `_TokenLogps` computes from the weight; one that keeps the output
    would see it overwritten by the in-place softmax."""
    from torch.nn.modules import module

    hooks = (head._forward_hooks, head._forward_pre_hooks, head._backward_hooks, head._backward_pre_hooks,
             getattr(module, "_global_forward_hooks", None), getattr(module, "_global_forward_pre_hooks", None),
             getattr(module, "_global_backward_hooks", None), getattr(module, "_global_backward_pre_hooks", None))
    return not any(hooks) and "forward" not in vars(head)


def _fp16_autocast(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16


def _grad_in_forward(head) -> bool:
    """The chunks take `_TokenLogps`: a frozen plain Linear LM head — every LoRA run's (peft leaves it out of
    all-linear) — whose output's gradient with respect to its input is a product with its weight (a bias does not
    change it), in fp32 or bf16. fp16 compute (T4s: an fp16 head, or fp16 autocast over a head kept in fp32) keeps
    the checkpointed path: there the loss scale multiplies the softmax before its fp16 cast, which a gradient
    computed before the scale is known would lose below fp16's smallest number. So does a head with an adapter or a
    trainable weight, which autograd differentiates whole, and one with hooks (`_plain_call`)."""
    return (type(head) is torch.nn.Linear and not head.weight.requires_grad and head.weight.dtype != torch.float16
            and not _fp16_autocast(head.weight.device.type) and _plain_call(head))


def completion_logps(lm, hidden: torch.Tensor, input_ids: torch.Tensor, targets: Targets, n_seq: int,
                     chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token) over each sequence's completion tokens.

    hidden (R, T, H) last hidden states; input_ids (R, T); `targets` names the N scored tokens (see batching).
    Returns (logps (n_seq,) fp32, n_tokens (n_seq,) long).
    """
    h = hidden[targets.rows, targets.pred]                                  # (N, H)
    labels = input_ids[targets.rows, targets.label]                         # (N,)
    head = lm.get_output_embeddings()
    transform = logit_transform(lm)
    grad = torch.is_grad_enabled() and h.requires_grad
    grad_in_forward = grad and _grad_in_forward(head)
    pieces = []
    for s in range(0, h.shape[0], chunk_size):
        hc, lc = h[s: s + chunk_size], labels[s: s + chunk_size]
        if grad_in_forward:
            pieces.append(_TokenLogps.apply(hc, lc, head, transform))
        elif grad:
            pieces.append(checkpoint(_token_logps, hc, lc, head, transform, use_reentrant=False))
        else:
            pieces.append(_token_logps(hc, lc, head, transform))
    token_logps = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(n_seq, dtype=torch.float32, device=h.device).index_add(0, targets.seq, token_logps)
    # counted with index_add, not bincount: on a GPU bincount reads its input's maximum back to the host, a sync
    # that would stall the step between the policy and reference passes
    counts = torch.zeros(n_seq, dtype=torch.long, device=h.device).index_add_(0, targets.seq,
                                                                             torch.ones_like(targets.seq))
    return sums, counts


def model_inputs(model, batch: Batch | SharedBatch) -> dict:
    """The decoder's inputs for `batch` on `model`'s attention kernel, its mask included (memoised on the batch:
    built once, by whichever comes first — training prepares it ahead, while the GPU runs the step before)."""
    lm = causal_lm(model)
    return batch.model_inputs(lm.config._attn_implementation, lm.get_input_embeddings().weight.dtype)


def batch_logps(model, batch: Batch | SharedBatch,
                chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the decoder once on the batch → (logps (2B,), n_tokens (2B,)), chosen sequences first, any layout."""
    lm = causal_lm(model)
    out = lm.get_decoder()(**model_inputs(model, batch), use_cache=False)
    return completion_logps(lm, out.last_hidden_state, batch.input_ids, batch.targets(), 2 * batch.num_pairs,
                            chunk_size)


def plain_batch_logps(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook computation (full logits, log_softmax, gather): the oracle the fast path is tested against."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # (R, T-1)
    mask = batch.completion_mask[:, 1:]
    return (logp * mask).sum(-1), mask.sum(-1)


@torch.no_grad()
def check_head(model, input_ids: torch.Tensor, tolerance: float) -> float:
    """The fast path's log-probs against the model's own forward (its logits, whatever it does to them), on one
    short row `input_ids` (1, T): → max |Δ log-prob|. A model family whose head does something `logit_transform`
    does not know would otherwise train on wrong log-probs, silently. Raises LoraDpoError past `tolerance`."""
    from lora_dpo.errors import LoraDpoError

    lm = causal_lm(model)
    mask = torch.ones_like(input_ids)
    want = torch.log_softmax(lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[0, :-1].float(), -1)
    want = want.gather(-1, input_ids[0, 1:, None]).squeeze(-1)                 # (T-1,)
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state[0, :-1]
    got = _token_logps(hidden, input_ids[0, 1:], lm.get_output_embeddings(), logit_transform(lm))
    diff = float((got - want).abs().max())
    if not diff <= tolerance:
        raise LoraDpoError(f"model.name_or_path: this {lm.config.model_type} model's logits are not its LM head's "
                           f"output as lora-dpo computes it (max |Δ log-prob| {diff:.3g} > {tolerance:.1g}): its "
                           "family transforms them in a way lora-dpo does not know; please report the model type")
    return diff
