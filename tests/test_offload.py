"""model.offload_embeddings (lora_dpo/offload.py) on a CPU; tests/test_gpu.py has the GPU twin that moves the table."""

from __future__ import annotations

import torch

from lora_dpo import model as M
from lora_dpo import offload
from lora_dpo.recipe import ModelConfig, QuantizationConfig


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
