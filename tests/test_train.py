"""The loop end to end on a tiny 4-bit model: step-0 check, metrics, eval, checkpoints, exact resume, CLI."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_dpo import train
from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import TrainConfig, load_recipe, recipe_from_dict
from lora_dpo.train import make_scheduler

TRAIN_KEYS = {"step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_mb"}


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_run_directory(recipe_dict, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe_dict["train"].update(max_steps=4, eval_steps=2, save_steps=2)
    result = train(recipe_from_dict(recipe_dict))
    out = result.output_dir
    assert abs(result.step0_loss - math.log(2)) < 1e-4
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(TRAIN_KEYS <= set(r) for r in rows)
    assert "eval/rewards/accuracies" in rows[1] and "eval/loss" in rows[3] and "eval/loss" not in rows[0]
    assert rows[0]["learning_rate"] == pytest.approx(1e-3) and rows[-1]["learning_rate"] < 1e-3
    assert rows[-1]["loss"] != pytest.approx(math.log(2), abs=1e-6)  # it moved
    # resolved recipe: defaults filled in, loads back to the same recipe
    assert load_recipe(out / "recipe.yaml") == recipe_from_dict(recipe_dict)
    assert "bnb_4bit_quant_type: nf4" in (out / "recipe.yaml").read_text()
    assert json.loads((out / "data_report.json").read_text())["train"]["kept"] == 32
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    # a standard PEFT adapter with the tokenizer beside it
    base = AutoModelForCausalLM.from_pretrained(recipe_dict["model"]["name_or_path"])
    peft = PeftModel.from_pretrained(base, out / "adapter")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in peft.named_parameters())
    assert AutoTokenizer.from_pretrained(out / "adapter").eos_token == "<|im_end|>"


@pytest.mark.parametrize("loss_type, extra", [("ipo", {}), ("hinge", {}), ("robust", {"label_smoothing": 0.1}),
                                              ("sigmoid", {"rpo_alpha": 0.5}), ("simpo", {"simpo_gamma": 0.3})])
def test_every_loss_trains(recipe_dict, loss_type, extra, capsys):
    recipe_dict["dpo"] = {"loss_type": loss_type, **extra}
    recipe_dict["data"].pop("eval")
    recipe_dict["train"]["max_steps"] = 2
    result = train(recipe_from_dict(recipe_dict))
    printed = capsys.readouterr().out
    assert "step-0 check" in printed
    assert "grouped by length, layout packed" in printed and "padding is" in printed
    assert "\nattention: sdpa (auto)\n" in printed  # what auto picked, on a CPU
    if loss_type == "simpo":
        assert result.step0_loss is None and "not applicable" in printed
    else:
        assert "✓" in printed
    assert all(math.isfinite(r["loss"]) for r in result.history)


def test_gradient_accumulation_matches_the_big_batch(recipe_dict, tmp_path):
    recipe_dict["data"].pop("eval")
    # Adam's first step is ≈ lr·sign(g); a large ε makes it ≈ lr·g so the weights compare the gradients themselves
    opt = {"max_steps": 1, "learning_rate": 1.0, "adam_epsilon": 1.0, "max_grad_norm": 0.0}
    a = dict(recipe_dict, train={**opt, "per_device_train_batch_size": 4}, output={"dir": str(tmp_path / "a")})
    b = dict(recipe_dict, train={**opt, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
             output={"dir": str(tmp_path / "b")})
    ra, rb = train(recipe_from_dict(a)), train(recipe_from_dict(b))
    wa = load_file(ra.adapter_dir / "adapter_model.safetensors")
    wb = load_file(rb.adapter_dir / "adapter_model.safetensors")
    assert ra.history[0]["grad_norm"] == pytest.approx(rb.history[0]["grad_norm"], rel=1e-4)
    assert any(not torch.equal(wa[k], torch.zeros_like(wa[k])) for k in wa if "lora_B" in k)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def test_resume_is_exact(recipe_dict, tmp_path):
    """Resuming from a checkpoint ends with the same adapter, bit for bit, and the same metrics after it."""
    recipe_dict["data"].pop("eval")
    recipe_dict["lora"] = {"lora_dropout": 0.1}  # the RNG state must be restored too
    recipe_dict["train"].update(max_steps=6, save_steps=3)
    full = train(recipe_from_dict(recipe_dict))
    crashed = tmp_path / "crashed"
    shutil.copytree(full.output_dir, crashed)
    shutil.rmtree(crashed / "adapter")  # as if killed after the step-3 checkpoint
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")  # step 4 was logged, then the crash
    recipe_dict["output"]["dir"] = str(crashed)
    recipe_dict["train"]["resume_from_checkpoint"] = "latest"
    resumed = train(recipe_from_dict(recipe_dict))
    assert resumed.step0_loss is None
    wa = load_file(full.adapter_dir / "adapter_model.safetensors")
    wb = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = [{k: v for k, v in r.items() if k not in ("tokens_per_second", "peak_memory_mb")}
             for r in metrics(full.output_dir)]
    assert [{k: v for k, v in r.items() if k not in ("tokens_per_second", "peak_memory_mb")}
            for r in metrics(crashed)] == strip


def test_existing_run_is_refused_and_untouched(recipe_dict):
    recipe_dict["train"]["max_steps"] = 1
    recipe_dict["data"].pop("eval")
    first = train(recipe_from_dict(recipe_dict))
    before = (first.output_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(LoraDpoError, match=r"already holds a finished run \(no checkpoint to resume\).*overwrite=true"):
        train(recipe_from_dict(recipe_dict))
    assert (first.output_dir / "metrics.jsonl").read_bytes() == before
    with pytest.raises(LoraDpoError, match="holds no checkpoint"):
        recipe_dict["train"]["resume_from_checkpoint"] = "latest"
        train(recipe_from_dict(recipe_dict))


@pytest.mark.parametrize("kind, warmup, expect", [
    ("linear", 0, [1.0, 0.75, 0.5, 0.25]),
    ("cosine", 0, [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
    ("constant", 2, [1 / 3, 2 / 3, 1.0, 1.0]),
    ("linear", 2, [1 / 3, 2 / 3, 1.0, 0.5]),
])
def test_schedules(kind, warmup, expect):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler(opt, TrainConfig(lr_scheduler_type=kind, warmup_steps=warmup), steps=4)
    seen = []
    for _ in range(4):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx(expect)


def test_cli_trains_and_refuses_to_overwrite(recipe_dict, tmp_path):
    recipe_dict["data"].pop("eval")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict))
    cmd = [sys.executable, "-m", "lora_dpo", str(path), "train.max_steps=2", "dpo.beta=0.05"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "step-0 check: loss 0.693147 = ln 2 ✓" in res.stdout
    assert "32 rows read, 32 pairs kept, 0 dropped" in res.stdout
    out = tmp_path / "run"
    assert load_recipe(out / "recipe.yaml").dpo.beta == 0.05
    assert len(metrics(out)) == 2
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "already holds a finished run" in res.stderr and "Traceback" not in res.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_tensorboard_gets_every_metric(recipe_dict):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe_dict["train"].update(max_steps=4, report_to=["tensorboard"], logging_steps=2, eval_steps=3)
    result = train(recipe_from_dict(recipe_dict))
    acc = EventAccumulator(str(result.output_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert TRAIN_KEYS - {"step"} <= tags
    assert [e.step for e in acc.Scalars("loss")] == [2, 3, 4]  # an eval step is logged, if not a logging step
    # eval at step 3 (eval_steps) and after training (step 4): trackers get the final held-out numbers too
    assert [e.step for e in acc.Scalars("eval/rewards/accuracies")] == [3, 4]
    assert [r["step"] for r in metrics(result.output_dir) if "eval/loss" in r] == [3, 4]


@pytest.mark.parametrize("override, needle", [
    ({"report_to": ["wandb"]}, "wandb is not installed"),
])
def test_unavailable_options_fail_before_writing(recipe_dict, override, needle):
    import importlib.util
    from pathlib import Path

    if "wandb" in needle and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here, so this error cannot happen")
    recipe_dict["train"].update(override)
    with pytest.raises(LoraDpoError, match=needle):
        train(recipe_from_dict(recipe_dict))
    assert not Path(recipe_dict["output"]["dir"]).exists()


def test_flex_attention_on_cpu_is_refused_before_writing(recipe_dict):
    from pathlib import Path

    recipe_dict.setdefault("model", {})["attn_implementation"] = "flex_attention"
    recipe_dict["train"]["device"] = "cpu"
    with pytest.raises(LoraDpoError, match="model.attn_implementation: flex_attention cannot train on CPU.*use sdpa"):
        train(recipe_from_dict(recipe_dict))
    assert not Path(recipe_dict["output"]["dir"]).exists()


def test_paged_8bit_adamw_trains_and_resumes(recipe_dict, tmp_path):
    """CPU twin of the GPU test: the 8-bit optimizer state round-trips through a checkpoint (no pickle)."""
    recipe_dict["data"].pop("eval")
    recipe_dict["train"].update(max_steps=4, save_steps=2, optim="paged_adamw_8bit")
    full = train(recipe_from_dict(recipe_dict))
    assert all(math.isfinite(r["loss"]) for r in full.history)
    opt_state = torch.load(full.output_dir / "checkpoints" / "step-00000002" / "optimizer.pt", weights_only=True)
    # bitsandbytes' own state layout, read back without unpickling
    assert all("__bnb_optimizer_quant_state__" in s for s in opt_state["state"].values())
    crashed = tmp_path / "crashed"
    shutil.copytree(full.output_dir, crashed)
    shutil.rmtree(crashed / "adapter")
    recipe_dict["output"]["dir"] = str(crashed)
    recipe_dict["train"]["resume_from_checkpoint"] = "latest"
    resumed = train(recipe_from_dict(recipe_dict))
    wa = load_file(full.adapter_dir / "adapter_model.safetensors")
    wb = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_gradient_checkpointing_run_matches_plain_run(recipe_dict, tmp_path, capsys):
    recipe_dict["data"].pop("eval")
    recipe_dict["train"]["max_steps"] = 2
    plain = train(recipe_from_dict(recipe_dict))
    for share, said in ((1.0, "2 of 2 decoder layers"), (0.5, "1 of 2 decoder layers"),  # all, the first half
                        ("auto", "2 of 2 decoder layers recompute in backward (auto: all, on a CPU)")):
        recipe_dict["train"].update(gradient_checkpointing=True, gradient_checkpointing_layers=share)
        recipe_dict["output"]["dir"] = str(tmp_path / f"gc{share}")
        capsys.readouterr()
        ckpt = train(recipe_from_dict(recipe_dict))
        assert f"gradient checkpointing: {said}" in capsys.readouterr().out
        for a, b in zip(plain.history, ckpt.history, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_checkpointed_layers_recompute_in_every_training_step(recipe_dict, monkeypatch):
    """Matching losses cannot tell a checkpointed run from one that silently ran without (transformers checkpoints a
    layer only in training mode; the base loads in eval mode, and evaluation in between switches to it): every
    decoder layer's attention runs twice with grad per step — the policy's forward and its recompute in backward —
    including the steps after a held-out evaluation. Without checkpointing, once. (Counted on the attention: the
    recompute calls the layer's forward past the layer's own hooks.)"""
    from lora_dpo import model as M

    real_attach, calls = M.attach_lora, {}

    def attach_and_count(*args, **kw):
        model = real_attach(*args, **kw)
        assert not any(m.training for m in model.modules())  # one mode throughout until training says otherwise
        for i, layer in enumerate(M.decoder_layers(model)):
            layer.self_attn.register_forward_pre_hook(
                lambda mod, _args, i=i: calls.update({i: calls.get(i, 0) + (mod.training and torch.is_grad_enabled())}))
        return model

    monkeypatch.setattr(M, "attach_lora", attach_and_count)
    for checkpointing, per_step in ((True, 2), (False, 1)):
        calls.clear()
        recipe_dict["train"].update(max_steps=3, eval_steps=1, gradient_checkpointing=checkpointing)
        recipe_dict["output"]["overwrite"] = True
        train(recipe_from_dict(recipe_dict))
        assert calls == {0: 3 * per_step, 1: 3 * per_step}


def test_training_takes_the_log_prob_gradient_in_forward_and_matches_the_recomputing_path(recipe_dict, tmp_path,
                                                                                         monkeypatch):
    """A real run's chunks take logps._TokenLogps (nothing in training hooks or wraps the LM head), and its losses
    and gradient norms equal a run whose chunks recompute their logits in backward."""
    from lora_dpo import logps

    recipe_dict["data"].pop("eval")
    recipe_dict["train"]["max_steps"] = 2
    calls = []
    real = logps._TokenLogps.apply
    monkeypatch.setattr(logps._TokenLogps, "apply", lambda *a: calls.append(1) or real(*a))
    fast = train(recipe_from_dict(recipe_dict))
    assert calls
    calls.clear()
    monkeypatch.setattr(logps, "_grad_in_forward", lambda head: False)
    recipe_dict["output"]["dir"] = str(tmp_path / "recompute")
    slow = train(recipe_from_dict(recipe_dict))
    assert not calls
    for a, b in zip(fast.history, slow.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_sdpa_causal_run_matches_sdpa_run(recipe_dict, tmp_path, capsys):
    """A whole run on sdpa_causal (step-0 check, training with checkpointing, held-out eval, generations) gives the
    sdpa run's losses, gradient norms and eval metrics."""
    recipe_dict["train"].update(max_steps=2, eval_steps=2, gradient_checkpointing=True)
    recipe_dict.setdefault("evaluation", {})["generations"] = 1
    runs = []
    for attn in ("sdpa", "sdpa_causal"):
        recipe_dict.setdefault("model", {})["attn_implementation"] = attn
        recipe_dict["output"]["dir"] = str(tmp_path / attn)
        capsys.readouterr()
        runs.append(train(recipe_from_dict(recipe_dict)))
        assert f"\nattention: {attn}\n" in capsys.readouterr().out
    sdpa, causal = runs
    assert abs(causal.step0_loss - math.log(2)) < 1e-4
    for a, b in zip(sdpa.history, causal.history, strict=True):
        for key in ("loss", "grad_norm", "eval/loss", "eval/rewards/margins"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


def test_auto_checkpoint_share_plans_against_the_gpu(tiny_model_dir, recipe_dict, monkeypatch):
    """train.gradient_checkpointing_layers auto on a GPU: the estimate's fewest layers (of the tiny model's 2) that
    fit with memory to spare, or all of them when nothing does; faked GPU sizes (the real one: test_gpu)."""
    from types import SimpleNamespace

    from lora_dpo import model as M
    from lora_dpo.recipe import ModelConfig, QuantizationConfig
    from lora_dpo.train import _auto_checkpoint_share

    base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.float32,
                       torch.device("cpu"))
    recipe_dict["train"].update(gradient_checkpointing=True, gradient_checkpointing_layers="auto")
    recipe = recipe_from_dict(recipe_dict)
    for gib, share, said in ((80, 0.5, "the fewest that fit"), (0.01, 1.0, "auto: all, and even so")):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, n=gib: SimpleNamespace(total_memory=int(n * 2**30)))
        got, why = _auto_checkpoint_share(recipe, base, torch.device("cuda"), [])
        assert got == share and said in why
    monkeypatch.setattr("lora_dpo.memory_model.FAMILIES", {})  # a family the planner does not model
    got, why = _auto_checkpoint_share(recipe, base, torch.device("cuda"), [])
    assert got == 1.0 and "auto: all, since estimate models the" in why and "'llama' is not one of them" in why


