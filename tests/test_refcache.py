"""`dpo.reference: precompute`: same training as the live reference, no reference forward in training, and a cache
that hits on a β sweep / resume and misses (saying why) when the model, quantization, data or truncation change."""

from __future__ import annotations

import json
import sys

import pytest

from lora_dpo import train
from lora_dpo.recipe import recipe_from_dict
from tests.conftest import arithmetic_rows, build_tiny, write_jsonl

MODEL = sys.modules["lora_dpo.model"]


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
