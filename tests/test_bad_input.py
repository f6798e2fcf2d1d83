"""The bad-input battery: every case exits with code 2 and ONE stderr line that names the key/file/row and says
what to do, with no traceback, and leaves the filesystem exactly as it was (nothing created or overwritten).

Cases run in-process through `lora_dpo.cli.main` (fast); three also run as a real `python3 -m lora_dpo` process to
show that no traceback escapes at process level. Model, GGUF and output-directory cases fail before any model
weights are loaded (`train.run` checks the output directory, then the data, then the tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import arithmetic_rows, write_jsonl

from lora_dpo.cli import main


@dataclass
class Case:
    id: str
    setup: object  # (Env) -> argv
    culprit: str  # the key / file / row the message must name
    fix: str  # the advice it must give


class Env:
    def __init__(self, root: Path, model_dir: Path):
        self.root = root
        self.train = write_jsonl(root / "train.jsonl", arithmetic_rows(8))
        self.recipe = {"model": {"name_or_path": str(model_dir)},
                       "data": {"train": str(self.train), "max_length": 64, "max_prompt_length": 32},
                       "train": {"max_steps": 1},
                       "output": {"dir": str(root / "run")}}

    def file(self, name: str, content: str | bytes) -> str:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(p)

    def recipe_file(self, text: str | bytes | None = None, **sections) -> str:
        for section, values in sections.items():
            self.recipe.setdefault(section, {}).update(values)
        return self.file("recipe.yaml", yaml.safe_dump(self.recipe) if text is None else text)

    def data(self, **data_keys) -> list[str]:
        return [self.recipe_file(data=data_keys)]


CASES: list[Case] = []


def case(id_, culprit, fix):
    def register(fn):
        CASES.append(Case(id_, fn, culprit, fix))
        return fn
    return register


def _ok_rows_text(n=3) -> str:
    return "".join(json.dumps(r) + "\n" for r in arithmetic_rows(n))


# ---------------------------------------------------------------- the recipe file and its keys

case("yaml-syntax", "recipe.yaml", "fix the YAML syntax")(lambda e: [e.recipe_file("model: [unclosed\n")])
case("yaml-tab-indent", "recipe.yaml", "fix the YAML syntax")(
    lambda e: [e.recipe_file("model:\n\tname_or_path: x\n")])
case("recipe-missing", "nope.yaml", "pass the path")(lambda e: [str(e.root / "nope.yaml")])
case("recipe-empty", "recipe.yaml", "start from recipes/quickstart.yaml")(lambda e: [e.recipe_file("")])
case("recipe-not-a-mapping", "recipe.yaml", "expected a YAML mapping with sections")(
    lambda e: [e.recipe_file("- model\n- data\n")])
case("recipe-not-utf8", "recipe.yaml", "save it as UTF-8")(
    lambda e: [e.recipe_file(b"model: {name_or_path: caf\xe9}\n")])
case("unknown-section", "'trian'", "did you mean 'train'")(lambda e: [e.recipe_file(trian={"max_steps": 1})])
case("misspelt-key", "'dpo.betta'", "did you mean 'beta'")(lambda e: [e.recipe_file(dpo={"betta": 0.1})])
case("misspelt-data-key", "'data.trian'", "did you mean 'train'")(lambda e: [e.recipe_file(data={"trian": "x"})])
case("misspelt-source-key", "'data.train[0].wieght'", "did you mean 'weight'")(
    lambda e: e.data(train=[{"path": str(e.train), "wieght": 2}]))
case("wrong-type-int", "'lora.r'", "expected an integer")(lambda e: [e.recipe_file(lora={"r": "sixteen"})])
case("wrong-type-bool", "'quantization.load_in_4bit'", "expected true/false")(
    lambda e: [e.recipe_file(quantization={"load_in_4bit": "yes"})])
case("wrong-type-data-train", "'data.train'", "expected a string or a list of mappings")(lambda e: e.data(train=5))
case("wrong-type-columns", "'data.train[0].columns.prompt'", "expected a string")(
    lambda e: e.data(train=[{"path": str(e.train), "columns": {"prompt": 3}}]))
case("out-of-range-beta", "'dpo.beta'", "must be > 0")(lambda e: [e.recipe_file(dpo={"beta": -1})])
case("out-of-range-dropout", "'lora.lora_dropout'", "must be in [0, 1)")(
    lambda e: [e.recipe_file(lora={"lora_dropout": 1.5})])
case("out-of-range-eval-split", "'data.eval_split'", "fraction in (0, 1)")(lambda e: e.data(eval_split=1.5))
case("out-of-range-count", "'data.train[0].count'", "must be > 0")(
    lambda e: e.data(train=[{"path": str(e.train), "count": 0}]))
case("prompt-longer-than-max", "'data.max_prompt_length'", "must be smaller than data.max_length")(
    lambda e: e.data(max_prompt_length=64))
case("missing-section", "'output'", "add 'output:'")(
    lambda e: [e.recipe_file(yaml.safe_dump({k: v for k, v in e.recipe.items() if k != "output"}))])
case("missing-data-train", "'data.train'", "missing; set it to")(
    lambda e: [e.recipe_file(yaml.safe_dump({**e.recipe, "data": {"max_length": 64}}))])
case("empty-source-list", "'data.train'", "give at least one source")(lambda e: e.data(train=[]))
case("source-without-path", "'data.train[0].path'", "missing; set it to")(lambda e: e.data(train=[{"split": "x"}]))
case("weight-and-count", "'data.train[0].count'", "keep one of them")(
    lambda e: e.data(train=[{"path": str(e.train), "weight": 1, "count": 2}]))
case("columns-unknown-role", "'data.train[0].columns.question'", "map prompt, chosen, rejected or system")(
    lambda e: e.data(train=[{"path": str(e.train), "columns": {"question": "prompt"}}]))
case("on-problem-invalid", "'data.on_problem'", "one of 'warn', 'error'")(lambda e: e.data(on_problem="ignore"))
case("format-invalid", "'data.format'", "one of 'auto', 'standard'")(lambda e: e.data(format="sharegpt"))
case("eval-and-eval-split", "'data.eval_split'", "remove one of them")(
    lambda e: e.data(eval=str(e.train), eval_split=2))
case("override-without-equals", "override 'train.max_steps'", "expected section.key=value")(
    lambda e: [e.recipe_file(), "train.max_steps"])
case("override-unknown-section", "'trainer'", "did you mean 'train'")(
    lambda e: [e.recipe_file(), "trainer.max_steps=3"])

# ---------------------------------------------------------------- data files

case("data-file-missing", "data.train: file", "check the path")(
    lambda e: e.data(train=str(e.root / "nope.jsonl")))
case("eval-file-missing", "data.eval: file", "check the path")(lambda e: e.data(eval=str(e.root / "nope.jsonl")))
case("data-unsupported-extension", "train.txt' has an unsupported extension", "use .jsonl")(
    lambda e: e.data(train=e.file("train.txt", "prompt,chosen,rejected\n")))
case("corrupt-jsonl", "bad.jsonl' line 3", "fix or remove that line")(
    lambda e: e.data(train=e.file("bad.jsonl", _ok_rows_text(2) + '{"prompt": "x", "chosen\n')))
case("corrupt-json-list", "bad.json' is not valid JSON", "fix the file")(
    lambda e: e.data(train=e.file("bad.json", '[{"prompt": "a", "chosen": "b", "rejected": "c"},\n')))
case("corrupt-parquet", "bad.parquet' is not a readable parquet file", "re-export it")(
    lambda e: e.data(train=e.file("bad.parquet", b"PAR1" + os.urandom(64))))
case("corrupt-csv-row", "bad.csv' line 3", "fix that line")(
    lambda e: e.data(train=e.file("bad.csv", "prompt,chosen,rejected\na,b,c\nd,e,f,g\n")))
case("missing-column", "row 0 has no 'prompt' column", "columns: {prompt: YOUR_COLUMN}")(
    lambda e: e.data(train=e.file("q.jsonl", '{"question": "a", "chosen": " b", "rejected": " c"}\n'),
                     format="standard"))
case("mapped-column-missing", "row 0 has no 'question' column", "columns: {prompt: YOUR_COLUMN}")(
    lambda e: e.data(train=[{"path": str(e.train), "columns": {"prompt": "question"}}]))
case("implicit-without-shared-prompt", "every row of", "map it with columns: {prompt: NAME}")(
    lambda e: e.data(train=e.file("q.jsonl", '{"question": "a", "chosen": "yes", "rejected": "no"}\n')))
case("empty-jsonl", "empty.jsonl' holds no rows", "give a source with prompt/chosen/rejected rows")(
    lambda e: e.data(train=e.file("empty.jsonl", "\n\n")))
case("empty-csv", "empty.csv' holds no rows", "give a source")(
    lambda e: e.data(train=e.file("empty.csv", "prompt,chosen,rejected\n")))
case("every-row-dropped", "every row of", "fix the data")(
    lambda e: e.data(train=e.file("same.jsonl", '{"prompt": "p", "chosen": " x", "rejected": " x"}\n' * 3)))
case("non-utf8-jsonl", "latin.jsonl' line 2 is not UTF-8", "re-encode the file as UTF-8")(
    lambda e: e.data(train=e.file("latin.jsonl", _ok_rows_text(1).encode() +
                                  b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n')))
case("non-utf8-csv", "latin.csv' line 2 is not UTF-8", "re-encode")(
    lambda e: e.data(train=e.file("latin.csv", b"prompt,chosen,rejected\ncaf\xe9,b,c\n")))
case("row-not-an-object", "row 1 is a list", "fix that row")(
    lambda e: e.data(train=e.file("list.jsonl", _ok_rows_text(1) + "[1, 2]\n")))
case("saved-dataset-missing-split", "has no split 'dev'", "set split to one of them")(
    lambda e: (__import__("datasets").DatasetDict({"train": __import__("datasets").Dataset.from_list(
        arithmetic_rows(3))}).save_to_disk(e.root / "saved"), e.data(train=[{"path": str(e.root / "saved"),
                                                                            "split": "dev"}]))[1])
case("not-a-saved-dataset-dir", "is not a saved dataset", "give a save_to_disk directory")(
    lambda e: (e.file("somedir/readme.md", "x"), e.data(train=str(e.root / "somedir")))[1])
case("hub-dataset-offline", "cannot load hub dataset 'someone/no-such-prefs'", "give that local path")(
    lambda e: e.data(train="someone/no-such-prefs"))
case("count-above-rows", "data.train[0].count: 9 rows asked for", "lower count")(
    lambda e: e.data(train=[{"path": str(e.train), "count": 9}]))
case("eval-split-too-large", "data.eval_split: holding out 8 of 8 rows", "hold out fewer rows (at most 7)")(
    lambda e: e.data(eval_split=8))
case("on-problem-error", "data.train: 1 data problems", "data.on_problem=warn")(
    lambda e: e.data(on_problem="error", train=e.file("dup.jsonl", _ok_rows_text(2) + _ok_rows_text(1))))
case("chat-template-file-missing", "data.chat_template: file", "give a Jinja file")(
    lambda e: e.data(chat_template=str(e.root / "nope.jinja")))
case("chat-template-syntax", "data.chat_template: the template does not parse (line 1", "fix its Jinja syntax")(
    lambda e: e.data(chat_template="{% for m in messages %}{{ m.content }"))  # plain-text rows never render it
case("chat-template-broken", "cannot render row 0", "fix data.chat_template")(
    lambda e: e.data(chat_template="{{ raise_exception('no conversations') }}", train=e.file("c.jsonl", json.dumps(
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]}) + "\n")))

# ---------------------------------------------------------------- model and output directory

case("model-path-missing", "model.name_or_path: './no/such/model'", "check the path")(
    lambda e: [e.recipe_file(model={"name_or_path": "./no/such/model"})])
case("model-dir-without-config", "has no config.json", "point it at a Hugging Face model directory")(
    lambda e: (e.file("empty_model/README", "x"),
               e.recipe_file(model={"name_or_path": str(e.root / "empty_model")}))[1:])
case("gguf-missing", "GGUF file", "check the path")(
    lambda e: [e.recipe_file(model={"name_or_path": str(e.root / "missing.gguf")})])
case("gguf-corrupt", "cannot read GGUF file", "is it a complete, uncorrupted .gguf model?")(
    lambda e: [e.recipe_file(model={"name_or_path": e.file("broken.gguf", b"GGUF" + os.urandom(256))})])
case("output-holds-a-run", "already holds a run", "output.overwrite=true")(
    lambda e: (e.file("run/metrics.jsonl", '{"step": 1}\n'), e.recipe_file())[1:])
case("output-not-writable", "is not writable", "choose a directory you can write to")(
    lambda e: [e.recipe_file(output={"dir": "/proc/lora-dpo-test-run"})])
case("output-under-a-file", "is not writable", "choose a directory you can write to")(
    lambda e: [e.recipe_file(output={"dir": e.file("afile", "x") + "/run"})])
case("output-is-a-file", "is a file", "choose a directory path")(
    lambda e: [e.recipe_file(output={"dir": e.file("run.txt", "x")})])

# ---------------------------------------------------------------- inspect and the command line

case("inspect-corrupt-data", "bad.jsonl' line 1", "fix or remove that line")(
    lambda e: ["inspect", *e.data(train=e.file("bad.jsonl", "{oops\n"))])
case("inspect-eval-split-missing", "--split eval", "set data.eval or data.eval_split")(
    lambda e: ["inspect", e.recipe_file(), "--split", "eval"])
case("inspect-negative-rows", "-n/--rows", "expected a number of rows >= 0")(
    lambda e: ["inspect", e.recipe_file(), "-n", "-1"])
case("validate-bad-key", "'lora.rank'", "valid keys: r, lora_alpha")(
    lambda e: ["validate", e.recipe_file(lora={"rank": 8})])


def snapshot(root: Path) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        out[d] = "dir"
        for f in files:
            p = Path(d) / f
            out[str(p)] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture
def env(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LORA_DPO_CACHE", str(tmp_path / "cache"))  # a GGUF conversion would show up here
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return Env(tmp_path, tiny_model_dir)


def test_the_battery_is_at_least_40_cases():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, env, capsys, monkeypatch):
    model_mod = sys.modules["lora_dpo.model"]
    monkeypatch.setattr(model_mod, "load_base", lambda *a, **k: pytest.fail("model weights loaded"))
    argv = case.setup(env)
    capsys.readouterr()  # what the setup printed (datasets' progress bars) is not the command's output
    before = snapshot(env.root)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in out + err
    assert case.culprit in lines[0], lines[0]
    assert case.fix in lines[0], lines[0]
    assert snapshot(env.root) == before  # nothing created, changed or removed


SUBPROCESS = ["yaml-syntax", "corrupt-parquet", "model-path-missing"]


@pytest.mark.parametrize("case_id", SUBPROCESS)
def test_bad_input_in_a_real_process(case_id, env):
    case = next(c for c in CASES if c.id == case_id)
    argv = case.setup(env)
    before = snapshot(env.root)
    proc = subprocess.run([sys.executable, "-m", "lora_dpo", *argv], capture_output=True, text=True, timeout=180,
                          cwd=env.root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and case.culprit in lines[0] and case.fix in lines[0], proc.stderr
    assert snapshot(env.root) == before