def test_a_recipes_checkpointing_share_says_when_auto_would_recompute_fewer(tiny_model_dir, recipe_dict,
                                                                           monkeypatch):
    """Every layer recomputing by the recipe's choice, on a GPU with room: the run says auto would recompute fewer
    (faster steps) — not when auto would recompute as many, on a CPU, or for a share already at auto's."""
    from types import SimpleNamespace

    from lora_dpo import model as M
    from lora_dpo.recipe import ModelConfig, QuantizationConfig
    from lora_dpo.train import _fewer_would_fit

    base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.float32,
                       torch.device("cpu"))
    recipe_dict["train"].update(gradient_checkpointing=True)
    recipe, cuda = recipe_from_dict(recipe_dict), torch.device("cuda")
    for gib, share, said in ((80, 1.0, "auto would recompute 1 of them on this GPU"), (80, 0.5, ""), (0.01, 1.0, "")):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, n=gib: SimpleNamespace(total_memory=int(n * 2**30)))
        got = _fewer_would_fit(recipe, base, cuda, [], share)
        assert (said in got) if said else got == "", (gib, share, got)
    assert _fewer_would_fit(recipe, base, torch.device("cpu"), [], 1.0) == ""
    monkeypatch.setattr(sys.modules["lora_dpo.train"], "_auto_checkpoint_share", lambda *a: 1 / 0)  # it trips
    assert _fewer_would_fit(recipe, base, cuda, [], 1.0) == ""


