"""GPU memory handed to CPU memory, for a copy each way.

- model.offload_embeddings: the frozen input embedding table of a model on a GPU kept in CPU memory. Each forward
  looks its token ids up on the CPU and copies the (tokens, hidden) result to the GPU: 1 GiB of GPU memory freed on
  Llama-3-8B (128k × 4096 in bf16) for one host round trip per micro-batch, which never waits for the GPU's
  queued work (the ids' host copy is read; the answer goes back asynchronously). A table the LM head shares (tied
  embeddings) stays on the GPU: the head needs it there.
- train.offload_activations: with gradient checkpointing, the input each checkpointed decoder layer keeps for
  backward is copied to pinned CPU memory in the forward pass and back when backward reaches the layer.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from lora_dpo.batching import to_device


def _tied(model) -> bool:
    """The LM head shares the input embedding table."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return head is not None and head.weight.data_ptr() == emb.weight.data_ptr()


def embeddings_movable(model) -> bool:
    """Whether model.offload_embeddings would free GPU memory here: an untied table still on a GPU."""
    return not _tied(model) and model.get_input_embeddings().weight.device.type == "cuda"


def offload_embeddings(model) -> str:
    """model.offload_embeddings: move the frozen input embedding table of a model on a GPU into CPU memory; each
    forward then looks its token ids up on the CPU and copies the (tokens, hidden) result to the GPU. → the line to
    print. A table the LM head shares (tied embeddings) stays where it is: the head needs it on the GPU."""
    emb = model.get_input_embeddings()
    size = emb.weight.numel() * emb.weight.element_size()
    if _tied(model):
        return "model.offload_embeddings: the LM head shares the embedding table (tied), so it stays on the GPU"
    if emb.weight.device.type != "cuda":
        return f"model.offload_embeddings: the model is on {emb.weight.device.type}: nothing to offload"
    emb.to("cpu")
    torch.cuda.empty_cache()
    lookup_on_host(emb)
    emb.lora_dpo_offloaded = True
    return f"embeddings: {size / 2**30:.2f} GiB kept in CPU memory (model.offload_embeddings)"


@contextlib.contextmanager
def embeddings_on_device(model):
    """An offloaded embedding table back on the GPU for the duration (generation: transformers' `generate` moves
    each step's inputs to `model.device`, its first parameter's device, which is that table's); a no-op otherwise.
    Training is over or not begun when lora-dpo generates, so the table's GiB are free again."""
    emb = model.get_input_embeddings()
    if not getattr(emb, "lora_dpo_offloaded", False):
        yield
        return
    emb.to(model.get_output_embeddings().weight.device)
    try:
        yield
    finally:
        emb.to("cpu")
        torch.cuda.empty_cache()


def lookup_on_host(emb: torch.nn.Module) -> None:
    """Make `emb` run where its weight is and answer on the device its input ids came from (the module's own
    forward, so scaled embeddings such as Gemma 3's keep their scale, and its state-dict keys do not change).

    The policy and reference passes of a micro-batch look up the same ids tensor: the second gets the first's
    answer (the table is frozen), saving a host round trip of (tokens, hidden). Ids a training batch brought to the
    GPU carry their host copy (batching.to_device): reading them back would wait for the GPU's queued work, and the
    answer goes over through pinned memory, asynchronously, for the same reason."""
    forward = emb.forward
    last: dict = {}

    def host_forward(input_ids, *args, **kwargs):
        ids = last.get("ids")
        if ids is not None and ids() is input_ids and not args and not kwargs:
            return last["out"]
        host = getattr(input_ids, "host_copy", None)
        host = host if host is not None and host.device == emb.weight.device else input_ids.to(emb.weight.device)
        out = to_device(forward(host, *args, **kwargs), input_ids.device)
        last.update(ids=weakref.ref(input_ids), out=out)
        return out

    emb.forward = host_forward


def look_up_ahead(model, input_ids: torch.Tensor) -> None:
    """model.offload_embeddings: look a micro-batch's ids up now — training does it while the GPU still runs the
    step before — so its forward finds the answer waiting (lookup_on_host keeps the last one) instead of the GPU
    idling through a host lookup and a (tokens, hidden) copy at the start of the step. A no-op otherwise."""
    emb = model.get_input_embeddings()
    if getattr(emb, "lora_dpo_offloaded", False):
        with torch.no_grad():
            emb(input_ids)


MIN_OFFLOAD_BYTES = 1 << 20  # smaller saved tensors stay: a copy would cost more than it frees


def offload_checkpointed_inputs(model, layers: list, device: torch.device) -> str:
    """train.offload_activations: each checkpointed layer of `layers` keeps its saved input in pinned CPU memory.
    → the line to print."""
    if device.type != "cuda":
        return "train.offload_activations: a CPU run keeps activations in CPU memory already: nothing to offload"
    keep = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    n = 0
    for layer in layers:
        if layer.gradient_checkpointing:
            layer._gradient_checkpointing_func = inputs_on_host(layer._gradient_checkpointing_func, keep, device)
            n += 1
    return (f"activations: the inputs {n} checkpointed layers keep for backward wait in CPU memory "
            "(train.offload_activations)")


def _on(tensor_device: torch.device, source: torch.device) -> bool:
    """A tensor on `tensor_device` lies on `source`: a device named without an index ("cuda", as recipes and the
    trainer name it) covers every index of its type, since tensors always carry one ("cuda:0")."""
    return tensor_device.type == source.type and source.index in (None, tensor_device.index)


def inputs_on_host(checkpoint, keep: set[int], source: torch.device, min_bytes: int = MIN_OFFLOAD_BYTES,
                   moved: list | None = None):
    """`checkpoint` (a layer's checkpoint function) whose saved tensors — a non-reentrant checkpoint saves only its
    inputs — move from `source` to CPU memory: tensors of at least `min_bytes`, not parameters or buffers (storages
    in `keep`); the shape of each is appended to `moved` if given. On a GPU both copies are asynchronous and in
    stream order, so the GPU memory is reused only after the copy out has read it, and backward's kernels read the
    copy back only after it has landed."""
    cuda = source.type == "cuda"

    def pack(t: torch.Tensor):
        small = t.numel() * t.element_size() < min_bytes
        if small or not _on(t.device, source) or t.untyped_storage().data_ptr() in keep:
            return t
        host = torch.empty(t.size(), dtype=t.dtype, pin_memory=cuda)
        host.copy_(t, non_blocking=cuda)
        if moved is not None:
            moved.append(tuple(t.shape))
        return host, t.device

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        host, device = packed
        return host.to(device, non_blocking=cuda)

    def run(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return checkpoint(*args, **kwargs)

    return run
