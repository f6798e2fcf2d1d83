"""`dpo.reference: precompute`: same training as the live reference, no reference forward in training, and a cache
that hits on a β sweep / resume and misses (saying why) when the model, quantization, data or truncation change."""

from __future__ import annotations

import json
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lora_dpo import refcache, train
from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import recipe_from_dict
from tests.conftest import arithmetic_rows, build_tiny, trained_lora, write_jsonl

MODEL = sys.modules["lora_dpo.model"]
MODEL_CTX = sys.modules["lora_dpo.distributed"].Context


@pytest.fixture
def cached(recipe_dict, tmp_path):
    recipe_dict["data"].pop("eval")  # held-out eval always runs the live reference; keep it out of the count
    recipe_dict["train"]["max_steps"] = 3
    recipe_dict["dpo"] = {"reference": "precompute", "reference_cache_dir": str(tmp_path / "refcache")}
    return recipe_dict


@pytest.fixture
def reference_calls(monkeypatch):
    calls = {"n": 0}
    real = MODEL.reference_mode

    def counting(model):
        calls["n"] += 1
        return real(model)

    monkeypatch.setattr(MODEL, "reference_mode", counting)
    return calls


def _run(d, tmp_path, name, capsys):
    d["output"]["dir"] = str(tmp_path / name)
    result = train(recipe_from_dict(d))
    return result, capsys.readouterr().out


def test_precompute_trains_like_live(cached, tmp_path, capsys):
    cached_result, out = _run(cached, tmp_path, "cached", capsys)
    assert "cache miss" in out and "cached in" in out
    live = json.loads(json.dumps(cached))
    live["dpo"]["reference"] = "live"
    live_result, _ = _run(live, tmp_path, "live", capsys)
    for a, b in zip(cached_result.history, live_result.history):
        for k in ("loss", "rewards/margins", "logps/chosen"):
            assert a[k] == pytest.approx(b[k], abs=1e-4), k
    assert abs(cached_result.step0_loss - live_result.step0_loss) < 1e-5  # the step-0 check passed on the cache


def test_hit_on_beta_sweep_runs_no_reference_forward(cached, tmp_path, capsys, reference_calls):
    _run(cached, tmp_path, "first", capsys)
    assert reference_calls["n"] == 1  # the one precompute pass
    cached["dpo"]["beta"] = 0.3
    cached["train"]["resume_from_checkpoint"] = None
    _, out = _run(cached, tmp_path, "second", capsys)
    assert "cache hit" in out
    assert reference_calls["n"] == 1  # training and the step-0 check read the cache


@pytest.mark.parametrize("change, reason", [
    (lambda d, p: d["data"].update(max_length=48), "truncation"),
    (lambda d, p: d["quantization"].update(bnb_4bit_use_double_quant=False), "quantization"),
    (lambda d, p: d["data"].update(train=str(write_jsonl(p / "other.jsonl", arithmetic_rows(32, seed=7))))
     , "data"),
])
def test_any_key_change_recomputes(cached, tmp_path, capsys, change, reason):
    cached.setdefault("quantization", {})
    _run(cached, tmp_path, "first", capsys)
    change(cached, tmp_path)
    _, out = _run(cached, tmp_path, "second", capsys)
    assert "cache miss" in out and reason in out.split("cache miss", 1)[1].splitlines()[0]


def test_other_model_recomputes(cached, tmp_path, capsys, tokenizer):
    _run(cached, tmp_path, "first", capsys)
    cached["model"]["name_or_path"] = str(build_tiny(tmp_path / "other-model", tokenizer, seed=1))
    _, out = _run(cached, tmp_path, "second", capsys)
    assert "cache miss (model changed)" in out


def test_damaged_cache_file_is_recomputed(cached, tmp_path, capsys):
    _run(cached, tmp_path, "first", capsys)
    (f,) = (tmp_path / "refcache").glob("*.safetensors")
    f.write_bytes(b"not a safetensors file")
    _, out = _run(cached, tmp_path, "second", capsys)
    assert "unreadable" in out and "cached in" in out