def test_precision_follows_the_device():
    from lora_dpo.model import device_and_dtype

    assert device_and_dtype("auto", "cpu") == (torch.device("cpu"), torch.float32)
    assert device_and_dtype("bf16", "cpu")[1] == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(LoraDpoError, match="no CUDA GPU"):
            device_and_dtype("auto", "cuda")


@pytest.mark.parametrize("native_bf16, want", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_on_gpus_with_and_without_native_bf16(monkeypatch, native_bf16, want):
    """A T4 (compute capability 7.5) only emulates bf16, and torch.cuda.is_bf16_supported() says True for emulation:
    auto must ask for native support and fall back to fp16 (trained under a GradScaler)."""
    from lora_dpo.model import device_and_dtype

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or native_bf16
                        or including_emulation)
    assert device_and_dtype("auto", "cuda") == (torch.device("cuda"), want)
    assert asked == [False]
    assert device_and_dtype("fp32", "cuda")[1] == torch.float32  # an explicit precision is kept


def test_fp16_scales_the_loss_and_overflow_is_not_a_data_problem(recipe_dict, monkeypatch, capsys):
    """fp16 runs under a GradScaler: its first scale is forced to overflow here, which skips that step
    and lowers the scale without counting towards max_nonfinite_steps; later steps train. (CPU twin of the T4 path.)"""
    real = torch.amp.GradScaler

    def huge(*args, **kwargs):  # 2**40 overflows fp16 gradients at once; one backoff brings it to 2**10
        return real(*args, **{**kwargs, "init_scale": 2.0 ** 40, "backoff_factor": 2.0 ** -30})

    monkeypatch.setattr(torch.amp, "GradScaler", huge)
    recipe_dict["data"].pop("eval")
    recipe_dict["train"].update(max_steps=4, precision="fp16", max_nonfinite_steps=1, save_steps=2)
    result = train(recipe_from_dict(recipe_dict))
    out = capsys.readouterr().out
    assert "non-finite" not in out  # the overflow was the scaler's, not counted as a bad step
    assert abs(result.step0_loss - math.log(2)) < 1e-3
    assert [r["step"] for r in result.history] == [2, 3, 4]  # step 1 overflowed and was skipped, not logged
    assert all(math.isfinite(r["loss"]) for r in result.history)
    assert result.history[-1]["loss"] != pytest.approx(math.log(2), abs=1e-6)  # later steps trained
    # the calibrated scale is checkpointed: a resumed run starts from 2**10, so step 3 does not overflow again
    state = json.loads((result.output_dir / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] == 2.0 ** 10
    recipe_dict["train"]["resume_from_checkpoint"] = "latest"
    resumed = train(recipe_from_dict(recipe_dict))
    assert [r["step"] for r in resumed.history] == [2, 3, 4]
    for a, b in zip(result.history, resumed.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.mark.gpu
def test_gpu_bf16_paged_adamw_run(recipe_dict):
    """GPU twin of the CPU loop tests: bf16 autocast, paged 8-bit AdamW, step-0 check still exact; the host's wait
    for the GPU logged from step 3 (twin: tests/test_pace.py, the measure forced on a CPU)."""
    recipe_dict["train"].update(max_steps=3, optim="paged_adamw_8bit", device="cuda")
    result = train(recipe_from_dict(recipe_dict))
    assert abs(result.step0_loss - math.log(2)) < 1e-4
    assert all(math.isfinite(r["loss"]) for r in result.history)
    assert result.history[-1]["peak_memory_mb"] > 0
    assert ["host_wait_share" in r for r in result.history] == [False, False, True]
    assert 0 <= result.history[-1]["host_wait_share"] <= 1


def test_step0_tolerance_follows_the_dtype():
    from lora_dpo.objective import step0_tolerance

    assert step0_tolerance(torch.float32, 0.1, 2048) == 1e-4
    bf16 = step0_tolerance(torch.bfloat16, 0.1, 2048)
    assert bf16 == pytest.approx(0.1 * 2048 ** 0.5 * 2 ** -7)  # ~0.035: above the 1.5e-3 an H200 showed
    assert step0_tolerance(torch.float16, 0.1, 2048) < bf16  # fp16 has 3 more mantissa bits
    assert step0_tolerance(torch.bfloat16, 0.1, 1) == pytest.approx(0.1 * 2 ** -7)
    assert step0_tolerance(torch.bfloat16, 1e-4, 1) == 1e-4  # never below fp32's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step0_check_passes_a_fresh_adapter_and_fails_a_trained_one(tiny_model_dir, tokenizer, dtype):
    from lora_dpo import model as M
    from lora_dpo.batching import build
    from lora_dpo.data import Pair
    from lora_dpo.errors import LoraDpoError
    from lora_dpo.objective import step0_check
    from lora_dpo.recipe import DpoConfig, LoraConfig, ModelConfig, QuantizationConfig

    base = M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(), torch.float32,
                       torch.device("cpu"))
    m = M.attach_lora(base, LoraConfig(r=4), seed=0, gradient_checkpointing=False)
    ids = [list(range(100 + 7 * i, 130 + 7 * i)) for i in range(6)]
    batch = build([Pair(ids[0], ids[1], ids[2], 0), Pair(ids[3], ids[4], ids[5], 1)], tokenizer.pad_token_id)
    printed = []
    assert abs(step0_check(m, batch, DpoConfig(), printed.append, dtype=dtype) - 0.6931472) < 1e-4
    assert "✓, margins 0 ✓" in printed[0]
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    with pytest.raises(LoraDpoError, match=r"step-0 check failed: .*tolerance"):
        step0_check(m, batch, DpoConfig(), printed.append, dtype=dtype)


def test_the_models_dropout_is_off_and_the_step0_check_runs_in_training_mode(tmp_path, tokenizer):
    """A model whose config has dropout (Phi-2, GPT-2, OPT …): left on, the policy and reference passes would drop
    different units and the margins be noise; off, they agree. The step-0 check runs in the mode training runs in,
    so dropout left on anywhere fails it."""
    from conftest import build_tiny

    from lora_dpo import model as M
    from lora_dpo.batching import build
    from lora_dpo.data import Pair
    from lora_dpo.errors import LoraDpoError
    from lora_dpo.objective import step0_check
    from lora_dpo.recipe import DpoConfig, LoraConfig, ModelConfig, QuantizationConfig

    path = build_tiny(tmp_path / "m", tokenizer, attention_dropout=0.3)
    base = M.load_base(ModelConfig(name_or_path=str(path), attn_implementation="eager"), QuantizationConfig(),
                       torch.float32, torch.device("cpu"))
    base.model.layers[0].mlp.register_forward_hook(lambda mod, inp, out: drop(out))  # a dropout torch can see
    drop = torch.nn.Dropout(0.3)
    base.add_module("extra_dropout", drop)
    m = M.attach_lora(base, LoraConfig(r=4, lora_dropout=0.2), seed=0, gradient_checkpointing=False)
    m.train()
    ids = [list(range(100 + 7 * i, 130 + 7 * i)) for i in range(6)]
    batch = build([Pair(ids[0], ids[1], ids[2], 0), Pair(ids[3], ids[4], ids[5], 1)], tokenizer.pad_token_id)
    with pytest.raises(LoraDpoError, match="step-0 check failed"):
        step0_check(m, batch, DpoConfig(), lambda s: None)
    assert M.disable_dropout(m) == ["Dropout p=0.3", "attention_dropout 0.3"]
    from lora_dpo.lora_dropout import DropoutLinear  # LoRA's dropout, folded into lora_A

    assert {mod.p for mod in m.modules() if isinstance(mod, DropoutLinear)} == {0.2}  # the user's, kept
    assert m.training and abs(step0_check(m, batch, DpoConfig(), lambda s: None) - math.log(2)) < 1e-5


@pytest.mark.parametrize("loss_type, beta", [("ipo", 0.1), ("ipo", 0.01), ("sigmoid", 0.1), ("robust", 0.1)])
def test_step0_loss_tolerance_follows_the_loss_slope(loss_type, beta):
    """Margins within the tolerance move IPO's loss by 1/(β²·n) of them (sigmoid's by 1/2): the loss's tolerance is
    the loss's own change over the margin tolerance, so rounding-level margins pass and a real offset fails."""
    from lora_dpo.objective import _loss_at_zero_margin
    from lora_dpo.recipe import DpoConfig

    cfg = DpoConfig(loss_type=loss_type, beta=beta, label_smoothing=0.2 if loss_type == "robust" else 0.0)
    tol = 3e-3
    expected, loss_tol = _loss_at_zero_margin(cfg, tol, 16)
    assert expected == pytest.approx({"ipo": 1 / (4 * beta**2), "sigmoid": math.log(2),
                                      "robust": math.log(2)}[loss_type])
    slope = {"ipo": 1 / (beta**2 * 16), "sigmoid": 0.5, "robust": 0.5 / (1 - 2 * 0.2)}[loss_type]
    assert loss_tol == pytest.approx(slope * tol, rel=0.05)


def test_offload_embeddings_on_a_cpu_run_says_there_is_nothing_to_offload(recipe_dict, capsys):
    recipe_dict["model"]["offload_embeddings"] = True
    recipe_dict["train"]["max_steps"] = 1
    result = train(recipe_from_dict(recipe_dict))
    assert abs(result.step0_loss - math.log(2)) < 1e-4
    assert "model.offload_embeddings: the model is on cpu: nothing to offload" in capsys.readouterr().out


def _record_step_order(monkeypatch, events: list) -> None:
    """Record, in order, each micro-batch moved to the device ("to") and its embeddings looked up ahead ("emb", a
    no-op unless they are in CPU memory), each training forward ("fwd") and backward ("bwd"), and each micro-batch's
    results read back to the host ("read") — the wait for a GPU."""
    from lora_dpo import batching

    for cls in (batching.Batch, batching.SharedBatch):
        to = cls.to
        monkeypatch.setattr(cls, "to", lambda self, device, to=to: events.append("to") or to(self, device))
    forward, backward, add = train_mod.dpo_forward, torch.Tensor.backward, train_mod.MetricMeter.add
    monkeypatch.setattr(train_mod, "dpo_forward", lambda *a, **k: events.append("fwd") or forward(*a, **k))
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: events.append("bwd") or backward(self, *a, **k))
    monkeypatch.setattr(train_mod.MetricMeter, "add", lambda self, *a: events.append("read") or add(self, *a))
    ahead = train_mod.offload.look_up_ahead
    monkeypatch.setattr(train_mod.offload, "look_up_ahead", lambda m, ids: events.append("emb") or ahead(m, ids))


