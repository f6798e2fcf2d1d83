"""model.offload_embeddings and train.offload_activations (lora_dpo/offload.py) on a CPU; tests/test_gpu.py has the
GPU twins that move the table and the activations."""

from __future__ import annotations

import pytest
import torch

from lora_dpo import model as M
from lora_dpo import offload
from lora_dpo.recipe import LoraConfig, ModelConfig, QuantizationConfig


def test_host_embedding_lookup_changes_nothing_but_where_it_runs(tiny_model_dir, monkeypatch):
    """model.offload_embeddings: the lookup runs where the table is and answers on the ids' device; log-probs, LoRA
    gradients and state-dict keys unchanged (here both are the CPU; tests/test_gpu.py moves the table off a GPU)."""
    from conftest import trained_lora

    from lora_dpo.batching import build
    from lora_dpo.logps import batch_logps
    from tests.test_layouts import PAIRS

    m = trained_lora(tiny_model_dir)
    m.train()

    def run():
        m.zero_grad()
        logps, _ = batch_logps(m, build(PAIRS, 2, "packed"))
        (logps * torch.arange(1.0, 1 + logps.numel())).sum().backward()
        return logps.detach(), [p.grad.clone() for p in m.parameters() if p.requires_grad]

    want, g_want = run()
    keys = list(m.state_dict())
    emb = m.get_input_embeddings()
    offload.lookup_on_host(emb)
    calls = []
    host = emb.forward
    emb.forward = lambda ids, *a, **kw: calls.append(ids.shape) or host(ids, *a, **kw)
    got, g_got = run()
    assert calls and torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(g_got, g_want))
    assert list(m.state_dict()) == keys

    from lora_dpo.objective import dpo_forward
    from lora_dpo.recipe import DpoConfig

    looked_up = []
    table = emb.weight
    monkeypatch.setattr(torch.nn.functional, "embedding", lambda ids, w, *a, **kw: looked_up.append(
        w is table) or torch.ops.aten.embedding(w, ids))
    dpo_forward(m, build(PAIRS, 2, "packed"), DpoConfig())  # policy pass, then the reference pass
    assert looked_up == [True]  # one host lookup serves both: same ids, frozen table


def test_offload_embeddings_on_cpu_and_tied_tables(tiny_model_dir, tokenizer, tmp_path):
    from conftest import build_tiny

    base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.float32,
                       torch.device("cpu"))
    assert offload.offload_embeddings(base) == "model.offload_embeddings: the model is on cpu: nothing to offload"
    assert not offload.embeddings_movable(base)  # no GPU memory to free
    tied = M.load_base(ModelConfig(name_or_path=str(build_tiny(tmp_path / "tied", tokenizer,
                                                               tie_word_embeddings=True))),
                       QuantizationConfig(), torch.float32, torch.device("cpu"))
    assert "tied" in offload.offload_embeddings(tied)
    assert tied.get_input_embeddings().forward.__func__ is torch.nn.Embedding.forward  # left as it was


# ---------------------------------------------------------------- train.offload_activations


def grads_without_and_with_offload(m, batch, device: torch.device, autocast=None) -> tuple[list, list, list, list]:
    """The LoRA gradients of one backward through `m` (gradient checkpointing on), then again with every layer's
    checkpoint function moving its saved tensors (any size) from `device` to CPU memory, the shapes moved, and for
    each tensor backward took back whether it had been fetched ahead."""
    import contextlib

    from lora_dpo.logps import batch_logps

    m.train()

    def grads():
        m.zero_grad()
        with autocast or contextlib.nullcontext():
            logps, _ = batch_logps(m, batch)
        logps.sum().backward()
        return [p.grad.clone() for p in m.parameters() if p.requires_grad]

    want = grads()
    keep, moved, queue = {t.untyped_storage().data_ptr() for t in m.parameters()}, [], offload.Offloaded()
    for layer in M.decoder_layers(m):
        layer._gradient_checkpointing_func = offload.inputs_on_host(layer._gradient_checkpointing_func, keep, device,
                                                                    min_bytes=0, moved=moved, queue=queue)
    got = grads()
    return want, got, moved, list(queue.served)


def test_checkpointed_inputs_move_out_and_back_without_changing_gradients(tiny_model_dir):
    """The mechanism with CPU standing in for the GPU (the copies are then CPU to CPU): each checkpointed layer's
    saved input goes through the hooks — and nothing else — and the gradients are the plain run's. The GPU twin is
    tests/test_gpu.py::test_gpu_offloaded_activations."""
    from conftest import trained_lora

    from lora_dpo.batching import build
    from tests.test_layouts import PAIRS

    m = trained_lora(tiny_model_dir)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = build(PAIRS, 2, "packed")
    want, got, moved, served = grads_without_and_with_offload(m, batch, torch.device("cpu"))
    layers = len(M.decoder_layers(m))
    assert moved == [tuple(batch.input_ids.shape) + (m.config.hidden_size,)] * layers  # each layer's input only
    assert served == [False] + [True] * (layers - 1)  # the last layer's input copied back on demand, then ahead
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_each_layer_input_is_fetched_back_ahead_and_freed_with_its_graph(tmp_path, tokenizer):
    """Six layers: backward takes the last layer's input first, copied back on demand; taking it starts the copy of
    the input the layer before will need, and so on down — each fetched ahead, the gradients unchanged. A graph
    dropped without a backward leaves nothing waiting (the queue holds weak references)."""
    from conftest import build_tiny

    from lora_dpo.batching import build
    from lora_dpo.logps import batch_logps
    from tests.test_layouts import PAIRS

    six = build_tiny(tmp_path / "six", tokenizer, num_hidden_layers=6)

    def model():
        base = M.load_base(ModelConfig(name_or_path=str(six)), QuantizationConfig(), torch.float32, torch.device("cpu"))
        return M.attach_lora(base, LoraConfig(r=4), seed=0, gradient_checkpointing=True)

    want, got, moved, served = grads_without_and_with_offload(model(), build(PAIRS, 2, "packed"), torch.device("cpu"))
    assert len(moved) == 6 and served == [False] + [True] * 5
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    m, queue = model(), offload.Offloaded()
    m.train()
    for layer in M.decoder_layers(m):
        layer._gradient_checkpointing_func = offload.inputs_on_host(layer._gradient_checkpointing_func, set(),
                                                                    torch.device("cpu"), min_bytes=0, queue=queue)
    logps, _ = batch_logps(m, build(PAIRS, 2, "packed"))
    assert len(queue.waiting) >= 6
    del logps
    import gc

    gc.collect()
    assert all(w() is None for w in queue.waiting)


