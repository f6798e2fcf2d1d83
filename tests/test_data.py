"""Data: every format → the same token ids; completion-only labels; EOS; truncation; drops and template problems
counted with row numbers; data.on_problem; the report printed, saved in the run directory, and `inspect`."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import write_jsonl

from lora_dpo import data, data_report
from lora_dpo.batching import collate
from lora_dpo.cli import main
from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import DataConfig, recipe_from_dict


def cfg(**kw) -> DataConfig:
    return DataConfig(train="x.jsonl", **kw)


def ids(pairs):
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]


def test_standard_row_tokens(tokenizer):
    row = {"prompt": "Q: 2+2?", "chosen": " A: 4", "rejected": " A: 5"}
    p, c, r, ok = data.tokenize_row(row, tokenizer)
    assert ok
    assert p == tokenizer("Q: 2+2?")["input_ids"]
    assert c == tokenizer(" A: 4")["input_ids"] + [tokenizer.eos_token_id]  # EOS ends each completion
    assert r == tokenizer(" A: 5")["input_ids"] + [tokenizer.eos_token_id]
    # an explicit EOS in the text is not doubled
    p2, c2, _, _ = data.tokenize_row({**row, "chosen": " A: 4" + tokenizer.eos_token}, tokenizer)
    assert c2 == c


def test_conversational_row_uses_chat_template(tokenizer):
    row = {"prompt": [{"role": "user", "content": "Capital of France?"}],
           "chosen": [{"role": "assistant", "content": "Paris."}],
           "rejected": [{"role": "assistant", "content": "Rome."}]}
    p, c, r, ok = data.tokenize_row(row, tokenizer)
    assert ok
    full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True)["input_ids"]
    gen = tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    assert p == list(gen) and p + c == list(full)
    assert tokenizer.decode(p).endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token_id in c and tokenizer.decode(c).startswith("Paris.")
    # a system prompt is added to conversations that have none
    ps, _, _, _ = data.tokenize_row(row, tokenizer, system_prompt="Be brief.")
    assert "Be brief." in tokenizer.decode(ps) and "Be brief." not in tokenizer.decode(p)


# ---------------------------------------------------------------- the same pairs in every format

def user(t):
    return {"role": "user", "content": t}


def assistant(t):
    return {"role": "assistant", "content": t}


TURNS = [  # (earlier turns, last question, chosen answer, rejected answer)
    ([], "What is the capital of France?", "Paris.", "Rome, I think."),
    ([user("Hi!"), assistant("Hello! How can I help?")], "Name a primary colour.", "Red.", "Pink."),
    ([], "Say yes or no.", "Yes", "No, never, not at all."),
]


def test_same_conversations_in_every_format_give_identical_token_ids(tmp_path, tokenizer):
    """Conversational, implicit (full conversations), Anthropic HH raw text and renamed columns, read from
    .jsonl / .json / .parquet / a save_to_disk directory: the same pairs → the same token ids."""
    import datasets

    def hh(msgs):
        return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in msgs)

    conv = [{"prompt": h + [user(q)], "chosen": [assistant(a)], "rejected": [assistant(b)]} for h, q, a, b in TURNS]
    implicit = [{"chosen": h + [user(q), assistant(a)], "rejected": h + [user(q), assistant(b)]}
                for h, q, a, b in TURNS]
    hh_rows = [{"chosen": hh(h + [user(q), assistant(a)]), "rejected": hh(h + [user(q), assistant(b)])}
               for h, q, a, b in TURNS]
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "id": i}
               for i, r in enumerate(conv)]
    write_jsonl(tmp_path / "conv.jsonl", conv)
    (tmp_path / "implicit.json").write_text(json.dumps(implicit))
    datasets.Dataset.from_list(hh_rows).to_parquet(tmp_path / "hh.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(renamed)}).save_to_disk(tmp_path / "saved")
    sources = {
        "conversational": str(tmp_path / "conv.jsonl"),
        "implicit": str(tmp_path / "implicit.json"),
        "hh": str(tmp_path / "hh.parquet"),
        "columns": [{"path": str(tmp_path / "saved"), "columns": {"prompt": "question", "chosen": "good",
                                                                   "rejected": "bad"}}],
    }
    expected = None
    for name, train in sources.items():
        dcfg = recipe_from_dict({"model": {"name_or_path": "m"}, "output": {"dir": "o"},
                                 "data": {"train": train}}).data
        rows, _ = data.read_data(dcfg)
        pairs, report = data.load(dcfg, tokenizer, "train", rows)
        assert report.kept == len(TURNS) and not report.dropped and not report.problems, name
        assert report.sources[0]["detected"]
        assert report.sources[0]["format"] == ("conversational" if name == "columns" else name)
        if expected is None:
            expected = ids(pairs)
            # sanity: the prompt holds the earlier turns, the completion only the last answer
            assert "Hello! How can I help?" in tokenizer.decode(expected[1][0])
            assert tokenizer.decode(expected[1][1]).startswith("Red.")
        assert ids(pairs) == expected, name
    # the declared format gives the same as the detected one, and an unrelated format drops every row
    dcfg = DataConfig(train=sources["hh"], format="hh")
    assert ids(data.load(dcfg, tokenizer, "train", data.read_data(dcfg)[0])[0]) == expected
    with pytest.raises(LoraDpoError, match=r"every row .* dropped \(3 × wrong type \(format standard"):
        dcfg = DataConfig(train=sources["conversational"], format="standard")
        data.load(dcfg, tokenizer, "train", data.read_data(dcfg)[0])


def test_same_texts_in_every_format_give_identical_token_ids(tmp_path, tokenizer):
    """Standard text, implicit text (the shared prefix is the prompt, cut at a word boundary), renamed columns in a
    .csv file: the same pairs → the same token ids."""
    texts = [("Q: What is 2+2? A:", " 4", " 5"), ("The answer is", " four", " five"),
             ("Translate 'chat':", " cat", " dog, obviously")]
    standard = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in texts]
    implicit = [{"chosen": p + c, "rejected": p + r} for p, c, r in texts]
    (tmp_path / "t.csv").write_text("q,good,bad\n" + "".join(
        f'"{p}","{c}","{r}"\n' for p, c, r in texts), encoding="utf-8")
    expected = ids(data.load(DataConfig(train=str(write_jsonl(tmp_path / "s.jsonl", standard))), tokenizer)[0])
    got_implicit, rep = data.load(DataConfig(train=str(write_jsonl(tmp_path / "i.jsonl", implicit))), tokenizer)
    assert rep.sources[0]["format"] == "implicit"
    dcfg = recipe_from_dict({"model": {"name_or_path": "m"}, "output": {"dir": "o"}, "data": {"train": [
        {"path": str(tmp_path / "t.csv"), "columns": {"prompt": "q", "chosen": "good", "rejected": "bad"}}]}}).data
    got_csv = data.load(dcfg, tokenizer)[0]
    assert ids(got_implicit) == expected and ids(got_csv) == expected
    assert tokenizer.decode(expected[1][1]) == " four" + tokenizer.eos_token  # a whole word, not "our"


def test_system_prompt_column_and_option(tmp_path, tokenizer):
    base = {"prompt": [user("Hi")], "chosen": [assistant("Hello.")], "rejected": [assistant("Go away.")]}
    with_column = data.load(cfg(), tokenizer, rows=data.Rows([{**base, "system": "Be kind."}]))[0]
    with_option = data.load(cfg(system_prompt="Be kind."), tokenizer, rows=data.Rows([base]))[0]
    in_messages = data.load(cfg(), tokenizer, rows=data.Rows([{
        **base, "prompt": [{"role": "system", "content": "Be kind."}, user("Hi")]}]))[0]
    assert ids(with_column) == ids(with_option) == ids(in_messages)
    assert "Be kind." in tokenizer.decode(with_option[0].prompt_ids)
    # on text rows the option cannot apply: the report says so instead of ignoring it silently
    _, rep = data.load(cfg(system_prompt="Be kind."), tokenizer, rows=data.Rows([
        {"prompt": "Hi", "chosen": " a", "rejected": " b"}]))
    assert any("1 text rows have a system message" in n for n in rep.notes)


def test_apply_chat_template_renders_text_rows_as_a_conversation(tokenizer):
    """data.apply_chat_template: a string row (with a system column) tokenises exactly as the same one-turn
    conversation does, so instruct models see their template on plain-text datasets (orca_dpo_pairs)."""
    text = {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Rome.", "system": "Be brief."}
    chat = {"prompt": [{"role": "system", "content": "Be brief."}, user("Capital of France?")],
            "chosen": [assistant("Paris.")], "rejected": [assistant("Rome.")]}
    as_chat, rep = data.load(cfg(apply_chat_template=True), tokenizer, rows=data.Rows([text]))
    want, _ = data.load(cfg(), tokenizer, rows=data.Rows([chat]))
    assert ids(as_chat) == ids(want) and not rep.notes
    plain, _ = data.load(cfg(), tokenizer, rows=data.Rows([text]))
    assert ids(plain) != ids(want)  # off by default: TRL's plain-text convention


def test_chat_template_override_file_and_string(tmp_path, tokenizer):
    import copy

    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    (tmp_path / "t.jinja").write_text(template)
    row = {"prompt": [user("Capital of France?")], "chosen": [assistant("Paris.")],
           "rejected": [assistant("Rome.")]}
    from_file = data.load(cfg(chat_template=str(tmp_path / "t.jinja")), copy.deepcopy(tokenizer),
                          rows=data.Rows([row]))[0]
    from_string = data.load(cfg(chat_template=template), copy.deepcopy(tokenizer), rows=data.Rows([row]))[0]
    assert ids(from_file) == ids(from_string)
    assert tokenizer.decode(from_file[0].prompt_ids) == "<user>Capital of France?<|im_end|><assistant>"
    assert tokenizer.decode(from_file[0].chosen_ids) == "Paris.<|im_end|>"
    assert ids(from_file) != ids(data.load(cfg(), copy.deepcopy(tokenizer), rows=data.Rows([row]))[0])


# ---------------------------------------------------------------- masks, truncation, drops, problems

def test_only_completion_tokens_are_masked_in(tokenizer):
    rows = [{"prompt": "Hello there", "chosen": " yes", "rejected": " no thanks, really"},
            {"prompt": "A much longer prompt than the other", "chosen": " ok", "rejected": " fine"}]
    pairs, _ = data.tokenize_rows(rows, tokenizer, cfg(), "t")
    b = collate(pairs, tokenizer.pad_token_id)
    assert b.input_ids.shape[0] == 4
    for i, pair in enumerate(pairs):
        for row, comp in ((i, pair.chosen_ids), (i + 2, pair.rejected_ids)):
            n_p = len(pair.prompt_ids)
            assert not b.completion_mask[row, :n_p].any()
            assert b.completion_mask[row].sum() == len(comp)
            assert b.input_ids[row][b.completion_mask[row]].tolist() == comp
            assert b.attention_mask[row].sum() == n_p + len(comp)


def test_a_prompt_cut_from_the_left_keeps_its_bos(tokenizer):
    """Cutting the prompt's start would drop the BOS a tokenizer (Llama's) puts first: the pair would be scored in a
    context no inference ever has."""
    long_prompt = tokenizer.bos_token + " " + " ".join(f"w{i}" for i in range(60))
    full_p = tokenizer(long_prompt)["input_ids"]
    assert full_p[0] == tokenizer.bos_token_id
    pairs, rep = data.tokenize_rows([{"prompt": long_prompt, "chosen": " a", "rejected": " b"}], tokenizer,
                                    cfg(max_length=32, max_prompt_length=16), "t")
    assert pairs[0].prompt_ids == [tokenizer.bos_token_id] + full_p[-15:] and rep.prompt_truncated == 1


def test_rows_that_truncation_makes_identical_are_duplicates(tokenizer):
    rows = [{"prompt": f"intro {i} " + " ".join(f"w{k}" for k in range(40)), "chosen": " yes", "rejected": " no"}
            for i in range(3)]
    pairs, rep = data.tokenize_rows(rows, tokenizer, cfg(max_length=32, max_prompt_length=16), "t")
    assert len(pairs) == 1 and rep.dropped == {"duplicate after truncation": 2} and rep.prompt_truncated == 3
    pairs, rep = data.tokenize_rows(rows, tokenizer, cfg(max_length=32, max_prompt_length=16,
                                                         drop_duplicates=False), "t")
    assert len(pairs) == 3


def test_truncation_cuts_prompt_left_completion_right_and_counts(tokenizer):
    long_prompt = " ".join(f"w{i}" for i in range(60))
    rows = [{"prompt": long_prompt, "chosen": " " + "yes " * 30, "rejected": " no"},
            {"prompt": "short", "chosen": " a", "rejected": " b"}]
    pairs, rep = data.tokenize_rows(rows, tokenizer, cfg(max_length=32, max_prompt_length=16), "t")
    full_p = tokenizer(long_prompt)["input_ids"]
    assert pairs[0].prompt_ids == full_p[-16:]  # the end of the prompt is kept
    assert len(pairs[0].prompt_ids) + len(pairs[0].chosen_ids) == 32
    assert pairs[0].chosen_ids == tokenizer(long_prompt + " " + "yes " * 30)["input_ids"][len(full_p):][:16]
    assert pairs[0].rejected_ids[-1] == tokenizer.eos_token_id  # short completion untouched
    assert (rep.prompt_truncated, rep.completion_truncated, rep.kept) == (1, 1, 2)
    assert "prompts cut from the left: 1" in rep.lines()[0]
    # max_prompt_length null: prompts are never cut; one that fills max_length on its own is dropped
    pairs, rep = data.tokenize_rows(rows, tokenizer, cfg(max_length=32, max_prompt_length=None), "t")
    assert [p.index for p in pairs] == [1] and rep.dropped == {"prompt alone beyond max_length": 1}


def test_dropped_rows_are_counted_with_reasons(tokenizer):
    rows = [{"prompt": "p", "chosen": " a", "rejected": " b"},
            {"prompt": "p", "chosen": " same", "rejected": " same"},
            {"prompt": "", "chosen": " a", "rejected": " b"},
            {"prompt": "p", "chosen": 3, "rejected": " b"},
            {"prompt": "p", "chosen": " a", "rejected": "  "},
            {"prompt": "p", "chosen": " a", "rejected": " b"},  # duplicate of row 0
            {"prompt": "a", "chosen": "bc", "rejected": "bd"}]  # "abc" is one token: no prompt token is left
    pairs, rep = data.tokenize_rows(rows, tokenizer, cfg(), "t")
    assert [p.index for p in pairs] == [0]
    assert rep.dropped["chosen == rejected"] == 1 and rep.examples["chosen == rejected"] == [1]
    assert rep.dropped["empty field"] == 2 and rep.examples["empty field"] == [2, 4]
    assert rep.dropped["duplicate"] == 1 and rep.examples["duplicate"] == [5]
    assert sum(v for k, v in rep.dropped.items() if k.startswith("wrong type")) == 1
    assert [k for k in rep.dropped if k.startswith("empty prompt after tokenisation")] and \
        rep.examples[next(k for k in rep.dropped if k.startswith("empty prompt"))] == [6]
    kept, rep_all = data.tokenize_rows(rows, tokenizer, cfg(drop_duplicates=False), "t")
    assert [p.index for p in kept] == [0, 5] and "duplicate" not in rep_all.dropped  # repeats kept when asked
    text = "\n".join(rep.lines())
    assert "7 rows read, 1 pair kept, 6 dropped" in text and "rows 2, 4" in text


def test_template_problems_are_found_with_row_numbers(tokenizer):
    import copy

    ok = {"prompt": [user("Hi")], "chosen": [assistant("Hello.")], "rejected": [assistant("Bye.")]}
    eos_in_text = {**ok, "chosen": [assistant("Hello." + tokenizer.eos_token)]}  # template adds another EOS
    merging = {"prompt": "Reply with one word: ", "chosen": "yes", "rejected": "no"}  # space merges into " yes"
    rows = data.Rows([ok, eos_in_text, merging, {**ok, "rejected": [assistant("Later.")]}])
    pairs, rep = data.load(cfg(), copy.deepcopy(tokenizer), rows=rows)
    assert rep.kept == 4  # kept, but reported
    assert rep.problems[data_report.DOUBLE_EOS] == 1 and rep.problem_examples[data_report.DOUBLE_EOS] == [1]
    assert rep.problems[data_report.NOT_PREFIX] == 1 and rep.problem_examples[data_report.NOT_PREFIX] == [2]
    assert not rep.problems[data_report.DOUBLE_BOS]
    # a template that writes BOS itself, on a tokenizer whose BOS opens every turn: doubled BOS in every row
    doubled = "{{ bos_token }}" + tokenizer.chat_template
    _, rep2 = data.load(cfg(chat_template=doubled), copy.deepcopy(tokenizer), rows=data.Rows([ok]))
    assert rep2.problems[data_report.DOUBLE_BOS] == 1
    text = "\n".join(rep.lines())
    assert "1 × doubled EOS in a completion (row 1)" in text and "not a prefix of prompt+completion (row 2)" in text


def test_on_problem_error_stops_and_warn_trains(tokenizer, capsys):
    rows = data.Rows([{"prompt": "p", "chosen": " a", "rejected": " b"}] * 3 +
                     [{"prompt": "q", "chosen": " a", "rejected": " b"}])
    prepared = data.prepare(cfg(on_problem="warn"), tokenizer, rows, None)
    assert len(prepared.train_pairs) == 2
    assert "dropped 2 × duplicate (rows 1, 2)" in capsys.readouterr().out
    with pytest.raises(LoraDpoError, match=r"data.train: 2 data problems .*2 × duplicate \(rows 1, 2\).*"
                                           r"data.on_problem=warn"):
        data.prepare(cfg(on_problem="error"), tokenizer, rows, None)
    assert "dropped 2 × duplicate" in capsys.readouterr().out  # the report is printed before the stop


def test_report_lengths_and_percentiles(tokenizer):
    rows = data.Rows([{"prompt": "x " * n, "chosen": " y" * (n % 7 + 1), "rejected": " z"} for n in range(1, 41)])
    pairs, rep = data.load(cfg(), tokenizer, rows=rows)
    assert rep.lengths["prompt"] == [len(p.prompt_ids) for p in pairs]
    assert rep.lengths["chosen"] == [len(p.chosen_ids) for p in pairs]
    s = sorted(rep.lengths["prompt"])
    # nearest rank: p50 of 40 values is the 20th smallest, p90 the 36th, p99 the 40th
    assert data_report.percentiles(rep.lengths["prompt"]) == [s[0], s[19], s[35], s[39], s[39]]
    assert rep.to_dict()["percentiles"]["prompt"]["p90"] == s[35]
    js = data_report.as_json([rep])
    assert js["lengths"] == rep.lengths and js["train"]["kept"] == 40 and js["eval"] is None


def test_file_errors_name_file_and_line(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{broken\n')
    with pytest.raises(LoraDpoError, match=r"bad\.jsonl' line 2"):
        data.read_rows(str(bad), "data.train")
    cols = write_jsonl(tmp_path / "cols.jsonl", [{"question": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(LoraDpoError, match=r"row 0 has no 'prompt' column .*columns: \{prompt: YOUR_COLUMN\}"):
        data.read_rows(str(cols), "data.train", cfg(format="standard"))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(LoraDpoError, match="line 1 is not UTF-8"):
        data.read_rows(str(latin), "data.train")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LoraDpoError, match="no rows"):
        data.read_rows(str(tmp_path / "empty.jsonl"), "data.train")
    with pytest.raises(LoraDpoError, match="not found"):
        data.read_rows(str(tmp_path / "nope.jsonl"), "data.eval")


def test_every_row_dropped_is_an_error(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 3)
    with pytest.raises(LoraDpoError, match=r"every row .* dropped \(3 × chosen == rejected \(rows 0, 1, 2\)\)"):
        data.load(DataConfig(train=str(f)), tokenizer)


# ---------------------------------------------------------------- the report in a run, and `inspect`

def test_report_printed_and_saved_in_the_run_dir(recipe_dict, tmp_path, capsys):
    from lora_dpo.train import run

    recipe_dict["train"]["max_steps"] = 1
    recipe_dict["data"]["eval"] = None
    recipe_dict["data"]["eval_split"] = 8
    result = run(recipe_from_dict(recipe_dict))
    printed = capsys.readouterr().out
    saved = json.loads((result.output_dir / "data_report.json").read_text())
    text = (result.output_dir / "data_report.txt").read_text()
    assert text and all(line in printed for line in text.splitlines())
    assert "data.train:" in text and "data.eval:" in text and "held-out 8 rows" in text
    assert saved["train"]["kept"] == 24 and saved["eval"]["kept"] == 8
    assert len(saved["lengths"]["prompt"]) == 24 and all(n > 0 for n in saved["lengths"]["chosen"])


def _tree(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[p] = (os.path.getsize(p), os.stat(p).st_mtime_ns)
    return out


def test_inspect_renders_pairs_without_loading_weights_or_writing(recipe_dict, tmp_path, capsys, monkeypatch,
                                                                  tokenizer):
    import yaml

    model_mod = sys.modules["lora_dpo.model"]
    monkeypatch.setattr(model_mod, "load_base", lambda *a, **k: pytest.fail("inspect loaded model weights"))
    recipe_dict["data"]["train"] = str(write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "What is 2+2?", "chosen": " 4.", "rejected": " 5."},
        {"prompt": "What is 2+2?", "chosen": " 4.", "rejected": " 5."}]))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe_dict))
    before = _tree(tmp_path)
    assert main(["inspect", str(tmp_path / "r.yaml"), "-n", "1"]) == 0
    out = capsys.readouterr().out
    n_p, n_c = len(tokenizer("What is 2+2?")["input_ids"]), len(tokenizer(" 4.")["input_ids"]) + 1  # + EOS
    assert f"row 0: prompt {n_p} tokens ┃ chosen {n_c}, rejected {n_c}" in out
    assert "What is 2+2?┃ 4.<|im_end|>" in out and "[same prompt]┃ 5.<|im_end|>" in out
    assert "dropped 1 × duplicate (row 1)" in out and "tokens per pair" in out
    assert _tree(tmp_path) == before and not (tmp_path / "run").exists()
    # data.on_problem=error: the same view, then exit code 2 naming the problem
    assert main(["inspect", str(tmp_path / "r.yaml"), "data.on_problem=error"]) == 2
    captured = capsys.readouterr()
    assert "┃" in captured.out and "1 × duplicate (row 1)" in captured.err and _tree(tmp_path) == before


def test_inspect_gguf_model_reads_the_tokenizer_only(tmp_path, monkeypatch, capsys, tokenizer):
    """A .gguf model without a cached conversion: the tokenizer comes from the file's metadata, nothing is cached."""
    from lora_dpo.data_inspect import load_tokenizer_only
    from lora_dpo.model import demo_gguf_path
    from lora_dpo.recipe import ModelConfig

    monkeypatch.setenv("LORA_DPO_CACHE", str(tmp_path / "cache"))
    model_mod = sys.modules["lora_dpo.model"]
    monkeypatch.setattr(model_mod, "gguf_to_hf_dir", lambda *a, **k: pytest.fail("converted the GGUF weights"))
    tok = load_tokenizer_only(ModelConfig(name_or_path=str(demo_gguf_path())))
    assert tok("What is 2+2?")["input_ids"] == tokenizer("What is 2+2?")["input_ids"]
    assert tok.chat_template == tokenizer.chat_template and tok.pad_token is not None
    assert not (tmp_path / "cache").exists()