train_mod = sys.modules["lora_dpo.train"]


def test_each_step_reads_its_results_once_after_the_next_micro_batch_is_prepared(recipe_dict, monkeypatch):
    """On a GPU the host must not wait for the GPU between micro-batches: the results of a step are read back (a
    sync) only after its last backward is queued and the next step's first micro-batch is on its way, so building
    batches and masks overlaps the GPU's work. With 2 micro-batches per step, over 2 steps:"""
    recipe_dict["data"].pop("eval")
    recipe_dict["train"].update(max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    events: list = []
    _record_step_order(monkeypatch, events)
    result = train(recipe_from_dict(recipe_dict))
    step0 = events.index("fwd") - 2  # the step-0 check's batch came first
    assert events[:step0] == ["to"]
    assert events[step0:] == ["to", "emb", "fwd", "bwd", "to", "emb", "fwd", "bwd",  # step 1's two micro-batches
                              "to", "emb",                     # step 2's first, prepared ahead
                              "read", "read",                  # then step 1's results read back
                              "fwd", "bwd", "to", "emb", "fwd", "bwd",  # step 2 (the last: nothing after it)
                              "read", "read"]
    assert [r["step"] for r in result.history] == [1, 2]
    assert all(r["tokens_per_second"] > 0 for r in result.history)


def test_micro_batches_count_their_tokens_and_find_their_targets_on_the_host(tokenizer):
    """Counting a batch's tokens or listing its scored positions on a GPU tensor reads it back (a sync): both come
    from the host-side batch."""
    from lora_dpo import batching
    from lora_dpo.data import Pair

    pairs = [Pair([5, 6, 7], [8, 9], [10], 0), Pair([11], [12, 13, 14], [15, 16], 1)]
    concat = batching.build(pairs, tokenizer.pad_token_id, "concatenated")
    t = concat.targets()
    want_rows, want_pred = concat.completion_mask[:, 1:].nonzero(as_tuple=True)
    assert torch.equal(t.rows, want_rows) and torch.equal(t.pred, want_pred) and torch.equal(t.label, want_pred + 1)
    assert torch.equal(t.seq, want_rows) and concat.to(torch.device("cpu")).targets().rows.tolist() == t.rows.tolist()
    assert concat.num_tokens() == 2 * 3 + 2 + 1 + 2 * 1 + 3 + 2


@pytest.mark.gpu
@pytest.mark.parametrize("offload_embeddings", [False, True])
def test_gpu_training_steps_never_wait_for_the_gpu_between_micro_batches(recipe_dict, monkeypatch,
                                                                         offload_embeddings):
    """GPU twin of the ordering test: from each micro-batch's forward to its step's results being read back —
    forward, backward, the next micro-batch's transfer and mask — no operation waits for the GPU (torch's sync
    debug mode turns any such wait into an error), with the packed layout on its default kernel, and with the
    embedding table in CPU memory (its lookups take the ids' host copy and send their answer asynchronously)."""
    recipe_dict["data"].pop("eval")
    recipe_dict["model"]["offload_embeddings"] = offload_embeddings
    recipe_dict["train"].update(max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2,
                                device="cuda", gradient_checkpointing=True)
    forward, add = train_mod.dpo_forward, train_mod.MetricMeter.add
    reads = []  # checked from the second step on: the first compiles flex_attention's backward kernels

    def strict_forward(*a, **k):
        if reads:
            torch.cuda.set_sync_debug_mode("error")
        return forward(*a, **k)

    def relaxed_add(self, *a):
        torch.cuda.set_sync_debug_mode(0)
        reads.append(1)
        return add(self, *a)

    monkeypatch.setattr(train_mod, "dpo_forward", strict_forward)
    monkeypatch.setattr(train_mod.MetricMeter, "add", relaxed_add)
    try:
        result = train(recipe_from_dict(recipe_dict))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [r["step"] for r in result.history] == [1, 2, 3] and len(reads) == 6