def test_inputs_on_host_packs_only_large_non_parameter_tensors():
    weight = torch.nn.Parameter(torch.randn(64, 64))
    seen = []

    def checkpoint(fn, *inputs):
        return torch.utils.checkpoint.checkpoint(fn, *inputs, use_reentrant=False)

    hooked = offload.inputs_on_host(checkpoint, {weight.untyped_storage().data_ptr()}, torch.device("cpu"),
                                    min_bytes=1024, moved=seen)
    x_small, x_big = torch.randn(2, 64, requires_grad=True), torch.randn(64, 64, requires_grad=True)
    for x in (x_small, x_big):
        hooked(lambda t, w: (t @ w).sum(), x, weight).backward()  # the weight is saved as an input too
    assert seen == [(64, 64)]  # the big input; not the small one, not the weight
    assert torch.allclose(x_big.grad, weight.sum(1).expand(64, 64)) and x_small.grad is not None


def test_a_device_named_without_an_index_covers_the_tensors_on_it():
    """Training names its device "cuda"; the tensors on it say "cuda:0". Comparing the two with `!=` offloaded
    nothing on a GPU (found by tests/test_gpu.py::test_gpu_offloaded_activations on an H200)."""
    cuda, cuda0, cuda1, cpu = (torch.device(d) for d in ("cuda", "cuda:0", "cuda:1", "cpu"))
    assert offload._on(cuda0, cuda) and offload._on(cuda1, cuda) and offload._on(cuda0, cuda0)
    assert not offload._on(cuda1, cuda0) and not offload._on(cpu, cuda) and not offload._on(cuda0, cpu)
    assert offload._on(cpu, cpu)


def test_offload_activations_on_a_cpu_run_says_there_is_nothing_to_offload(recipe_dict, capsys):
    from lora_dpo import train
    from lora_dpo.recipe import recipe_from_dict

    recipe_dict["train"].update(max_steps=1, gradient_checkpointing=True, offload_activations=True)
    recipe_dict["data"].pop("eval", None)
    train(recipe_from_dict(recipe_dict))
    assert "train.offload_activations: a CPU run keeps activations in CPU memory already" in capsys.readouterr().out


def test_offload_activations_needs_gradient_checkpointing(recipe_dict):
    from lora_dpo.errors import LoraDpoError
    from lora_dpo.recipe import recipe_from_dict

    recipe_dict["train"].update(offload_activations=True, gradient_checkpointing=False)
    with pytest.raises(LoraDpoError, match="offload_activations': moves .*set train.gradient_checkpointing: true"):
        recipe_from_dict(recipe_dict)


def test_host_lookup_reads_the_ids_host_copy_instead_of_the_device_tensor():
    """A training batch's ids on a GPU carry their pinned host copy (batching.to_device): the lookup reads that, not
    the GPU tensor (a read-back waits for the GPU's queued work). Here the copy holds other ids, so the answer
    shows which was read; without a copy, the ids themselves."""
    emb = torch.nn.Embedding(10, 3)
    offload.lookup_on_host(emb)
    ids = torch.tensor([[1, 2, 3]])
    ids.host_copy = torch.tensor([[7, 8, 9]])
    assert torch.equal(emb(ids), emb.weight[[7, 8, 9]][None])
    assert torch.equal(emb(torch.tensor([[1, 2, 3]])), emb.weight[[1, 2, 3]][None])


def test_a_lookup_made_ahead_serves_the_forward(tiny_model_dir):
    """train.py looks a prepared micro-batch's ids up while the GPU still runs the step before: the forward then
    finds the answer and looks nothing up itself. Without offloaded embeddings, looking up ahead does nothing."""
    from conftest import trained_lora

    from lora_dpo.batching import build
    from lora_dpo.logps import batch_logps, causal_lm
    from tests.test_layouts import PAIRS

    m = trained_lora(tiny_model_dir)
    emb = causal_lm(m).get_input_embeddings()
    calls = []
    table = emb.forward
    emb.forward = lambda ids, *a, **kw: calls.append(ids) or table(ids, *a, **kw)
    batch = build(PAIRS, 2, "packed")
    offload.look_up_ahead(causal_lm(m), batch.input_ids)
    assert calls == []  # not offloaded: nothing to look up ahead
    want, _ = batch_logps(m, batch)
    assert len(calls) == 1  # looked up in the forward
    offload.lookup_on_host(emb)
    emb.lora_dpo_offloaded = True
    offload.look_up_ahead(causal_lm(m), batch.input_ids)
    assert len(calls) == 2 and calls[-1] is batch.input_ids
    got, _ = batch_logps(m, batch)
    assert len(calls) == 2 and torch.equal(got, want)  # the forward found the answer
