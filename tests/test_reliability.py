"""Reliability: exact resume after SIGKILL, graceful SIGTERM, the NaN/Inf guard, OOM advice, corrupt checkpoints,
and loading that never runs code it was not asked to run."""

from __future__ import annotations

import ast
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_dpo import train
from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import recipe_from_dict

TRAIN_MODULE = sys.modules["lora_dpo.train"]  # `lora_dpo.train` is the public function; this is its module
PACKAGE = Path(__file__).resolve().parents[1] / "lora_dpo"


def _prepare(recipe_dict, tmp_path, **train_kw):
    recipe_dict["data"].pop("eval", None)
    recipe_dict["lora"] = {"lora_dropout": 0.1}  # RNG state matters for exactness
    recipe_dict["train"].update(max_steps=20, save_steps=3, logging_steps=1, **train_kw)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict))
    return path


def _start(path, out):
    # same thread count as this process: bitwise equality needs the same float reduction order
    return subprocess.Popen([sys.executable, "-m", "lora_dpo", str(path), f"output.dir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(out: Path, n: int, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the run did not reach the step in time")


def _same_adapter(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _rows(out: Path) -> list[dict]:
    drop = ("tokens_per_second", "peak_memory_mb")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_at_a_random_step_then_resume_is_exact(recipe_dict, tmp_path):
    path = _prepare(recipe_dict, tmp_path)
    full = train(recipe_from_dict({**recipe_dict, "output": {"dir": str(tmp_path / "full")}}))
    kill_after = random.Random(os.getpid()).randint(4, 12)
    crashed = tmp_path / "crashed"
    proc = _start(path, crashed)
    _wait_for_lines(crashed, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (crashed / "adapter").exists()
    res = subprocess.run([sys.executable, "-m", "lora_dpo", str(path), f"output.dir={crashed}",
                          "train.resume_from_checkpoint=latest"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout
    assert _same_adapter(full.adapter_dir, crashed / "adapter"), f"killed after {kill_after} steps"
    assert _rows(crashed) == _rows(full.output_dir)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_checkpoints_and_says_how_to_resume(recipe_dict, tmp_path, sig, code):
    path = _prepare(recipe_dict, tmp_path)
    out = tmp_path / "stopped"
    proc = _start(path, out)
    _wait_for_lines(out, 4, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr and f"{sig.name}: finishing this step" in stderr
    assert "Resume with: lora-dpo RECIPE.yaml train.resume_from_checkpoint=latest" in stdout
    stopped_at = len((out / "metrics.jsonl").read_text().splitlines())
    assert (out / "checkpoints" / f"step-{stopped_at:08d}").is_dir()
    resumed = train(recipe_from_dict({**recipe_dict, "output": {"dir": str(out)},
                                      "train": {**recipe_dict["train"], "resume_from_checkpoint": "latest"}}))
    full = train(recipe_from_dict({**recipe_dict, "output": {"dir": str(tmp_path / "full")}}))
    assert _same_adapter(full.adapter_dir, resumed.adapter_dir)


def _inject(monkeypatch, bad_calls: set[int], exc: type[BaseException] | None = None):
    real, calls = TRAIN_MODULE.dpo_forward, {"n": 0}

    def fake(model, batch, cfg, reference_logps=None):
        calls["n"] += 1
        loss, metrics = real(model, batch, cfg, reference_logps)
        if calls["n"] in bad_calls:
            if exc is not None:
                raise exc("CUDA out of memory. Tried to allocate 2.00 GiB")
            loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(TRAIN_MODULE, "dpo_forward", fake)


def test_nonfinite_steps_are_skipped_with_a_warning(recipe_dict, tmp_path, monkeypatch, capsys):
    recipe_dict["data"].pop("eval")
    recipe_dict["train"].update(max_steps=5, logging_steps=1)
    _inject(monkeypatch, {2, 3})  # training steps 2 and 3 (the step-0 check runs its own forward)
    result = train(recipe_from_dict(recipe_dict))
    printed = capsys.readouterr().out
    assert "warning: step 2: non-finite loss or gradient" in printed and "step skipped (2/5)" in printed
    assert [r["step"] for r in result.history] == [1, 4, 5]  # skipped steps are not logged as numbers
    assert all(math.isfinite(r["loss"]) for r in result.history)
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_too_many_nonfinite_steps_stop_the_run_and_keep_the_checkpoint(recipe_dict, monkeypatch):
    recipe_dict["data"].pop("eval")
    recipe_dict["train"].update(max_steps=8, save_steps=2, max_nonfinite_steps=2)
    _inject(monkeypatch, {3, 4})  # steps 3 and 4
    with pytest.raises(LoraDpoError, match=r"stopped at step 4: 2 steps .*learning_rate too high.*"
                                           r"checkpoint .*step-00000002 is intact"):
        train(recipe_from_dict(recipe_dict))
    ckpt = Path(recipe_dict["output"]["dir"]) / "checkpoints" / "step-00000002"
    assert all(torch.isfinite(w).all() for w in load_file(ckpt / "adapter" / "adapter_model.safetensors").values())


def test_out_of_memory_names_what_to_change(recipe_dict, monkeypatch):
    recipe_dict["data"].pop("eval")
    _inject(monkeypatch, {1}, exc=torch.cuda.OutOfMemoryError)  # step 1
    with pytest.raises(LoraDpoError, match=r"out of GPU memory at step 1; try train.per_device_train_batch_size=2 "
                                           r"with train.gradient_accumulation_steps=2.*gradient_checkpointing=true"):
        train(recipe_from_dict(recipe_dict))


def test_out_of_memory_while_preparing_the_next_step_names_that_step(recipe_dict, monkeypatch):
    """The next step's first micro-batch is prepared (its mask built) during the step before: running out of memory
    there is said as the step it belongs to."""
    recipe_dict["data"].pop("eval")
    real, calls = TRAIN_MODULE.model_inputs, []

    def fake(model, batch):
        calls.append(1)
        if len(calls) == 2:  # step 2's batch, prepared in step 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, batch)

    monkeypatch.setattr(TRAIN_MODULE, "model_inputs", fake)
    with pytest.raises(LoraDpoError, match=r"out of GPU memory at step 2;"):
        train(recipe_from_dict(recipe_dict))


def test_out_of_memory_suggests_offloading_an_untied_table_on_a_gpu(recipe_dict):
    from lora_dpo.train import _oom_message

    recipe = recipe_from_dict(recipe_dict)
    assert "model.offload_embeddings=true" in _oom_message(recipe, 3, embeddings_movable=True)
    assert "offload_embeddings" not in _oom_message(recipe, 3, embeddings_movable=False)
    assert "lora-dpo estimate RECIPE.yaml" in _oom_message(recipe, 3)


def test_save_total_limit_keeps_the_newest(recipe_dict):
    recipe_dict["data"].pop("eval")
    recipe_dict["train"].update(max_steps=9, save_steps=2, save_total_limit=2)
    run = train(recipe_from_dict(recipe_dict))
    names = sorted(p.name for p in (run.output_dir / "checkpoints").iterdir())
    assert names == ["step-00000006", "step-00000008"]  # no temporary directory left behind either


def test_corrupt_checkpoint_is_detected_and_the_previous_one_offered(recipe_dict):
    recipe_dict["data"].pop("eval")
    recipe_dict["train"].update(max_steps=5, save_steps=2)
    run = train(recipe_from_dict(recipe_dict))
    bad = run.output_dir / "checkpoints" / "step-00000004" / "adapter" / "adapter_model.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    recipe_dict["train"]["resume_from_checkpoint"] = "latest"
    with pytest.raises(LoraDpoError, match=r"step-00000004' is incomplete or corrupt.*resume from the previous "
                                           r"one: train.resume_from_checkpoint=.*step-00000002"):
        train(recipe_from_dict(recipe_dict))


def _refuse_model_loads(monkeypatch):
    def refuse(*args, **kw):
        raise AssertionError("the base model was loaded before the error")
    monkeypatch.setattr(TRAIN_MODULE.model_lib, "load_base", refuse)


def test_resume_refuses_a_recipe_that_changes_the_training_before_loading_the_model(recipe_dict, monkeypatch):
    """The checkpoint's optimizer state and schedule belong to its settings: a new learning rate or max_steps would
    be silently ignored, a new LoRA rank would not load. Settings of how it runs may change."""
    recipe_dict["data"].pop("eval")
    recipe_dict["train"].update(max_steps=3, save_steps=2)
    train(recipe_from_dict(recipe_dict))
    resume = {**recipe_dict["train"], "resume_from_checkpoint": "latest"}
    ckpt = Path(recipe_dict["output"]["dir"]) / "checkpoints" / "step-00000002"
    with pytest.MonkeyPatch.context() as m:
        _refuse_model_loads(m)
        for section, key, value in [("train", "learning_rate", 5e-3), ("train", "max_steps", 9), ("lora", "r", 8),
                                    ("dpo", "beta", 0.5), ("data", "max_length", 60)]:
            changed = {**recipe_dict, "train": dict(resume)}
            changed[section] = {**changed.get(section, {}), key: value}
            with pytest.raises(LoraDpoError, match=rf"^{section}\.{key}: {value!r} differs from .* in the run being "
                                                   rf"resumed \(.*step-00000002\); .*set {section}\.{key} back"):
                train(recipe_from_dict(changed))
        # a checkpoint written before checkpoints held their recipe: the run's recipe.yaml is the reference
        state = json.loads((ckpt / "trainer_state.json").read_text())
        (ckpt / "trainer_state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "recipe"}))
        with pytest.raises(LoraDpoError, match=r"^train\.learning_rate: "):
            train(recipe_from_dict({**recipe_dict, "train": {**resume, "learning_rate": 5e-3}}))
    resumed = train(recipe_from_dict({**recipe_dict, "train": {**resume, "logging_steps": 2, "save_steps": 1},
                                      "model": {**recipe_dict["model"], "attn_implementation": "eager"}}))
    assert resumed.steps == 3


def test_resume_errors_come_before_the_model_loads(recipe_dict, tmp_path, monkeypatch):
    _refuse_model_loads(monkeypatch)
    fresh = {**recipe_dict, "output": {"dir": str(tmp_path / "fresh")}}
    with pytest.raises(LoraDpoError, match="holds no checkpoint"):
        train(recipe_from_dict({**fresh, "train": {**recipe_dict["train"], "resume_from_checkpoint": "latest"}}))
    with pytest.raises(LoraDpoError, match="is not a checkpoint directory"):
        train(recipe_from_dict({**fresh, "train": {**recipe_dict["train"],
                                                   "resume_from_checkpoint": str(tmp_path / "nothing")}}))
    r = recipe_from_dict(fresh)
    r.train.per_device_train_batch_size = 0  # edited in Python after loading: checked again
    with pytest.raises(LoraDpoError, match=r"train\.per_device_train_batch_size.*> 0"):
        train(r)


def test_pairs_and_generations_beyond_the_models_context_fail_before_it_loads(recipe_dict, tmp_path, monkeypatch):
    """The tiny model's context is 512 positions: a longer pair would index past learned positions (or train a RoPE
    model where it never was), so it is refused by the key to change."""
    from conftest import write_jsonl

    _refuse_model_loads(monkeypatch)
    long_row = {"prompt": " ".join(f"w{i}" for i in range(700)), "chosen": " yes", "rejected": " no"}
    recipe_dict["data"].update(train=str(write_jsonl(tmp_path / "long.jsonl", [long_row] * 4)), max_length=4096,
                               max_prompt_length=None)
    with pytest.raises(LoraDpoError, match=r"^data\.max_length: the longest pair spans \d+ positions .* context of "
                                           r"512 .*at most 512"):
        train(recipe_from_dict(recipe_dict))
    recipe_dict["data"].update(train=str(write_jsonl(tmp_path / "mid.jsonl", [long_row] * 4)), eval=None,
                               eval_split=2, max_length=512, max_prompt_length=500)
    recipe_dict["evaluation"] = {"max_new_tokens": 64, "generations": 2}
    with pytest.raises(LoraDpoError, match=r"^evaluation\.max_new_tokens: a held-out prompt of 500 tokens plus 64"):
        train(recipe_from_dict(recipe_dict))


def test_a_run_stopped_before_its_first_checkpoint_is_not_offered_for_resuming(recipe_dict, tmp_path):
    out = tmp_path / "early"
    out.mkdir()
    (out / "recipe.yaml").write_text("{}")  # what a run interrupted during its step-0 check leaves
    (out / "metrics.jsonl").write_text("")
    recipe_dict["output"] = {"dir": str(out)}
    with pytest.raises(LoraDpoError, match=r"stopped before its first checkpoint \(no checkpoint to resume\).*"
                                           r"output\.overwrite=true") as e:
        train(recipe_from_dict(recipe_dict))
    assert "resume_from_checkpoint" not in str(e.value)


def test_training_leaves_the_process_as_it_found_it(recipe_dict):
    """A notebook keeps computing after train(): its warning filters and the CPU's subnormal-float mode are the
    user's."""
    import warnings

    def subnormals_kept() -> bool:
        return float(torch.tensor([1e-39]) * torch.tensor([1.0])) != 0.0

    filters, kept = list(warnings.filters), subnormals_kept()
    recipe_dict["data"].pop("eval")
    recipe_dict["train"].update(max_steps=1)
    train(recipe_from_dict(recipe_dict))
    assert warnings.filters == filters and subnormals_kept() == kept


# ---------------------------------------------------------------- loading safety, enforced on the source

def _calls(name: str):
    for file in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                full = ast.unparse(func)
                if full == name or full.endswith("." + name):
                    yield file.name, node


def test_no_pickle_is_ever_unpickled():
    loads = list(_calls("torch.load"))
    assert loads, "the checkpoint code loads optimizer state with torch.load"
    for file, node in loads:
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        assert kw.get("weights_only") == "True", f"{file}: torch.load without weights_only=True"
    for file in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), file.name
            if isinstance(node, ast.Call):
                called = ast.unparse(node.func)
                # no code is run or imported by name from data: no eval/exec, no dynamic imports
                assert called not in ("eval", "exec", "__import__", "importlib.import_module", "import_module",
                                      "yaml.load", "yaml.unsafe_load"), f"{file.name}: {called}"
                if called == "getattr":  # only fixed attribute names, never one that came from a recipe
                    assert isinstance(node.args[1], ast.Constant), f"{file.name}: {ast.unparse(node)}"


def test_yaml_only_through_safe_load():
    import yaml

    from lora_dpo import recipe

    assert list(_calls("yaml.safe_load"))
    assert not [c for c in _calls("yaml.load")]
    assert issubclass(recipe._UniqueKeyLoader, yaml.SafeLoader)  # recipes: safe_load that refuses repeated keys


def test_trust_remote_code_is_off_unless_asked(tiny_model_dir, monkeypatch, capsys):
    import transformers

    from lora_dpo import model as M
    from lora_dpo.recipe import ModelConfig, QuantizationConfig

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    M.load_base(ModelConfig(name_or_path=str(tiny_model_dir)), QuantizationConfig(load_in_4bit=False),
                torch.float32, torch.device("cpu"))
    assert seen == [False] and "trust_remote_code is on" not in capsys.readouterr().out
    M.load_base(ModelConfig(name_or_path=str(tiny_model_dir), trust_remote_code=True),
                QuantizationConfig(load_in_4bit=False), torch.float32, torch.device("cpu"))
    assert seen[-1] is True and "trust_remote_code is on" in capsys.readouterr().out


def test_resume_inside_a_logging_window_logs_the_same_rows(recipe_dict, tmp_path):
    """A checkpoint (save_steps, or a stop signal at any step) that falls inside a logging window: the resumed run's
    next row still averages the whole window, as the uninterrupted run's does."""
    recipe_dict["data"].pop("eval")
    recipe_dict["train"].update(max_steps=6, save_steps=3, logging_steps=2)
    full = train(recipe_from_dict({**recipe_dict, "output": {"dir": str(tmp_path / "full")}}))
    crashed = tmp_path / "crashed"
    shutil.copytree(full.output_dir, crashed)
    shutil.rmtree(crashed / "adapter")  # as if killed after the step-3 checkpoint, in the window of steps 3-4
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text(lines[0] + "\n")  # step 2's row
    resumed = train(recipe_from_dict({**recipe_dict, "output": {"dir": str(crashed)},
                                      "train": {**recipe_dict["train"], "resume_from_checkpoint": "latest"}}))
    assert [r["step"] for r in resumed.history] == [2, 4, 6]
    assert _rows(crashed) == _rows(full.output_dir)


def test_resume_refuses_training_data_edited_since_before_loading_the_model(recipe_dict, monkeypatch):
    """The same recipe over an edited data file would train on other pairs than the run it claims to continue."""
    recipe_dict["data"].pop("eval")
    recipe_dict["train"].update(max_steps=3, save_steps=2)
    train(recipe_from_dict(recipe_dict))
    data = Path(recipe_dict["data"]["train"])
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[5]["chosen"] = " forty-two."
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _refuse_model_loads(monkeypatch)
    with pytest.raises(LoraDpoError, match=r"^data\.train: the training pairs differ from those of the run being "
                                           r"resumed \(.*step-00000002\).*restore them"):
        train(recipe_from_dict({**recipe_dict, "train": {**recipe_dict["train"], "resume_from_checkpoint": "latest"}}))


def test_skipped_steps_count_across_a_resume(recipe_dict, tmp_path, monkeypatch, capsys):
    """train.max_nonfinite_steps counts the run's skipped steps, not those since the last resume."""
    recipe_dict["data"].pop("eval")
    recipe_dict["train"].update(max_steps=4, save_steps=2, max_nonfinite_steps=5)
    _inject(monkeypatch, {1})  # step 1
    full = train(recipe_from_dict(recipe_dict))
    ckpt = full.output_dir / "checkpoints" / "step-00000002"
    assert json.loads((ckpt / "trainer_state.json").read_text())["nonfinite"] == 1
    shutil.rmtree(full.output_dir / "adapter")  # as if killed after the step-2 checkpoint
    capsys.readouterr()
    _inject(monkeypatch, {1})  # the resumed run's first step, step 3
    train(recipe_from_dict({**recipe_dict, "train": {**recipe_dict["train"], "resume_from_checkpoint": "latest"}}))
    assert "warning: step 3: non-finite loss or gradient" in (out := capsys.readouterr().out)
    assert "step skipped (2/5)" in out


def test_cuda_generators_restore_as_far_as_the_visible_gpus_go(monkeypatch):
    """A checkpoint written where two GPUs were visible resumes where one is (and the other way round)."""
    from lora_dpo import checkpoints

    restored = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.append(index))
    checkpoints.restore_cuda_rng([torch.zeros(16, dtype=torch.uint8)] * 2)
    assert restored == [0]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    restored.clear()
    checkpoints.restore_cuda_rng([torch.zeros(16, dtype=torch.uint8)] * 2)
    assert restored == [0, 1]


def test_replacing_a_directory_never_leaves_it_half_deleted(tmp_path, monkeypatch):
    """atomic_dir over an existing directory: the new one replaces it whole, and if moving the new one in fails
    the previous one is still there, complete (it was deleted first, file by file, before)."""
    from lora_dpo import checkpoints

    final = tmp_path / "export"
    final.mkdir()
    (final / "weights.bin").write_text("old")
    checkpoints.atomic_dir(final, lambda d: (d / "weights.bin").write_text("new"))
    assert (final / "weights.bin").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["export"]
    real_replace = os.replace

    def failing(src, dst):
        if Path(dst) == final and "tmp-old" not in str(src):
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"):
        checkpoints.atomic_dir(final, lambda d: (d / "weights.bin").write_text("newer"))
    assert (final / "weights.bin").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["export"]
