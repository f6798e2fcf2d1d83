"""`lora-dpo eval RUN_DIR`: held-out metrics, KL estimate, reference vs policy answers, reward-model win rate,
eval.json and a refreshed report.html."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import arithmetic_rows, copy_run, write_jsonl

from lora_dpo import evaluate, train
from lora_dpo import model as model_lib
from lora_dpo.cli import main
from lora_dpo.errors import LoraDpoError
from lora_dpo.generation import kl_estimate
from lora_dpo.recipe import LoraConfig, ModelConfig, QuantizationConfig, recipe_from_dict
from lora_dpo.reward_model import score, win_rate


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    rows = arithmetic_rows(40)
    train_file, eval_file = write_jsonl(tmp / "train.jsonl", rows[:32]), write_jsonl(tmp / "eval.jsonl", rows[32:])
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(train_file), "eval": str(eval_file), "max_length": 64, "max_prompt_length": 32},
        "train": {"max_steps": 3, "learning_rate": 5e-3, "per_device_train_batch_size": 4},
        "evaluation": {"generations": 2, "max_new_tokens": 4, "behaviour_regex": r"\d", "kl_samples": 8},
        "output": {"dir": str(tmp / "run")}})
    return train(recipe)


def test_eval_of_a_finished_run(finished_run, tmp_path):
    run = finished_run
    assert (run.output_dir / "report.html").is_file()  # every training run writes its report
    trained = json.loads((run.output_dir / "eval.json").read_text())
    (run.output_dir / "eval.json").unlink()
    (run.output_dir / "report.html").unlink()
    result = evaluate(run.output_dir)
    saved = json.loads((run.output_dir / "eval.json").read_text())
    assert saved["pairs"] == 8 and len(saved["generations"]) == 8  # every behaviour prompt (≤ 8 here)
    assert saved["after"]["eval/rewards/margins"] == result["after"]["eval/rewards/margins"]
    assert saved["after"]["eval/loss"] > 0 and 0 <= saved["after"]["eval/rewards/accuracies"] <= 1
    assert saved["before"]["behaviour_rate"] is not None
    # the eval numbers agree with the ones the training run logged at its end
    assert abs(saved["after"]["eval/rewards/margins"] - run.eval_metrics["eval/rewards/margins"]) < 1e-5
    # chosen/rejected log-probs of both models; the reference's are the before-training numbers of the run
    logps = saved["logps"]
    assert logps["policy"]["chosen"] == saved["after"]["eval/logps/chosen"]
    assert abs(logps["reference"]["chosen"] - trained["before"]["eval/logps/chosen"]) < 1e-3
    assert abs(logps["reference"]["rejected"] - trained["before"]["eval/logps/rejected"]) < 1e-3
    # the KL estimate is seeded: the same number at the end of training and in `lora-dpo eval`
    kl = saved["kl"]
    assert kl["samples"] == 8 and kl["seed"] == 42 and "log π_θ(y|x) − log π_ref(y|x)" in kl["estimator"]
    assert math.isfinite(kl["kl"]) and kl["kl"] != 0 and abs(kl["kl"] - trained["kl"]["kl"]) < 1e-4
    assert (run.output_dir / "report.html").is_file()  # refreshed by eval
    assert "KL(policy ‖ reference)" in (run.output_dir / "report.html").read_text()
    res = subprocess.run([sys.executable, "-m", "lora_dpo", "eval", str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "not a finished run directory" in res.stderr


def test_kl_estimate_matches_the_exact_kl_of_one_token(tiny_model_dir, tokenizer):
    """With one new token the KL of the next-token distributions is exact; the sampled estimate must agree within
    its standard error, and sampling must leave the global RNG as it was."""
    base = model_lib.load_base(ModelConfig(str(tiny_model_dir)), QuantizationConfig(load_in_4bit=False),
                               torch.float32, torch.device("cpu"))
    model = model_lib.attach_lora(base, LoraConfig(r=8), seed=0, gradient_checkpointing=False)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)  # move the policy away from the reference
    model.get_base_model().lm_head.weight.data.mul_(8)  # a random init is near uniform; sharpen it
    prompts = [tokenizer(f"What is {a} plus {a + 1}?")["input_ids"] for a in range(4)]
    with torch.no_grad():
        exact = []
        for ids in prompts:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(input_ids=x).logits[0, -1].float(), -1)
            with model_lib.reference_mode(model):
                logq = torch.log_softmax(model(input_ids=x).logits[0, -1].float(), -1)
            exact.append(float((logp.exp() * (logp - logq)).sum()))
    exact_kl = sum(exact) / len(exact)
    state = torch.get_rng_state()
    est = kl_estimate(model, tokenizer, prompts * 100, max_new_tokens=1, seed=3, batch_size=100)
    assert torch.equal(torch.get_rng_state(), state)
    assert est["samples"] == 400 and est["tokens"] == 400 and est["std_error"] > 0
    assert exact_kl > 0.05  # a KL worth measuring
    assert abs(est["kl"] - exact_kl) < 4 * est["std_error"], (est, exact_kl)
    again = kl_estimate(model, tokenizer, prompts * 100, max_new_tokens=1, seed=3, batch_size=50)
    assert again["kl"] == pytest.approx(est["kl"], abs=1e-5)  # seeded: batch size does not change the samples
    other = kl_estimate(model, tokenizer, prompts * 100, max_new_tokens=1, seed=4, batch_size=100)
    assert other["kl"] != est["kl"]


def test_win_rate_counts_ties_apart():
    w = win_rate([1.0, 2.0, 3.0, 0.5], [0.0, 2.0, 4.0, 0.25])
    assert (w["wins"], w["ties"], w["losses"], w["prompts"]) == (2, 1, 1, 4)
    assert w["win_rate"] == 0.5 and w["tie_rate"] == 0.25 and w["loss_rate"] == 0.25
    assert w["mean_score_policy"] == pytest.approx(6.5 / 4) and w["mean_score_reference"] == pytest.approx(6.25 / 4)


def test_reward_model_win_rate(finished_run, tokenizer, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    LlamaForSequenceClassification(cfg).save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    result = evaluate(finished_run.output_dir, reward_model=str(rm_dir), reward_prompts=6)
    rm = result["reward_model"]
    gens = result["generations"]
    scored = [g for g in gens if "score_policy" in g]
    assert rm["model"] == str(rm_dir) and rm["prompts"] == len(scored) == 6
    # the win rate follows from the per-answer scores stored beside the answers
    wins = sum(g["score_policy"] > g["score_reference"] for g in scored)
    ties = sum(g["score_policy"] == g["score_reference"] for g in scored)
    assert (rm["wins"], rm["ties"], rm["losses"]) == (wins, ties, 6 - wins - ties)
    assert rm["win_rate"] == wins / 6 and rm["tie_rate"] == ties / 6
    # ... and the scores are the reward model's own output on prompt + answer through its chat template
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    for g in scored[:2]:
        for who in ("policy", "reference"):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": g["prompt"]},
                                                 {"role": "assistant", "content": g[who]}], return_dict=True,
                                                tokenize=True)["input_ids"]
            with torch.no_grad():
                expected = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
            assert g[f"score_{who}"] == pytest.approx(expected, abs=1e-5)
    assert len({g["score_policy"] for g in scored}) > 1  # not a constant
    assert rm["texts_cut_to_context"] == 0
    saved = json.loads((finished_run.output_dir / "eval.json").read_text())
    assert saved["reward_model"] == rm
    assert "policy wins" in capsys.readouterr().out
    assert "Reward model" in (finished_run.output_dir / "report.html").read_text()


def test_reward_model_must_be_a_sequence_classifier(finished_run, tiny_model_dir, tmp_path, capsys):
    assert main(["eval", str(finished_run.output_dir), "--reward-model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert "not a sequence-classification model" in err and "LlamaForCausalLM" in err
    assert main(["eval", str(finished_run.output_dir), "--reward-model", str(tmp_path / "missing" / "x")]) == 2
    assert "is not a model directory or a hub id" in capsys.readouterr().err


def test_eval_of_a_run_with_an_eval_split(tiny_model_dir, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(40))
    run = train(recipe_from_dict({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(train_file), "eval_split": 6, "max_length": 64, "max_prompt_length": 32},
        "train": {"max_steps": 1, "per_device_train_batch_size": 4},
        "evaluation": {"generations": 6, "max_new_tokens": 2, "kl_samples": 0},
        "output": {"dir": str(tmp_path / "run")}}))
    trained = json.loads((run.output_dir / "eval.json").read_text())
    result = evaluate(run.output_dir)
    assert result["pairs"] == trained["pairs"] == 6 and "eval_split=6" in result["data"]
    # the reference's numbers from before training are kept, not replaced by nothing
    saved = json.loads((run.output_dir / "eval.json").read_text())
    assert saved["before"]["eval/loss"] == trained["before"]["eval/loss"] and "eval/rewards/margins" in saved["before"]
    # the same held-out rows as the run used (same split_seed)
    assert [g["prompt"] for g in result["generations"]] == [g["prompt"] for g in trained["generations"]]
    assert result["kl"] is None


def test_reward_model_texts_beyond_its_context_keep_their_end(tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def ids(prompt, answer):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}], return_dict=True,
                                             tokenize=True)["input_ids"]

    long_answer = "one two three four five six seven eight nine ten eleven twelve"
    limit = len(ids("Hi", "Yo")) + 1  # the short text fits, the long one does not
    assert len(ids("Count.", long_answer)) > limit
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, max_position_embeddings=limit,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).eval()
    scores, cut = score(model, tokenizer, ["Count.", "Hi"], [long_answer, "Yo"])
    assert cut == 1
    with torch.no_grad():
        kept_end = torch.tensor([ids("Count.", long_answer)[-limit:]])
        assert scores[0] == pytest.approx(float(model(input_ids=kept_end).logits[0, 0]), abs=1e-6)


def test_held_out_eval_runs_under_the_training_autocast(tiny_model_dir, monkeypatch):
    """On a GPU, training computes in bf16/fp16 under autocast; held-out metrics use the same numbers (and the same
    compiled FlexAttention kernels). On this CPU the context is a no-op, so the test checks what it is asked for."""
    import contextlib

    from conftest import trained_lora

    from lora_dpo.data import Pair
    from lora_dpo.evaluate import evaluate_pairs
    from lora_dpo.recipe import DpoConfig

    asked = []
    monkeypatch.setattr(model_lib, "autocast", lambda device, dtype: asked.append((device, dtype))
                        or contextlib.nullcontext())
    m = trained_lora(tiny_model_dir, dtype=torch.bfloat16)
    pairs = [Pair([5, 6, 7], [8, 9], [10], 0), Pair([11], [12, 13], [14, 15], 1), Pair([16, 17], [18], [19], 2)]
    result = evaluate_pairs(m, pairs, DpoConfig(), 2, 0, torch.device("cpu"))
    assert asked == [(torch.device("cpu"), torch.bfloat16)] * 2 and math.isfinite(result["eval/loss"])


def test_bad_arguments_and_a_damaged_adapter_fail_before_the_model_loads(finished_run, tmp_path, monkeypatch,
                                                                         capsys):
    def load_run(*a, **k):
        raise AssertionError("the base model was loaded before the arguments were checked")

    monkeypatch.setattr(sys.modules["lora_dpo.evaluate"], "load_run", load_run)
    run = finished_run.output_dir
    for kwargs, text in (({"generations": -3}, "--generations must be >= 0"),
                         ({"reward_prompts": 0}, "--reward-prompts must be > 0"),
                         ({"reward_prompts": -1}, "--reward-prompts must be > 0"),
                         ({"data": str(tmp_path / "missing.jsonl")}, "--data: file .* not found"),
                         ({"reward_model": str(tmp_path / "nonexistent" / "rm")}, "is not a model directory")):
        with pytest.raises(LoraDpoError, match=text):
            evaluate(run, **kwargs)
    no_eval = copy_run(run, tmp_path / "no-eval", data__eval=None)
    with pytest.raises(LoraDpoError, match="has no data.eval or data.eval_split; pass --data"):
        evaluate(no_eval)

    empty = copy_run(run, tmp_path / "empty")
    for f in (empty / "adapter").iterdir():
        f.unlink()
    corrupt = copy_run(run, tmp_path / "corrupt")
    (corrupt / "adapter" / "adapter_model.safetensors").write_bytes(b"\x90\x3d" + bytes(998))
    for damaged, text in ((empty, "adapter_config.json' is missing"),
                          (corrupt, "adapter_model.safetensors' is corrupt or truncated")):
        capsys.readouterr()
        assert main(["eval", str(damaged)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and text in err and "train the run again" in err, err


def data_pair(index: int):
    from lora_dpo.data import Pair

    return Pair([1, 2], [3], [4], index)


def test_before_after_lines_have_no_dangling_label(capsys):
    """Before training the reference has no metrics: without a behaviour_regex there is nothing to print for it."""
    from lora_dpo.evaluate import Snapshot, print_before_after

    metrics = {"eval/rewards/accuracies": 1.0, "eval/rewards/margins": 0.04, "eval/loss": 0.67}
    before, after = Snapshot(None, ["", "4"], None), Snapshot(metrics, [" ", "5"], None)
    rows = [{"prompt": "What is 2+2?"}, {"prompt": "What is 2+3?"}]
    pairs = [data_pair(0), data_pair(1)]
    print_before_after(before, after, rows, pairs, 1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "held-out, after training (policy): reward accuracy 1.00, margin +0.040, loss 0.6700"
    assert not any(line.rstrip() != line or line.endswith(":") for line in lines), lines
    assert "  reference: (empty answer)" in lines and "  policy:    (empty answer)" in lines
    print_before_after(Snapshot(None, [], 0.5), Snapshot(metrics, [], 0.75), rows, pairs, 0)
    assert capsys.readouterr().out.splitlines() == [
        "held-out, before training (reference): behaviour rate 50%",
        "held-out, after training (policy):     reward accuracy 1.00, margin +0.040, loss 0.6700, behaviour rate 75%"]


def test_eval_prints_no_library_noise(finished_run, tmp_path):
    """bitsandbytes' advice to `pip install kernels` (at import, on CPUs with AVX512-BF16) and transformers'
    FutureWarning about is_gradient_checkpointing (read by peft) are dropped, as training drops them."""
    from lora_dpo.evaluate import load_run

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_run(finished_run.output_dir)
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]
    # a run whose base model has gone: the error comes after peft (and bitsandbytes) are imported, on one line
    gone = copy_run(finished_run.output_dir, tmp_path / "gone", model__name_or_path=str(tmp_path / "no-model"))
    res = subprocess.run([sys.executable, "-m", "lora_dpo", "eval", str(gone)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no-model" in res.stderr, res.stderr


def test_held_out_batches_are_read_back_after_the_last_one_runs(tiny_model_dir, monkeypatch):
    """On a GPU reading a batch's results back waits for it: the held-out pass queues every batch first, then reads
    them all — the same metrics as reading each as it comes (a pair-weighted mean)."""
    from conftest import trained_lora

    from lora_dpo.data import Pair
    from lora_dpo.evaluate import evaluate_pairs
    from lora_dpo.objective import MetricMeter
    from lora_dpo.recipe import DpoConfig

    m = trained_lora(tiny_model_dir)
    pairs = [Pair([5, 6, 7], [8, 9], [10], 0), Pair([11], [12, 13], [14, 15], 1), Pair([16, 17], [18], [19], 2)]
    module = sys.modules["lora_dpo.evaluate"]  # the package's `evaluate` is the Python API's function
    events, forward, add = [], module.dpo_forward, MetricMeter.add
    monkeypatch.setattr(module, "dpo_forward", lambda *a, **k: events.append("fwd") or forward(*a, **k))
    monkeypatch.setattr(MetricMeter, "add", lambda self, *a: events.append("read") or add(self, *a))
    result = evaluate_pairs(m, pairs, DpoConfig(), 2, 0, torch.device("cpu"), ties=True)
    assert events == ["fwd", "fwd", "read", "read"]
    monkeypatch.undo()
    one = [evaluate_pairs(m, [p], DpoConfig(), 1, 0, torch.device("cpu"), ties=True) for p in pairs]
    for key in ("eval/loss", "eval/rewards/margins", "eval/logps/chosen", "eval/ties"):
        assert result[key] == pytest.approx(sum(r[key] for r in one) / 3, rel=1e-5, abs=1e-6)
