"""Recipe schema: typed keys, errors that name the key and the fix, typed overrides, `validate` loads no model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import describe_keys, load_recipe, recipe_from_dict

BASE = {"model": {"name_or_path": "org/model"}, "data": {"train": "t.jsonl"}, "output": {"dir": "runs/x"}}


def with_(section: str, **kv) -> dict:
    raw = {k: dict(v) for k, v in BASE.items()}
    raw.setdefault(section, {}).update(kv)
    return raw


def test_defaults_filled_in():
    r = recipe_from_dict(BASE)
    assert r.dpo.beta == 0.1 and r.dpo.loss_type == "sigmoid"
    assert r.quantization.load_in_4bit and r.quantization.bnb_4bit_quant_type == "nf4"
    assert r.lora.target_modules == "all-linear" and r.lora.r == 16
    assert r.train.per_device_train_batch_size == 4


def test_issue_recipe_shape_loads(tmp_path):
    text = """
model: {name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct}
quantization: {load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_use_double_quant: true}
lora: {r: 16, lora_alpha: 32, lora_dropout: 0.0, target_modules: all-linear}
data: {train: data/train.jsonl, eval: data/eval.jsonl, max_length: 512, max_prompt_length: 256}
dpo: {beta: 0.1, loss_type: sigmoid}
train: {learning_rate: 5.0e-5, max_steps: 100, per_device_train_batch_size: 4, gradient_accumulation_steps: 1}
output: {dir: runs/quickstart}
"""
    p = tmp_path / "r.yaml"
    p.write_text(text)
    r = load_recipe(p)
    assert r.lora.lora_alpha == 32.0 and isinstance(r.lora.lora_alpha, float)
    assert r.train.learning_rate == 5e-5
    # the resolved recipe round-trips through YAML to the same recipe
    assert recipe_from_dict(yaml.safe_load(r.to_yaml())) == r


@pytest.mark.parametrize("raw, key, needle", [
    (with_("dpo", betta=0.1), "dpo.betta", "did you mean 'beta'"),
    (with_("train", learning_rte=1e-4), "train.learning_rte", "did you mean 'learning_rate'"),
    ({**BASE, "loras": {}}, "loras", "did you mean 'lora'"),
    (with_("dpo", beta=0), "dpo.beta", "> 0"),
    (with_("dpo", beta=-1.0), "dpo.beta", "> 0"),
    (with_("lora", r=0), "lora.r", "> 0"),
    (with_("lora", r=4.5), "lora.r", "an integer"),
    (with_("lora", r="16"), "lora.r", "an integer"),
    (with_("dpo", loss_type="dpo"), "dpo.loss_type", "one of 'sigmoid'"),
    (with_("quantization", load_in_4bit="yes"), "quantization.load_in_4bit", "true/false"),
    (with_("lora", lora_dropout=1.0), "lora.lora_dropout", "in [0, 1)"),
    (with_("dpo", label_smoothing=0.5, loss_type="robust"), "dpo.label_smoothing", "[0, 0.5)"),
    (with_("data", max_prompt_length=600), "data.max_prompt_length", "smaller than data.max_length"),
    (with_("quantization", load_in_8bit=True), "quantization.load_in_8bit", "load_in_4bit"),
    (with_("train", report_to=["mlflow"]), "train.report_to", "tensorboard"),
    ({"data": BASE["data"], "output": BASE["output"]}, "model", "missing section"),
    (with_("model", name_or_path=None) | {"model": {}}, "model.name_or_path", "missing"),
    (with_("dpo", beta=float("nan")), "dpo.beta", "a number"),
])
def test_bad_values_name_key_and_fix(raw, key, needle):
    with pytest.raises(LoraDpoError) as e:
        recipe_from_dict(raw)
    msg = str(e.value)
    assert f"'{key}'" in msg and needle in msg and "\n" not in msg


def test_overrides_are_typed_like_the_schema(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(BASE))
    r = load_recipe(p, ["train.max_steps=20", "dpo.beta=0.05", "lora.lora_alpha=8", "train.gradient_checkpointing=true",
                        "lora.target_modules=[q_proj, v_proj]", "data.eval=e.jsonl"])
    assert r.train.max_steps == 20 and r.dpo.beta == 0.05
    assert r.lora.lora_alpha == 8.0 and isinstance(r.lora.lora_alpha, float)
    assert r.train.gradient_checkpointing is True
    assert r.lora.target_modules == ["q_proj", "v_proj"] and r.data.eval == "e.jsonl"
    for bad, needle in [("train.max_steps=ten", "train.max_steps"), ("dpo=1", "section.key"),
                        ("trian.max_steps=3", "did you mean 'train'"), ("dpo.beta=-2", "dpo.beta")]:
        with pytest.raises(LoraDpoError, match=needle.replace(".", r"\.").replace("'", "'")):
            load_recipe(p, [bad])


def test_exponent_notation_is_a_number(tmp_path):
    """`5e-5` is a number in YAML 1.2 and to TRL users; PyYAML (YAML 1.1) reads it as a string."""
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(BASE) + "lora: {lora_alpha: 3E+1}\n")
    r = load_recipe(p, ["train.learning_rate=5e-5", "dpo.beta=1e-1", "train.adam_epsilon=1e-08",
                        "data.eval_split=2.5e-1"])
    assert (r.train.learning_rate, r.dpo.beta, r.train.adam_epsilon, r.lora.lora_alpha, r.data.eval_split) == \
        (5e-5, 0.1, 1e-8, 30.0, 0.25)
    for bad in ("train.learning_rate=5e-x", "train.learning_rate=e-5", "lora.r=1e1", "dpo.beta=-1e-1"):
        with pytest.raises(LoraDpoError, match=r"'(train\.learning_rate|lora\.r|dpo\.beta)'"):
            load_recipe(p, [bad])


def test_a_key_given_twice_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys silently; the first may be the one the user reads."""
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(BASE) + "train:\n  learning_rate: 1.0e-4\n  learning_rate: 1.0e-3\n")
    with pytest.raises(LoraDpoError, match=r"r\.yaml': key 'learning_rate' appears twice in one mapping at line 9, "
                                           r"column 3; keep one"):
        load_recipe(p)
    p.write_text(yaml.safe_dump(BASE) + "model: {name_or_path: other}\n")
    with pytest.raises(LoraDpoError, match="key 'model' appears twice"):
        load_recipe(p)