def test_resume_with_the_cache_is_exact_and_may_move_the_cache(cached, tmp_path, capsys):
    """A run that computed the cache, stopped after a checkpoint and resumed (reading the cache, from another
    directory: where it lives is not what the run computes) ends bit for bit as the uninterrupted run."""
    cached["lora"] = {"lora_dropout": 0.1}  # the RNG state matters too
    cached["train"].update(max_steps=6, save_steps=3)
    full, out = _run(cached, tmp_path, "full", capsys)
    assert "cache miss" in out
    crashed = tmp_path / "crashed"
    shutil.copytree(full.output_dir, crashed)
    shutil.rmtree(crashed / "adapter")  # as if killed after the step-3 checkpoint
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")
    shutil.copytree(tmp_path / "refcache", tmp_path / "moved")
    cached["dpo"]["reference_cache_dir"] = str(tmp_path / "moved")
    cached["train"]["resume_from_checkpoint"] = "latest"
    resumed, out = _run(cached, tmp_path, "crashed", capsys)
    assert "cache hit" in out and "resumed from" in out
    wa = load_file(full.adapter_dir / "adapter_model.safetensors")
    wb = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["loss"] for r in full.history] == [r["loss"] for r in resumed.history]


def test_a_model_file_rewritten_in_place_recomputes(cached, tmp_path, capsys, tokenizer):
    """Same path, same size, new weights (a merged model saved over the last round's): the sampled content hash
    reads 3 MiB of the file, so the rewrite must be seen some other way."""
    model_dir = build_tiny(tmp_path / "merged", tokenizer)
    cached["model"]["name_or_path"] = str(model_dir)
    _run(cached, tmp_path, "first", capsys)
    f = model_dir / "model.safetensors"
    raw = bytearray(f.read_bytes())
    header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])
    start, end = (8 + int.from_bytes(raw[:8], "little") + o for o in header["lm_head.weight"]["data_offsets"])
    lo, hi = max(start, (3 << 20) // 2), min(end, len(raw) // 2 - (1 << 20))  # outside the sampled MiBs
    assert hi - lo > 1 << 20
    torch.manual_seed(1)
    raw[lo: hi] = torch.randn((hi - lo) // 4).numpy().tobytes()
    f.write_bytes(bytes(raw))
    _, out = _run(cached, tmp_path, "second", capsys)
    assert "cache miss (model changed)" in out


def test_an_unwritable_cache_dir_is_a_one_line_error_before_the_pass(cached, tmp_path, reference_calls):
    (tmp_path / "refcache").write_text("a file where the cache directory should be")
    cached["output"]["dir"] = str(tmp_path / "run")
    with pytest.raises(LoraDpoError, match=r"^dpo\.reference_cache_dir: cannot write .*refcache"):
        train(recipe_from_dict(cached))
    assert reference_calls["n"] == 0  # said before the reference pass, not after it


class _RankZeroOfTwo:
    """Rank 0 of two data-parallel processes, the other of which has no copy of the cache (another node, with its
    own cache directory)."""
    rank, world, main, enabled = 0, 2, True, True
    others_votes = (1.0, 0.0)  # it missed the cache; it checks no directory (only the main process writes)

    def sum(self, values, device):
        if len(values) == 1:  # the votes, in the order load_or_compute takes them
            self.votes = getattr(self, "votes", 0) + 1
            return [values[0] + self.others_votes[self.votes - 1]]
        return values  # the gather: the other process's shard is 0

    def barrier(self):
        pass


class _RankOneOfTwo(_RankZeroOfTwo):
    """Rank 1 of two, whose main process (rank 0) found the cache directory unwritable."""
    rank, main = 1, False
    others_votes = (1.0, 1.0)  # rank 0 missed too, and cannot write the directory


def test_data_parallel_processes_all_stop_on_an_unwritable_cache_dir(cached, tiny_model_dir, reference_calls):
    """Only the main process writes the cache, so only it can see that the directory is unwritable; the others
    must stop with it before the pass, not wait in the gather after it for a process that has gone."""
    import contextlib

    recipe, tok, pairs = _key_inputs(cached, tiny_model_dir)
    with pytest.raises(LoraDpoError, match=r"^dpo\.reference_cache_dir: the main process cannot write"):
        refcache.load_or_compute(recipe, None, tok, pairs, layout="packed", device=torch.device("cpu"),
                                 dtype=torch.float32, autocast_factory=contextlib.nullcontext, ctx=_RankOneOfTwo(),
                                 say=lambda *a: None)
    assert reference_calls["n"] == 0


def test_data_parallel_processes_agree_on_a_hit(cached, tmp_path, capsys, tiny_model_dir, reference_calls):
    """A process that hits while another misses would train while the other waits in the gather, forever."""
    import contextlib

    from lora_dpo import data, refcache

    _run(cached, tmp_path, "first", capsys)  # the cache holds this data now, on this process's disk
    recipe = recipe_from_dict(cached)
    tok = MODEL.load_tokenizer(recipe.model)
    pairs = data.prepare(recipe.data, tok, *data.read_data(recipe.data), lambda *a: None).train_pairs
    calls = reference_calls["n"]
    _, hit = refcache.load_or_compute(recipe, trained_lora(tiny_model_dir), tok, pairs, layout="packed",
                                      device=torch.device("cpu"), dtype=torch.float32,
                                      autocast_factory=contextlib.nullcontext, ctx=_RankZeroOfTwo(), say=print)
    assert not hit and reference_calls["n"] == calls + 1
    assert "another process has no usable copy" in capsys.readouterr().out


def _key_inputs(cached, tiny_model_dir):
    from lora_dpo.data import Pair

    recipe = recipe_from_dict(cached)
    pairs = [Pair([1, 2, 3], [4, 5], [6], i) for i in range(4)]
    return recipe, MODEL.load_tokenizer(recipe.model), pairs


def test_two_runs_writing_the_same_entry_at_once_both_finish(cached, tiny_model_dir, monkeypatch):
    """A β sweep started at once in two containers sharing the cache directory (their pids alike): both miss, both
    write the entry; neither may fail, and the entry must be whole."""
    import contextlib
    import threading

    from lora_dpo import refcache

    recipe, tok, pairs = _key_inputs(cached, tiny_model_dir)
    monkeypatch.setattr(refcache, "compute", lambda *a: (torch.arange(4.0), -torch.arange(4.0)))
    both_writing, real_save = threading.Barrier(2, timeout=30), refcache.save_file

    def slow_save(tensors, path):  # the two writes overlap
        real_save(tensors, path)
        both_writing.wait()

    monkeypatch.setattr(refcache, "save_file", slow_save)
    errors = []

    def one_run():
        try:
            refcache.load_or_compute(recipe, None, tok, pairs, layout="packed", device=torch.device("cpu"),
                                     dtype=torch.float32, autocast_factory=contextlib.nullcontext,
                                     ctx=MODEL_CTX(), say=lambda *a: None)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    runs = [threading.Thread(target=one_run) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert not errors
    monkeypatch.undo()
    cache, hit = refcache.load_or_compute(recipe, None, tok, pairs, layout="packed", device=torch.device("cpu"),
                                          dtype=torch.float32, autocast_factory=contextlib.nullcontext,
                                          ctx=MODEL_CTX(), say=lambda *a: None)
    assert hit and torch.equal(cache.chosen, torch.arange(4.0))
    assert not list(refcache.cache_root(recipe).glob("*.tmp"))  # no temporary file left behind


def test_other_json_files_in_the_cache_dir_are_ignored(cached, tiny_model_dir):
    from lora_dpo import refcache

    recipe, tok, pairs = _key_inputs(cached, tiny_model_dir)
    root = refcache.cache_root(recipe)
    root.mkdir(parents=True)
    (root / "notes.json").write_text("[1, 2]")
    (root / "entry.json").write_text(json.dumps({**refcache.cache_key(recipe, pairs, torch.float32,
                                                                      torch.device("cpu"), tok), "data": "other"}))
    assert refcache._what_changed(root, refcache.cache_key(recipe, pairs, torch.float32, torch.device("cpu"),
                                                           tok)) == "data"


def test_out_of_memory_in_the_reference_pass_names_the_batch_size(cached, tmp_path, monkeypatch):
    from lora_dpo import refcache

    def oom(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(refcache, "batch_logps", oom)
    cached["train"]["per_device_eval_batch_size"] = 8
    cached["output"]["dir"] = str(tmp_path / "run")
    with pytest.raises(LoraDpoError, match=r"^out of GPU memory in the reference pass .*; set "
                                           r"train\.per_device_eval_batch_size=4$"):
        train(recipe_from_dict(cached))


def test_the_model_code_of_a_remote_code_model_is_part_of_its_fingerprint(tmp_path, tokenizer):
    """A model that ships its own modelling code (trust_remote_code): editing that code changes the log-probs, so
    it changes the model's key."""
    from lora_dpo.recipe import ModelConfig

    model_dir = build_tiny(tmp_path / "remote", tokenizer)
    code = model_dir / "modeling_custom.py"
    code.write_text("SCALE = 1.0\n")
    recipe = SimpleNamespace(model=ModelConfig(name_or_path=str(model_dir)))
    before = refcache.model_fingerprint(recipe)
    code.write_text("SCALE = 2.0\n")
    os.utime(code, ns=(code.stat().st_atime_ns, code.stat().st_mtime_ns + 10**9))
    assert refcache.model_fingerprint(recipe)["content"] != before["content"]


def test_a_killed_writers_temp_files_are_removed_by_the_next_write(cached, tiny_model_dir, monkeypatch):
    """A writer killed mid-write (SIGKILL: no cleanup) leaves a `.….tmp` file; the next run that writes an entry
    removes temp files over a day old and never a younger one, which may be another run's write in progress."""
    import contextlib

    recipe, tok, pairs = _key_inputs(cached, tiny_model_dir)
    root = refcache.cache_root(recipe)
    root.mkdir(parents=True)
    old, young = root / ".deadbeef.1.aaaaaaaaaaaa.tmp", root / ".cafef00d.2.bbbbbbbbbbbb.tmp"
    for f in (old, young):
        f.write_bytes(b"half a file")
    day_and_a_bit = refcache.STALE_TEMP_SECONDS + 60
    os.utime(old, (old.stat().st_atime - day_and_a_bit, old.stat().st_mtime - day_and_a_bit))
    monkeypatch.setattr(refcache, "compute", lambda *a: (torch.arange(4.0), -torch.arange(4.0)))
    refcache.load_or_compute(recipe, None, tok, pairs, layout="packed", device=torch.device("cpu"),
                             dtype=torch.float32, autocast_factory=contextlib.nullcontext, ctx=MODEL_CTX(),
                             say=lambda *a: None)
    assert not old.exists() and young.exists()
    assert len(list(root.glob("*.safetensors"))) == 1  # the entry itself written


def test_compute_in_small_batches_equals_one_batch(tiny_model_dir):
    """The precompute pass reads its results back once, after its last batch: the pieces land on the right pairs,
    whatever the batch size."""
    import contextlib

    from conftest import trained_lora

    from lora_dpo.data import Pair

    m = trained_lora(tiny_model_dir)
    pairs = [Pair([5 + i, 6, 7], [8, 9 + i], [10], i) for i in range(4)] + [Pair([11], [12, 13], [14, 15, 16], 4)]
    cpu = torch.device("cpu")
    one = refcache.compute(m, pairs, 0, 5, "packed", cpu, contextlib.nullcontext())
    small = refcache.compute(m, pairs, 0, 2, "packed", cpu, contextlib.nullcontext())
    assert one[0].shape == (5,) and not torch.equal(one[0], one[1])
    for a, b in zip(one, small):
        assert torch.allclose(a, b, atol=1e-5)
