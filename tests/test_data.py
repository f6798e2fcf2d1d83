"""Data: standard and conversational rows → token ids; completion-only labels; EOS; truncation; drop counts."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from lora_dpo import data
from lora_dpo.batching import collate
from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import DataConfig


def cfg(**kw) -> DataConfig:
    return DataConfig(train="x.jsonl", **kw)


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


def test_dropped_rows_are_counted_with_reasons(tokenizer):
    rows = [{"prompt": "p", "chosen": " a", "rejected": " b"},
            {"prompt": "p", "chosen": " same", "rejected": " same"},
            {"prompt": "", "chosen": " a", "rejected": " b"},
            {"prompt": "p", "chosen": 3, "rejected": " b"},
            {"prompt": "p", "chosen": " a", "rejected": "  "}]
    pairs, rep = data.tokenize_rows(rows, tokenizer, cfg(), "t")
    assert [p.index for p in pairs] == [0]
    assert rep.dropped["chosen == rejected"] == 1 and rep.examples["chosen == rejected"] == [1]
    assert rep.dropped["empty field"] == 2
    assert sum(v for k, v in rep.dropped.items() if k.startswith("wrong type")) == 1
    text = "\n".join(rep.lines())
    assert "5 rows read, 1 pairs kept, 4 dropped" in text and "rows 2, 4" in text


def test_file_errors_name_file_and_line(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{broken\n')
    with pytest.raises(LoraDpoError, match=r"bad\.jsonl' line 2"):
        data.read_rows(str(bad), "data.train")
    cols = write_jsonl(tmp_path / "cols.jsonl", [{"question": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(LoraDpoError, match="row 0 has no 'prompt' column"):
        data.read_rows(str(cols), "data.train")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(LoraDpoError, match="not UTF-8"):
        data.read_rows(str(latin), "data.train")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LoraDpoError, match="no rows"):
        data.read_rows(str(tmp_path / "empty.jsonl"), "data.train")
    with pytest.raises(LoraDpoError, match="not found"):
        data.read_rows(str(tmp_path / "nope.jsonl"), "data.eval")


def test_every_row_dropped_is_an_error(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 3)
    with pytest.raises(LoraDpoError, match=r"every row .* dropped \(3 × chosen == rejected\)"):
        data.load(DataConfig(train=str(f)), tokenizer)


def test_json_list_file(tmp_path, tokenizer):
    import json

    f = tmp_path / "t.json"
    f.write_text(json.dumps([{"prompt": "p", "chosen": " a", "rejected": " b"}]))
    pairs, rep = data.load(DataConfig(train=str(f)), tokenizer)
    assert rep.kept == 1 and len(pairs) == 1