def test_target_modules_as_a_bare_string_says_how_to_write_a_list(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(BASE))
    with pytest.raises(LoraDpoError, match=r"'lora\.target_modules'.*'q_proj'.*e\.g\. \[q_proj, v_proj\]"):
        load_recipe(p, ["lora.target_modules=q_proj"])  # peft would read it as a regular expression
    with pytest.raises(LoraDpoError, match=r"override 'lora.target_modules=\[q_proj'.*not a valid YAML list"):
        load_recipe(p, ["lora.target_modules=[q_proj"])
    assert load_recipe(p, ["lora.target_modules=[q_proj]"]).lora.target_modules == ["q_proj"]


def test_an_export_listed_twice_is_an_error():
    with pytest.raises(LoraDpoError, match=r"'output\.export'.*lists 'gguf' twice"):
        recipe_from_dict({**BASE, "output": {"dir": "x", "export": ["gguf", "adapter", "gguf"]}})


def test_settings_this_run_will_not_use_are_said():
    from lora_dpo.recipe import recipe_notes

    assert recipe_notes(recipe_from_dict(BASE)) == []
    notes = recipe_notes(recipe_from_dict(with_("train", gradient_checkpointing_layers=0.5, eval_steps=5,
                                                max_steps=5, warmup_steps=10) | {"dpo": {"simpo_gamma": 1.0}}))
    assert len(notes) == 4
    for needle in ("dpo.simpo_gamma (1.0) is used by loss_type simpo only", "gradient_checkpointing_layers (0.5) is "
                   "ignored", "eval_steps is ignored: there is no held-out data", "never reaches train.learning_rate"):
        assert any(needle in n for n in notes), needle
    assert recipe_notes(recipe_from_dict(with_("dpo", loss_type="simpo", simpo_gamma=1.0))) == []
    notes = recipe_notes(recipe_from_dict(with_("train", save_total_limit=2, max_steps=9, num_train_epochs=3)
                                          | {"dpo": {"loss_type": "simpo", "reference": "precompute",
                                                     "reference_cache_dir": "c"},
                                             "evaluation": {"behaviour_regex": "x"}}))
    for needle in ("save_total_limit is ignored", "num_train_epochs (3) is ignored", "reference_cache_dir is ignored",
                   "precompute is ignored: loss_type simpo", "behaviour_regex is ignored"):
        assert any(needle in n for n in notes), needle


