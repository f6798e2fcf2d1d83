"""`lora-dpo export`: adapter / merged / GGUF, each with a parity report against the trained policy.

Tolerances. The trained policy computes with the NF4 round trip of each base weight plus the LoRA path. Merging the
deltas into that round trip in fp32 gives the same function up to fp32 rounding, so an fp32 export must match to
1e-4 nats per sequence. A bf16 export then rounds every weight to 8 significant bits (relative error ≤ 2^-9 ≈
0.2 %); on this model that moves a sequence's summed log-prob by ~2e-3 nats, and BF16_TOL = 1e-2 leaves 5× headroom
while staying well below what merging into the original 16-bit weights costs (~6e-2 here, asserted ≥ 3× larger),
so a merge into the wrong weights cannot pass.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import arithmetic_rows, build_tiny, copy_run, write_jsonl

from lora_dpo import batching, cli, export, train
from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import recipe_from_dict

BF16_TOL = 1e-2
FP32_TOL = 1e-4


def _recipe(model: str, root: Path, **output) -> dict:
    rows = arithmetic_rows(40)
    return {
        "model": {"name_or_path": model},
        "data": {"train": str(write_jsonl(root / "train.jsonl", rows[:32])),
                 "eval": str(write_jsonl(root / "eval.jsonl", rows[32:])), "max_length": 64, "max_prompt_length": 32},
        "train": {"max_steps": 3, "learning_rate": 5e-3, "per_device_train_batch_size": 4},
        "evaluation": {"generations": 0, "max_new_tokens": 4},
        "output": {"dir": str(root / "run"), **output},
    }


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    return train(recipe_from_dict(_recipe(str(tiny_model_dir), root))).output_dir


def _parity(out: Path) -> dict:
    return json.loads((out / "parity.json").read_text())


def _no_temp_left(directory: Path) -> None:
    if directory.is_dir():
        assert not [p.name for p in directory.iterdir() if p.name.startswith(".tmp-")]


def test_adapter_export(run_dir):
    out = export(run_dir)
    assert out == run_dir / "export" / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "recipe.yaml", "README.md", "parity.json"):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == yaml.safe_load((run_dir / "recipe.yaml").read_text())
    card = (out / "README.md").read_text()
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert recipe["model"]["name_or_path"] in card and "beta 0.1" in card and "r 16" in card
    assert f"| loss | {last['loss']:.4g} |" in card and "eval.jsonl" in card
    p = _parity(out)
    # the exported adapter on the same base is the trained policy: identical log-probs
    assert p["max_abs_logp_diff"] == 0 and p["sequences"] == 16 and p["data"]["held_out"]
    assert p["exported_reward_accuracy"] == p["policy_reward_accuracy"]
    _no_temp_left(out.parent)


def _plain_logps(model, pairs, pad_id) -> torch.Tensor:
    from lora_dpo.logps import plain_batch_logps

    with torch.no_grad():
        return plain_batch_logps(model, batching.collate(pairs, pad_id))[0]


def test_merged_dequantized_computes_the_policy_and_original_does_not(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lora_dpo.evaluate import load_run
    from lora_dpo.export import heldout_pairs

    outs = {(base, dtype): export(run_dir, format="merged", base=base, dtype=dtype, out=tmp_path / f"{base}-{dtype}")
            for base, dtype in (("dequantized", "bf16"), ("dequantized", "fp32"), ("original", "fp32"))}
    deq = outs["dequantized", "bf16"]
    assert {"config.json", "generation_config.json", "tokenizer.json", "parity.json", "README.md"} <= {
        p.name for p in deq.iterdir()}
    assert list(deq.glob("*.safetensors")) and not list(deq.glob("*.bin"))
    assert "quantization_config" not in json.loads((deq / "config.json").read_text())

    # independent check with the textbook log-prob computation: the trained policy vs the files on disk
    recipe, policy, tokenizer, _ = load_run(run_dir)
    pairs, _ = heldout_pairs(recipe, tokenizer, None)
    want = _plain_logps(policy, pairs, tokenizer.pad_token_id)
    diffs = {}
    for key, out in outs.items():
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        diffs[key] = float((_plain_logps(model, pairs, tokenizer.pad_token_id) - want).abs().max())
        assert abs(diffs[key] - _parity(out)["max_abs_logp_diff"]) < 1e-3  # parity.json says the same
    assert diffs["dequantized", "fp32"] < FP32_TOL
    assert diffs["dequantized", "bf16"] < BF16_TOL
    assert diffs["original", "fp32"] > 3 * max(diffs["dequantized", "bf16"], 1e-3)  # merged into other weights

    p = _parity(deq)
    assert p["base"] == "dequantized" and p["quantized_layers_dequantized"] == 14 and p["lora_deltas_merged"] == 14
    assert p["exported_reward_accuracy"] == p["policy_reward_accuracy"] and 0 <= p["policy_reward_accuracy"] <= 1
    assert _parity(outs["original", "fp32"])["quantized_layers_dequantized"] == 0
    # it loads with from_pretrained and generates (the parity check generated with it)
    assert len(p["generations"]) == 4 and all(isinstance(g["exported"], str) for g in p["generations"])
    model = AutoModelForCausalLM.from_pretrained(deq)
    assert model.dtype == torch.bfloat16
    ids = torch.tensor([pairs[0].prompt_ids])
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    _no_temp_left(tmp_path)


def test_gguf_export(run_dir):
    import gguf
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    out = export(run_dir, format="gguf")
    assert out == run_dir / "export" / "gguf-dequantized"
    p = _parity(out)
    path = out / "model-bf16.gguf"
    assert p["gguf_file"] == path.name and path.is_file()
    assert p["read_back"]["types"] == ["BF16", "F32"] and p["read_back"]["tensors"] == 21  # 2 layers × 9 + 3
    assert p["greedy_tokens_vs_merged"]["equal"] == p["greedy_tokens_vs_merged"]["prompts"] == 4
    assert p["tokenizer_rebuilt_from_gguf"] == {"texts": 4, "same_token_ids": 4, "chat_template": True}
    assert p["max_abs_logp_diff"] < BF16_TOL  # the GGUF as transformers reloads it vs the trained policy

    # independently: metadata as llama.cpp names it, and q/k rows undone by transformers' own reverse permutation
    cfg = AutoConfig.from_pretrained(yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["name_or_path"])
    reader = gguf.GGUFReader(str(path))
    f = reader.fields
    assert f["general.architecture"].contents() == "llama"
    assert f["llama.attention.head_count"].contents() == cfg.num_attention_heads == 4
    assert f["llama.attention.head_count_kv"].contents() == cfg.num_key_value_heads == 2
    assert f["tokenizer.ggml.model"].contents() == "gpt2" and len(f["tokenizer.ggml.tokens"].data) == cfg.vocab_size
    merged = export(run_dir, format="merged", dtype="fp32", out=out.parent / "check-merged")
    from safetensors.torch import load_file

    weights = load_file(next(merged.glob("*.safetensors")))
    undo = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for t in reader.tensors:
        if t.name in ("blk.1.attn_q.weight", "blk.1.attn_k.weight"):
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            back = undo.process(values, t.name).weights
            hf = weights[f"model.layers.1.self_attn.{t.name.split('.')[2][-1]}_proj.weight"].numpy()
            assert np.abs(back - hf).max() <= np.abs(hf).max() * 2**-8  # bf16 rounding only
            assert np.abs(values - hf).max() > 10 * np.abs(back - hf).max()  # and the rows really were reordered
    shutil.rmtree(merged)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def small_tokenizer():
    """A byte-level BPE tokenizer with a ~400-token vocabulary (GGUF files with the demo's 49k tokens take seconds
    to parse; the demo tokenizer is covered by test_gguf_export)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([r["prompt"] + r["chosen"] + r["rejected"] for r in arithmetic_rows(200, seed=7)],
                            trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML)


