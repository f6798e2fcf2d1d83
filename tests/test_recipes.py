"""The popular-model recipes in recipes/: every one validates, the GPU variants make the memory choices their GPU
needs (checked with the memory planner on each model's public architecture), and the data settings parse rows
shaped like the real datasets — all without downloading anything."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import write_jsonl

from lora_dpo import data as data_lib
from lora_dpo.estimate import Arch, estimate_for
from lora_dpo.known_models import known_config
from lora_dpo.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if p.name != "quickstart.yaml")
NAME = re.compile(r"^(?P<model>.+-instruct)-(?P<dataset>ultrafeedback|hh-rlhf|orca-dpo-pairs)-(?P<gpu>t4|a100)$")
MODELS = {"llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
          "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3",
          "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
          "smollm2-1.7b-instruct": "HuggingFaceTB/SmolLM2-1.7B-Instruct"}
GIB = 2**30
T4_USABLE, A100_USABLE = 15 * GIB, 40 * GIB  # a 16 GB T4 shows ~15 GiB; the smaller A100 has 40 GB


def _parts(path: Path) -> dict:
    m = NAME.match(path.stem)
    assert m, f"{path.name}: expected <model>-<dataset>-<t4|a100>.yaml"
    return m.groupdict()


def test_the_recipes_cover_the_popular_models_and_datasets():
    parts = [_parts(p) for p in RECIPES]
    assert len(RECIPES) >= 8
    assert {p["model"] for p in parts} == set(MODELS)
    datasets = [p["dataset"] for p in parts if p["gpu"] == "t4"]
    assert {d: datasets.count(d) >= 2 for d in ("ultrafeedback", "hh-rlhf", "orca-dpo-pairs")} == {
        "ultrafeedback": True, "hh-rlhf": True, "orca-dpo-pairs": True}
    pairs = {(p["model"], p["dataset"]) for p in parts}
    for model, dataset in pairs:  # both GPU variants of every model x dataset
        assert {p["gpu"] for p in parts if (p["model"], p["dataset"]) == (model, dataset)} == {"t4", "a100"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe(path):
    parts = _parts(path)
    text = path.read_text()
    assert sum(line.lstrip().startswith("#") or " # " in line for line in text.splitlines()) >= 20  # commented
    r = load_recipe(path)  # every key validated; nothing is loaded or downloaded
    assert r.model.name_or_path == MODELS[parts["model"]] and not r.model.trust_remote_code
    assert r.output.dir == f"runs/{path.stem}"
    q, t = r.quantization, r.train
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and r.lora.target_modules == "all-linear"
    est = estimate_for(r, gpu_memory_bytes=T4_USABLE if parts["gpu"] == "t4" else A100_USABLE, arch=_arch(r))
    if parts["gpu"] == "t4":  # no bf16 on a T4: fp16 compute, 8-bit paged Adam, small micro-batches
        assert t.precision == "fp16" and q.bnb_4bit_compute_dtype in ("float16", "auto")
        assert t.optim == "paged_adamw_8bit" and t.per_device_train_batch_size <= 2
        assert t.gradient_checkpointing or parts["model"].startswith("smollm2")
        assert est.total < T4_USABLE, (path.name, est.total / GIB)
    else:
        assert t.precision == "bf16" and q.bnb_4bit_compute_dtype in ("bfloat16", "auto")
        assert est.total < A100_USABLE, (path.name, est.total / GIB)
    # the peak the comment quotes for training without gradient checkpointing is the planner's, and the choice
    # follows from it: on where it would not fit (or barely), off where it fits with room
    said = re.search(r"predicted peak without it: ([\d.]+) GiB", text)
    assert said or (parts["gpu"] == "a100" and parts["model"].startswith("smollm2"))
    if said:
        checkpointing = t.gradient_checkpointing
        r.train.gradient_checkpointing = False
        without = estimate_for(r, gpu_memory_bytes=T4_USABLE, arch=_arch(r)).total
        assert float(said.group(1)) == pytest.approx(without / GIB, abs=0.05)
        usable = T4_USABLE if parts["gpu"] == "t4" else A100_USABLE
        if without > usable:
            assert checkpointing
        if not checkpointing:
            assert without < 0.9 * usable
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps >= 16  # pairs per optimizer step
    assert 0 < r.dpo.beta <= 0.5 and t.learning_rate <= 1e-4 and r.evaluation.kl_samples > 0


def _source(s) -> dict:
    """A data source as a mapping (the schema keeps list entries as validated mappings)."""
    return dict(s) if isinstance(s, dict) else dict(vars(s))


def _arch(r):
    return Arch.from_config(known_config(r.model.name_or_path))


def test_gpu_twins_differ_only_in_memory_settings():
    by_pair: dict[tuple, dict] = {}
    for path in RECIPES:
        p = _parts(path)
        by_pair.setdefault((p["model"], p["dataset"]), {})[p["gpu"]] = load_recipe(path)
    for pair, twins in by_pair.items():
        t4, a100 = twins["t4"], twins["a100"]
        assert t4.model == a100.model and t4.dpo == a100.dpo and t4.lora == a100.lora, pair
        strip = lambda sources: [{**_source(s), "count": None} for s in sources]  # noqa: E731
        assert strip(t4.data.train) == strip(a100.data.train), pair  # the T4 may train on a sample
        assert (t4.data.max_length, t4.data.eval_split) == (a100.data.max_length, a100.data.eval_split), pair
        assert t4.train.learning_rate == a100.train.learning_rate, pair


# rows shaped like each hub dataset (same columns and value types), written locally instead of downloaded
UF_ROW = {"prompt": "Name a prime number.", "prompt_id": "x", "score_chosen": 9.0, "score_rejected": 4.0,
          "chosen": [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7."}],
          "rejected": [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "8."}],
          "messages": [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7."}]}
HH_ROW = {"chosen": "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: Name a colour.\n\nAssistant: Blue.",
          "rejected": "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: Name a colour.\n\nAssistant: No."}
ORCA_ROW = {"system": "You are a helpful assistant.", "question": "What is 2 + 2?", "chosen": " 4.",
            "rejected": " 5."}


@pytest.mark.parametrize("dataset, row, prompt", [
    ("ultrafeedback", UF_ROW, [{"role": "user", "content": "Name a prime number."}]),
    ("hh-rlhf", HH_ROW, [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                         {"role": "user", "content": "Name a colour."}]),
    ("orca-dpo-pairs", ORCA_ROW, "What is 2 + 2?"),
])
def test_data_settings_read_the_datasets_rows(dataset, row, prompt, tmp_path, tokenizer):
    recipes = [p for p in RECIPES if _parts(p)["dataset"] == dataset]
    hub = {"ultrafeedback": "HuggingFaceH4/ultrafeedback_binarized", "hh-rlhf": "Anthropic/hh-rlhf",
           "orca-dpo-pairs": "Intel/orca_dpo_pairs"}[dataset]
    for path in recipes:
        r = load_recipe(path)
        for split in ("train", "eval"):
            sources = getattr(r.data, split)
            if sources is None:
                continue
            assert [_source(s)["path"] for s in sources] == [hub], path.name
        sources = [_source(s) for s in r.data.train]
        evals = [_source(s) for s in r.data.eval or []]
        if dataset == "ultrafeedback":
            assert sources[0]["split"] == "train_prefs" and evals[0]["split"] == "test_prefs"
            assert sources[0]["format"] == evals[0]["format"] == "implicit"
        elif dataset == "hh-rlhf":
            assert sources[0]["split"] == "train" and evals[0]["split"] == "test"
            assert sources[0]["format"] == evals[0]["format"] == "hh"
        else:  # one split only: a fraction is held out
            assert sources[0]["columns"]["prompt"] == "question" and not evals and 0 < r.data.eval_split < 1
        # the same source settings on a local file with the dataset's columns (less the hub-only ones: split,
        # name and revision, which a local file refuses)
        local = write_jsonl(tmp_path / f"{path.stem}.jsonl", [row, {**row, "chosen": row["chosen"]}])
        spec = [{**sources[0], "path": str(local), "count": None, "split": "train", "name": None, "revision": None}]
        rows = data_lib.read_rows(spec, "data.train", r.data)
        pairs, report = data_lib.tokenize_rows(rows, tokenizer, r.data, source=str(local))
        assert rows[0]["prompt"] == prompt and report.kept == 1 and report.dropped == {"duplicate": 1}
        assert len(pairs) == 1 and pairs[0].chosen_ids != pairs[0].rejected_ids
        if dataset == "orca-dpo-pairs":  # rendered as a conversation: system column and chat template included
            text = tokenizer.decode(pairs[0].prompt_ids)
            assert r.data.apply_chat_template and "You are a helpful assistant." in text and "<|im_start|>user" in text