def test_conversations_without_a_chat_template_ask_for_one(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    rows = data.Rows([{"prompt": [user("Hi")], "chosen": [assistant("Hello.")], "rejected": [assistant("Bye.")]}])
    with pytest.raises(LoraDpoError, match=r"data.train: the chat template cannot render row 0 \(the tokenizer has no "
                                           r"chat template\); set data.chat_template"):
        data.load(cfg(), tok, rows=rows)
    assert data.load(cfg(chat_template=tokenizer.chat_template), tok, rows=rows)[1].kept == 1


# ---------------------------------------------------------------- nothing read is left out without a word

def test_system_that_is_not_a_string_is_dropped_with_its_reason(tmp_path, tokenizer):
    """system: 123 (or a list) cannot be a system message: the row is dropped and counted, never trained
    without it in silence; a null system is no system."""
    conv = {"prompt": [user("Hi")], "chosen": [assistant("Hello.")], "rejected": [assistant("Go away.")]}
    text = {"prompt": "Hi", "chosen": " Hello.", "rejected": " Go away."}
    reason = "wrong type (system must be a string or null)"
    for name, row in (("text", text), ("conversational", conv)):
        f = write_jsonl(tmp_path / f"{name}.jsonl", [{**row, "system": 123}, {**row, "system": None},
                                                     {**row, "system": ["Be kind."]}])
        pairs, rep = data.load(DataConfig(train=str(f)), tokenizer)
        assert rep.dropped == {reason: 2} and rep.examples[reason] == [0, 2] and [p.index for p in pairs] == [1]
        assert f"dropped 2 × {reason} (rows 0, 2)" in "\n".join(rep.lines()), name
    # rows given to load directly (the Python API) are checked too
    _, rep = data.load(cfg(), tokenizer, rows=data.Rows([{**conv, "system": 7}, conv]))
    assert rep.dropped == {reason: 1} and rep.examples[reason] == [0]


def test_system_column_beaten_by_the_prompts_own_system_message_is_noted(tokenizer):
    conv = {"prompt": [{"role": "system", "content": "Be brief."}, user("Hi")], "chosen": [assistant("Hello.")],
            "rejected": [assistant("Go away.")]}
    same = {**conv, "chosen": [assistant("Hi.")], "system": "Be brief."}  # the same message twice: nothing lost
    _, rep = data.load(cfg(), tokenizer, rows=data.Rows([{**conv, "system": "Be kind."}, same]))
    assert any(n.startswith("1 conversational rows have a system column and a different system message")
               for n in rep.notes)


def test_unused_columns_are_named_in_the_report(tmp_path, tokenizer, capsys):
    """A prompt column under another name ('question') made the source implicit and vanished without a word: the
    report names every column nothing reads, with the mapping that would read it, and data.on_problem=error stops
    on a detected implicit source that has one."""
    rows = [{"question": f"What is {i}+{i}?", "chosen": f"The answer is {2 * i}.",
             "rejected": f"The answer is {2 * i + 1}."} for i in range(4)]
    f = write_jsonl(tmp_path / "q.jsonl", rows)
    train, _ = data.read_data(DataConfig(train=str(f)))
    assert train.sources[0]["format"] == "implicit" and train.sources[0]["unused"] == {"question": 4}
    data.prepare(DataConfig(train=str(f)), tokenizer, train, None)
    out = capsys.readouterr().out
    assert "columns not used: question (4 rows) — format implicit (detected: no prompt column)" in out
    assert "map it in a data source mapping with columns: {prompt: question}" in out
    with pytest.raises(LoraDpoError, match=r"data.train: 1 data problems .*q\.jsonl: no prompt column \(format "
                                           r"implicit detected\) and columns not used: question"):
        data.prepare(DataConfig(train=str(f), on_problem="error"), tokenizer, train, None)
    # declared implicit: said, not a problem
    declared = data.read_rows(str(f), "data.train", DataConfig(train=str(f), format="implicit"))
    assert data.prepare(DataConfig(train=str(f), on_problem="error"), tokenizer, declared, None).train_pairs
    # extra columns of a standard source, a system_prompt column, and a prompt column shadowed by a mapping
    extra = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Hi", "chosen": " a", "rejected": " b", "score": 1,
                                                "system_prompt": "Be kind.", "question": "Hello"}])
    dcfg = recipe_from_dict({"model": {"name_or_path": "m"}, "output": {"dir": "o"},
                             "data": {"train": [{"path": str(extra), "columns": {"prompt": "question"}}]}}).data
    rows, _ = data.read_data(dcfg)
    assert rows.sources[0]["unused"] == {"prompt": 1, "score": 1, "system_prompt": 1}
    text = "\n".join(data.load(dcfg, tokenizer, rows=rows)[1].lines())
    assert "columns not used: prompt (1 rows), score (1 rows), system_prompt (1 rows)" in text
    assert "columns: {system: system_prompt}" in text