def test_gguf_base_round_trip(tmp_path, monkeypatch):
    """A .gguf base trains and exports back to GGUF (from the recipe, and q8_0 from the CLI)."""
    from transformers import AutoModelForCausalLM

    from lora_dpo.export_gguf import write_gguf

    monkeypatch.setenv("LORA_DPO_CACHE", str(tmp_path / "cache"))
    tokenizer = small_tokenizer()
    hf = build_tiny(tmp_path / "hf", tokenizer, seed=1, tie_word_embeddings=True)  # as SmolLM2: no output.weight
    base = tmp_path / "tiny.gguf"
    write_gguf(AutoModelForCausalLM.from_pretrained(hf), tokenizer, base, "f16", name="tiny", pre="smollm")
    recipe = _recipe(str(base), tmp_path, export=["gguf"])
    recipe["train"]["max_steps"] = 2
    run = train(recipe_from_dict(recipe))
    out = run.output_dir / "export" / "gguf-dequantized"
    p = _parity(out)
    assert p["tokenizer_pre"] == "smollm"  # kept from the base file
    assert p["tokenizer_rebuilt_from_gguf"] == {"texts": 4, "same_token_ids": 4, "chat_template": True}
    assert p["max_abs_logp_diff"] < BF16_TOL and p["greedy_tokens_vs_merged"]["equal"] == 4
    assert p["tensors"] == 20  # token_embd, output_norm, 2 × 9 per layer; the tied head is not written twice

    q8 = tmp_path / "q8"
    assert cli.main(["export", str(run.output_dir), "--format", "gguf", "--gguf-type", "q8_0", "--out", str(q8)]) == 0
    p8 = _parity(q8)
    assert (q8 / "model-q8_0.gguf").is_file() and p8["read_back"]["types"] == ["F32", "Q8_0"]
    assert p8["read_back"]["max_abs_err_relative_to_tensor_max"] < 1 / 127  # q8_0: one step of a block's scale
    assert p8["max_abs_logp_diff"] < 0.1 and p8["f16_fallback_tensors"] == []


