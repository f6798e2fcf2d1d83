"""GPU memory handed to CPU memory, for a copy each way.

- model.offload_embeddings: the frozen input embedding table of a model on a GPU kept in CPU memory. Each forward
  looks its token ids up on the CPU and copies the (tokens, hidden) result to the GPU: 1 GiB of GPU memory freed on
  Llama-3-8B (128k × 4096 in bf16) for one host round trip per micro-batch, which never waits for the GPU's
  queued work (the ids' host copy is read; the answer goes back asynchronously). A table the LM head shares (tied
  embeddings) stays on the GPU: the head needs it there.
- train.offload_activations: with gradient checkpointing, the input each checkpointed decoder layer keeps for
  backward is copied to pinned CPU memory in the forward pass and back in backward — on a GPU both on a side stream,
  beside the computation, and each copy back started while backward still runs the layer after (`Offloaded`).
"""

from __future__ import annotations

import collections
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
    queue = Offloaded()  # one for all layers: backward fetches each layer's input while the layer after it runs
    n = 0
    for layer in layers:
        if layer.gradient_checkpointing:
            layer._gradient_checkpointing_func = inputs_on_host(layer._gradient_checkpointing_func, keep, device,
                                                                queue=queue)
            n += 1
    return (f"activations: the inputs {n} checkpointed layers keep for backward wait in CPU memory "
            "(train.offload_activations)")


def _on(tensor_device: torch.device, source: torch.device) -> bool:
    """A tensor on `tensor_device` lies on `source`: a device named without an index ("cuda", as recipes and the
    trainer name it) covers every index of its type, since tensors always carry one ("cuda:0")."""
    return tensor_device.type == source.type and source.index in (None, tensor_device.index)


_SIDE_STREAMS: dict = {}  # device → the stream the copies run on, beside the computation


def _side_stream(device: torch.device):
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class _Saved:
    """One offloaded tensor: its pinned host copy and (GPU) the event after which that copy is complete; once
    fetched back ahead, its device copy and the event after which that has landed."""
    __slots__ = ("host", "device", "copied", "fetched", "landed", "__weakref__")


class Offloaded:
    """The tensors offloaded by forward passes whose backward has not run yet, in the order they were saved.
    Backward needs them in reverse order: when it takes one, the next it will need — the last one still waiting —
    starts its copy back at once, on the side stream on a GPU, so the copy overlaps the recompute and backward of
    the layer in between instead of stalling the computation. `served` records, for each tensor backward took,
    whether it had been fetched ahead (for tests)."""

    def __init__(self) -> None:
        self.waiting: list = []  # weak references: a graph freed without a backward takes its tensors with it
        self.served: collections.deque = collections.deque(maxlen=1024)

    def add(self, saved: _Saved) -> None:
        self.waiting.append(weakref.ref(saved))

    def take(self, saved: _Saved) -> None:
        self.waiting = [w for w in self.waiting if w() is not None and w() is not saved]
        self.served.append(saved.fetched is not None)

    def fetch_next(self, cuda: bool) -> None:
        nxt = self.waiting[-1]() if self.waiting else None
        if nxt is None or nxt.fetched is not None:
            return
        if not cuda:
            nxt.fetched = nxt.host.to(nxt.device)
            return
        side = _side_stream(nxt.device)
        with torch.cuda.stream(side):  # after the copy out, which ran on this stream too
            nxt.fetched = nxt.host.to(nxt.device, non_blocking=True)
            nxt.landed = torch.cuda.Event()
            nxt.landed.record(side)


def inputs_on_host(checkpoint, keep: set[int], source: torch.device, min_bytes: int = MIN_OFFLOAD_BYTES,
                   moved: list | None = None, queue: Offloaded | None = None):
    """`checkpoint` (a layer's checkpoint function) whose saved tensors — a non-reentrant checkpoint saves only its
    inputs — move from `source` to CPU memory: tensors of at least `min_bytes`, not parameters or buffers (storages
    in `keep`); the shape of each is appended to `moved` if given. Layers sharing a `queue` fetch each other's
    tensors back ahead in backward (see Offloaded).

    On a GPU the copies run on a side stream, beside the computation: the copy out starts once the tensor is
    computed (the side stream waits for the compute stream), and the tensor's GPU memory is reused only after the
    copy has read it (record_stream); backward's compute stream waits for the copy out to have landed in CPU memory
    before copying it back itself, or for the copy back made ahead to have landed before using it."""
    cuda = source.type == "cuda"
    queue = queue if queue is not None else Offloaded()

    def pack(t: torch.Tensor):
        small = t.numel() * t.element_size() < min_bytes
        if small or not _on(t.device, source) or t.untyped_storage().data_ptr() in keep:
            return t
        saved = _Saved()
        saved.device, saved.fetched = t.device, None
        saved.host = torch.empty(t.size(), dtype=t.dtype, pin_memory=cuda)
        if cuda:
            side = _side_stream(t.device)
            side.wait_stream(torch.cuda.current_stream(t.device))  # t is computed
            with torch.cuda.stream(side):
                saved.host.copy_(t, non_blocking=True)
                saved.copied = torch.cuda.Event()
                saved.copied.record(side)
            t.record_stream(side)  # its memory is not reused before the copy has read it
        else:
            saved.host.copy_(t)
        queue.add(saved)
        if moved is not None:
            moved.append(tuple(t.shape))
        return saved

    def unpack(saved):
        if isinstance(saved, torch.Tensor):
            return saved
        queue.take(saved)
        out, saved.fetched = saved.fetched, None
        if cuda:
            compute = torch.cuda.current_stream(saved.device)
            if out is None:
                compute.wait_event(saved.copied)  # the copy out is complete
                out = saved.host.to(saved.device, non_blocking=True)
            else:
                compute.wait_event(saved.landed)
                out.record_stream(compute)  # made on the side stream, used here
        elif out is None:
            out = saved.host.to(saved.device)
        queue.fetch_next(cuda)
        return out

    def run(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return checkpoint(*args, **kwargs)

    return run