def test_keys_prints_defaults_as_yaml_so_they_can_be_copied(tmp_path):
    text = describe_keys()
    assert "  eval_steps: null  — " in text and "  trust_remote_code: false  — " in text
    assert "None" not in text.replace("None)", "")  # no Python spellings of defaults
    defaults = {}
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("   ") and " — " in line and "(required)" not in line:
            key, _, value = line.strip().partition(": ")
            defaults[key] = value.split("  — ")[0]
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(BASE) + "train:\n" + "".join(
        f"  {k}: {defaults[k]}\n" for k in ("eval_steps", "learning_rate", "resume_from_checkpoint", "report_to")))
    assert load_recipe(p) == recipe_from_dict(BASE)


def test_yaml_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  name_or_path: [unclosed\n")
    with pytest.raises(LoraDpoError, match=r"bad\.yaml.*line \d+"):
        load_recipe(p)
    with pytest.raises(LoraDpoError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(LoraDpoError, match="empty"):
        load_recipe(tmp_path / "empty.yaml")


def test_yaml_is_safe_loaded(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(LoraDpoError):
        load_recipe(p)


def test_every_key_is_documented():
    text = describe_keys()
    for key in ("beta:", "loss_type:", "bnb_4bit_quant_type:", "target_modules:", "resume_from_checkpoint:"):
        assert key in text
    assert all(" — " in line for line in text.splitlines() if line.startswith("  "))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lora_dpo", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_validate_cli_loads_no_model_but_checks_local_paths(tmp_path):
    rows = tmp_path / "t.jsonl"
    rows.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(with_("data", train=str(rows), eval="org/some-dataset")))
    res = _cli("validate", str(p), "dpo.beta=0.2")  # a hub model and data set: not fetched, said so
    assert res.returncode == 0, res.stderr
    assert "valid" in res.stdout and "β=0.2" in res.stdout
    assert "not checked (hub ids; read when training): model org/model, data set org/some-dataset" in res.stdout
    for override, needle in [("model.name_or_path=/nonexistent/model/dir", "model.name_or_path: '/nonexistent"),
                             (f"data.train={tmp_path / 'missing.jsonl'}", "data.train: file"),
                             ("data.chat_template=templates/missing.jinja", "data.chat_template: file")]:
        res = _cli("validate", str(p), override)
        assert res.returncode == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    rows.write_text('{"prompt": "p", "chosen": "a"}\n')  # what training would refuse, validate refuses
    res = _cli("validate", str(p))
    assert res.returncode == 2 and "rejected" in res.stderr, res.stderr


@pytest.mark.parametrize("args, needle", [
    (["validate", "{d}/missing.yaml"], "not found"),
    (["validate", "{d}/r.yaml", "dpo.beta=0"], "dpo.beta"),
    (["validate", "{d}/r.yaml", "dpo.bta=1"], "did you mean 'beta'"),
    (["{d}/r.yaml", "train.max_steps=abc"], "train.max_steps"),
    (["validate"], "recipe"),
    (["valdate", "{d}/r.yaml"], "unknown command 'valdate'; did you mean 'validate'?"),
    (["validate", "{d}/r.yaml", "lora.target_modules=[q_proj"], "not a valid YAML list"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, args, needle):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(BASE))
    res = _cli(*[a.format(d=tmp_path) for a in args])
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()