def test_cli_errors_and_nothing_half_written(run_dir, tmp_path, capsys, monkeypatch):
    def fails(argv, text):
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and text in err and "Traceback" not in err, err

    fails(["export", str(tmp_path / "nope")], "not a finished run directory")
    fails(["export", str(run_dir), "--format", "onnx"], "invalid choice: 'onnx'")
    out = tmp_path / "a"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    before = (out / "parity.json").stat().st_mtime_ns
    fails(["export", str(run_dir), "--out", str(out)], "already exists; pass --force")
    assert (out / "parity.json").stat().st_mtime_ns == before
    assert cli.main(["export", str(run_dir), "--out", str(out), "--force"]) == 0
    assert (out / "parity.json").stat().st_mtime_ns != before
    pairs = write_jsonl(tmp_path / "other.jsonl", arithmetic_rows(5, seed=3))
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "b"), "--data", str(pairs)]) == 0
    assert _parity(tmp_path / "b")["data"] == {"source": str(pairs), "held_out": True, "pairs_available": 5,
                                               "pairs_used": 5}

    # a run without held-out data: a few training pairs, and parity.json says so
    no_eval = tmp_path / "no-eval-run"
    shutil.copytree(run_dir / "adapter", no_eval / "adapter")
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["data"]["eval"] = None
    (no_eval / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    note = _parity(export(no_eval))["data"]
    assert not note["held_out"] and note["pairs_used"] == 8 and "no data.eval" in note["note"]
    assert "on 8 training pairs (the run has no held-out data)" in capsys.readouterr().out

    # a run over a non-llama base: refused for GGUF before any model is loaded
    from transformers import GPT2Config

    other = tmp_path / "gpt2-run"
    shutil.copytree(run_dir / "adapter", other / "adapter")
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["model"]["name_or_path"] = str(tmp_path / "gpt2")
    (other / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    fails(["export", str(other), "--format", "gguf"], "architecture 'gpt2' is not supported (supported: llama")
    assert not (other / "export").exists()

    # a failure while writing leaves neither the export nor a temporary directory
    def boom(*a, **k):
        raise LoraDpoError("simulated failure while writing")

    monkeypatch.setattr(sys.modules["lora_dpo.export"], "_write_merged", boom)
    with pytest.raises(LoraDpoError, match="simulated"):
        export(run_dir, format="merged", out=tmp_path / "x" / "merged")
    assert not (tmp_path / "x").exists()
    with pytest.raises(LoraDpoError, match="--dtype 'int4'"):
        export(run_dir, format="merged", dtype="int4")
    _no_temp_left(tmp_path)
    _no_temp_left(run_dir / "export")
    bad = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    bad["output"]["export"] = ["onnx"]
    with pytest.raises(LoraDpoError, match="output.export"):
        recipe_from_dict(bad)


def _no_model_loads(monkeypatch) -> None:
    def load_run(*a, **k):
        raise AssertionError("the base model was loaded before the arguments were checked")

    monkeypatch.setattr(sys.modules["lora_dpo.evaluate"], "load_run", load_run)


def test_force_replaces_only_a_previous_export(run_dir, tmp_path, monkeypatch):
    """--force never deletes the run, a directory holding it, the working directory, a part of a run or the user's
    files; it replaces a previous export (or fills an empty directory), and a failed export keeps the old one."""
    def refused(out, text, **kw):
        with pytest.raises(LoraDpoError, match=text):
            export(run_dir, out=out, force=True, **kw)

    run_files = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    refused(run_dir, "is the run directory")
    refused(run_dir.parent, "is the run directory .* or holds it")
    refused(run_dir / "adapter", "inside 'adapter' of the training run")
    refused(run_dir / "adapter" / "sub", "inside 'adapter' of the training run")
    user = tmp_path / "user"
    (user / "inner").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    refused(user, "holds files that are not a lora-dpo export")
    monkeypatch.chdir(user / "inner")
    refused(Path("."), "is the current directory or holds it")
    refused(Path(".."), "is the current directory or holds it")
    assert (user / "notes.txt").read_text() == "mine" and (user / "inner").is_dir()
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == run_files

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(run_dir, out=empty, force=True) == empty
    written = _parity(empty)
    assert set(written["files"]) == {p.name for p in empty.iterdir()} and "parity.json" in written["files"]

    def boom(*a, **k):
        raise RuntimeError("simulated failure while writing")

    monkeypatch.setattr(sys.modules["lora_dpo.export"], "_write_adapter", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        export(run_dir, out=empty, force=True)
    assert _parity(empty) == written  # the previous export is still there, whole
    monkeypatch.undo()
    (empty / "my-notes.md").write_text("added by hand")
    refused(empty, r"previous export with files added to it \(my-notes.md\)")
    assert (empty / "my-notes.md").is_file()
    _no_temp_left(tmp_path)


def test_damaged_adapter_and_bad_arguments_fail_before_the_model_loads(run_dir, tmp_path, capsys, monkeypatch):
    _no_model_loads(monkeypatch)
    with pytest.raises(LoraDpoError, match="--data: file .*missing.jsonl' not found"):
        export(run_dir, out=tmp_path / "x", data=str(tmp_path / "missing.jsonl"))

    def fails(run: Path, text: str) -> str:
        capsys.readouterr()
        assert cli.main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and text in err and "Traceback" not in err, err
        return err

    empty = copy_run(run_dir, tmp_path / "empty")
    for f in (empty / "adapter").iterdir():
        f.unlink()
    err = fails(empty, "adapter_config.json' is missing")
    assert "train the run again" in err  # no checkpoint to restore it from
    corrupt = copy_run(run_dir, tmp_path / "corrupt")
    weights = corrupt / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    step = corrupt / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    err = fails(corrupt, "adapter_model.safetensors' is corrupt or truncated")
    assert "train.resume_from_checkpoint=latest" in err and str(step / "adapter") in err
    assert not (tmp_path / "out").exists()


def test_model_card_renders_sources_eval_split_and_steps_trained(tmp_path):
    from lora_dpo.export_card import model_card

    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", [{"step": 6, "loss": 0.69}, {"step": 12, "loss": 0.5}])
    (run / "data_report.json").write_text(json.dumps({"eval": {"rows": 6, "kept": 6}}))
    recipe = recipe_from_dict({
        "model": {"name_or_path": "some/model"},
        "data": {"train": [{"path": "a.jsonl", "weight": 0.7},
                           {"path": "org/prefs", "name": "default", "split": "train_prefs", "count": 500}],
                 "eval_split": 0.02},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "train": {"max_steps": -1, "num_train_epochs": 2}, "output": {"dir": str(run)}})
    parity = {"data": {"pairs_used": 6, "held_out": True, "source": "data.eval_split=0.02 of data.train"},
              "policy": "4-bit nf4 base + adapter (as trained)", "max_abs_logp_diff": 0.0, "mean_abs_logp_diff": 0.0,
              "exported_reward_accuracy": 1.0, "policy_reward_accuracy": 1.0}
    card = model_card(run, recipe, "adapter", parity)
    assert "{'path'" not in card and "None" not in card and "target_modules q_proj, v_proj" in card
    assert "- training pairs, mixed from 2 sources:\n  - `a.jsonl` (weight 0.7)\n" in card
    assert "  - `org/prefs [default/train_prefs]` (500 rows)\n" in card
    assert "- held-out pairs: 2 % of the training sources" in card and "data.eval_split 0.02" in card
    assert ": 6 pairs" in card and "held-out pairs: none" not in card
    assert "12 steps (num_train_epochs 2)" in card and "max_steps -1" not in card

    recipe.data.train, recipe.data.eval_split, recipe.data.eval = "t.jsonl", 6, [{"path": "e.jsonl"}]
    card = model_card(run, recipe, "adapter", parity)
    assert "- training pairs: `t.jsonl`\n- held-out pairs: `e.jsonl`\n" in card


def test_demo_model_merge(tmp_path):
    """The real demo model (SmolLM2-135M from its Q4_1 GGUF, tied embeddings): merged into the NF4 round trip it
    computes the trained policy; merged into the original weights it does not."""
    rows = [{"prompt": f"What is {a} plus {a}?", "chosen": f" Ahoy! {2 * a}.", "rejected": f" {2 * a}."}
            for a in range(1, 5)]
    run = train(recipe_from_dict({
        "model": {"name_or_path": "demo:smollm2-135m-instruct"},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "max_length": 32, "max_prompt_length": 16},
        "train": {"max_steps": 2, "learning_rate": 1e-3, "per_device_train_batch_size": 2},
        "evaluation": {"generations": 0, "max_new_tokens": 4}, "output": {"dir": str(tmp_path / "run")}}))
    deq = _parity(export(run.output_dir, format="merged", dtype="fp32"))
    orig = _parity(export(run.output_dir, format="merged", base="original", dtype="fp32"))
    assert deq["quantized_layers_dequantized"] == 210 and deq["lora_deltas_merged"] == 210  # 30 layers × 7
    assert deq["max_abs_logp_diff"] < FP32_TOL * 10  # 30 layers of fp32 rounding (measured 3e-5)
    assert orig["max_abs_logp_diff"] > 0.5  # measured 5.6 nats: NF4 moved the weights the adapter was trained on
    assert not deq["data"]["held_out"]


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_llama_cpp_loads_the_gguf(tmp_path, gguf_type):
    """llama.cpp itself (llama-cpp-python) reads the file: same tokens for the same text, same next-token choices."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    from lora_dpo.export_gguf import write_gguf

    tokenizer = small_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(build_tiny(tmp_path / "hf", tokenizer, seed=2)).eval()
    path = tmp_path / f"tiny-{gguf_type}.gguf"
    write_gguf(model, tokenizer, path, gguf_type)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1)
    try:
        text = "What is 12 plus 30? 42."
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        llm.eval(ids)
        theirs = torch.tensor(np.array(llm.scores[: len(ids)]))  # (T, V)
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]  # (T, V)
    scale = float(ours.abs().max())
    # f16 weights: ~0.1 % of the largest logit here (q/k rows left in HF order give 1.3 %); q8_0 also quantizes
    # the activations inside llama.cpp's dot products: ~1.5 %
    assert float((theirs - ours).abs().max()) < (0.004 if gguf_type == "f16" else 0.05) * scale
    top2 = ours.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * scale  # positions whose choice rounding cannot flip
    assert clear.sum() >= 3 and bool((theirs.argmax(-1) == ours.argmax(-1))[clear].all())
