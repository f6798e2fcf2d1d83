"""Data sources: local files of every type, save_to_disk directories, hub ids (never the network), mixing by
weight and count, and the seeded train/eval split."""

from __future__ import annotations

import json

import pytest
from conftest import arithmetic_rows, write_jsonl

from lora_dpo import data, data_sources
from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import DataConfig, recipe_from_dict


def data_cfg(**data_keys) -> DataConfig:
    return recipe_from_dict({"model": {"name_or_path": "m"}, "output": {"dir": "o"}, "data": data_keys}).data


def plain(rows) -> list[dict]:
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]


def test_every_local_file_type_reads_the_same_rows(tmp_path):
    import datasets

    rows = arithmetic_rows(12)
    files = {"jsonl": write_jsonl(tmp_path / "a.jsonl", rows)}
    files["json"] = tmp_path / "a.json"
    files["json"].write_text(json.dumps(rows))
    files["json lines in .json"] = write_jsonl(tmp_path / "b.json", rows)
    files["parquet"] = tmp_path / "a.parquet"
    datasets.Dataset.from_list(rows).to_parquet(files["parquet"])
    files["csv"] = tmp_path / "a.csv"
    datasets.Dataset.from_list(rows).to_csv(files["csv"], index=False)
    files["saved Dataset"] = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(files["saved Dataset"])
    for kind, path in files.items():
        got = data.read_rows(str(path), "data.train")
        assert plain(got) == rows, kind
        assert got.origins == list(range(12)) and got.sources[0]["format"] == "standard", kind


def test_saved_dataset_dict_split_and_errors(tmp_path):
    import datasets

    rows = arithmetic_rows(10)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:6]),
                          "test": datasets.Dataset.from_list(rows[6:])}).save_to_disk(tmp_path / "dd")
    assert plain(data.read_rows(str(tmp_path / "dd"), "data.train")) == rows[:6]
    got = data.read_rows([{"path": str(tmp_path / "dd"), "split": "test"}], "data.eval")
    assert plain(got) == rows[6:]
    with pytest.raises(LoraDpoError, match=r"data.eval\[0\].path: saved dataset .* has no split 'dev' \(it has "
                                           r"train, test\); set split"):
        data.read_rows([{"path": str(tmp_path / "dd"), "split": "dev"}], "data.eval")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(LoraDpoError, match="is not a saved dataset"):
        data.read_rows(str(tmp_path / "plain_dir"), "data.train")


def test_hub_source_passes_id_config_split_revision(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, *, split=None, revision=None):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list([{"chosen": "\n\nHuman: hi\n\nAssistant: hello",
                                            "rejected": "\n\nHuman: hi\n\nAssistant: go away"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = data_cfg(train=[{"path": "Anthropic/hh-rlhf", "name": "harmless-base", "split": "test",
                           "revision": "abc123"}])
    rows, _ = data.read_data(cfg)
    assert calls == [("Anthropic/hh-rlhf", "harmless-base", "test", "abc123")]
    assert rows[0]["prompt"] == [{"role": "user", "content": "hi"}] and rows.sources[0]["format"] == "hh"
    data.read_rows("trl-lib/ultrafeedback", "data.train")  # a plain string id: default split train, no revision
    assert calls[-1] == ("trl-lib/ultrafeedback", None, "train", None)


def test_hub_source_offline_is_one_line_naming_the_id(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraDpoError) as e:
        data.read_rows("someone/prefs-that-do-not-exist", "data.train")
    msg = str(e.value)
    assert "\n" not in msg and "data.train: cannot load hub dataset 'someone/prefs-that-do-not-exist'" in msg
    assert "give that local path" in msg


@pytest.mark.parametrize("path,kind", [("owner/name", "hub"), ("imdb", "hub"), ("data/train.jsonl", "file"),
                                       ("./data/train", "file"), ("a/b/c", "file"), ("/abs/dir", "file")])
def test_source_kind(path, kind):
    assert data_sources.source_kind(path) == kind


def test_mix_by_weight_and_count(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", arithmetic_rows(30, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", arithmetic_rows(30, seed=2))
    c = write_jsonl(tmp_path / "c.jsonl", arithmetic_rows(10, seed=3))
    # weights 2:1 over two 30-row sources: the mix is as large as it can be without repeating a row → 30 + 15
    cfg = data_cfg(train=[{"path": str(a), "weight": 2}, {"path": str(b), "weight": 1}, {"path": str(c), "count": 4}])
    rows, _ = data.read_data(cfg)
    per_source = [sum(str(o).startswith(f"{p}:") for o in rows.origins) for p in (a, b, c)]
    assert per_source == [30, 15, 4] and len(rows) == 49
    assert [s["taken"] for s in rows.sources] == [30, 15, 4] and [s["read"] for s in rows.sources] == [30, 30, 10]
    taken_b = [int(o.rsplit(":", 1)[1]) for o in rows.origins if o.startswith(f"{b}:")]
    assert taken_b == sorted(set(taken_b))  # no row twice, source order kept
    src_b = data.read_rows(str(b), "x")
    assert [rows[i] for i, o in enumerate(rows.origins) if o.startswith(f"{b}:")] == [src_b[i] for i in taken_b]
    again, _ = data.read_data(cfg)
    other, _ = data.read_data(data_cfg(train=cfg.train, split_seed=7))
    assert again.origins == rows.origins and other.origins != rows.origins  # seeded
    with pytest.raises(LoraDpoError, match=r"data.train\[1\].count: 31 rows asked for, but .* has 30; lower count"):
        data.read_data(data_cfg(train=[str(a), {"path": str(b), "count": 31}]))


def test_multi_source_report_names_file_and_row(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", arithmetic_rows(3))
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "chosen": " same", "rejected": " same"}] +
                    arithmetic_rows(2, seed=5))
    rows, _ = data.read_data(data_cfg(train=[str(a), str(b)]))
    pairs, rep = data.load(DataConfig(train="x"), tokenizer, "train", rows)
    assert rep.examples["chosen == rejected"] == [f"{b}:0"]
    text = "\n".join(rep.lines())
    assert "rows read" in text and f"source {a} (standard, detected): 3 rows read, 3 taken" in text
    assert f"(row {b}:0)" in text


def test_eval_split_by_size_and_fraction(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", arithmetic_rows(50))
    all_rows = data.read_rows(str(f), "data.train")
    for split, n_eval in ((10, 10), (0.2, 10), (0.05, 2)):
        train, eval_ = data.read_data(data_cfg(train=str(f), eval_split=split))
        assert len(eval_) == n_eval and len(train) == 50 - n_eval
        assert sorted(train.origins + eval_.origins) == list(range(50))  # disjoint, nothing lost
        assert [all_rows[i] for i in eval_.origins] == list(eval_)
    a, _ = data.read_data(data_cfg(train=str(f), eval_split=10))
    b, _ = data.read_data(data_cfg(train=str(f), eval_split=10, split_seed=1))
    assert a.origins != b.origins and data.read_data(data_cfg(train=str(f), eval_split=10))[0].origins == a.origins
    with pytest.raises(LoraDpoError, match=r"data.eval_split: holding out 50 of 50 rows leaves no training rows"):
        data.read_data(data_cfg(train=str(f), eval_split=50))
    with pytest.raises(LoraDpoError, match=r"data.eval_split: 0.001 of 50 rows is 0 rows"):
        data.read_data(data_cfg(train=str(f), eval_split=0.001))


def test_bare_strings_in_a_source_list(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", arithmetic_rows(2))
    cfg = data_cfg(train=[str(a)])
    assert cfg.train[0]["path"] == str(a) and cfg.train[0]["split"] == "train"
    assert len(data.read_data(cfg)[0]) == 2


def test_utf8_bom_is_stripped_from_csv_and_json(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a BOM: the first column must still be 'prompt' (it was
    '\ufeffprompt', detected as implicit and trained without its prompt), and JSON/JSONL must still parse."""
    rows = arithmetic_rows(3)
    bom = "\ufeff"
    (tmp_path / "a.csv").write_text(bom + "prompt,chosen,rejected\n" + "".join(
        f'"{r["prompt"]}","{r["chosen"]}","{r["rejected"]}"\n' for r in rows), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(bom + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "a.json").write_text(bom + json.dumps(rows), encoding="utf-8")
    for name in ("a.csv", "a.jsonl", "a.json"):
        got = data.read_rows(str(tmp_path / name), "data.train")
        assert plain(got) == rows and got.sources[0]["format"] == "standard", name
        assert not got.sources[0]["unused"], name


def test_json_object_file_is_named_as_such(tmp_path):
    """{"data": [rows]} (pretty-printed or on one line) is a JSON object, not JSON Lines with a bad line 1 or one
    row without a 'chosen' column; the message names the key that holds the rows and how to convert it."""
    rows = arithmetic_rows(3)
    (tmp_path / "pretty.json").write_text(json.dumps({"data": rows}, indent=1))
    (tmp_path / "one_line.json").write_text(json.dumps({"version": 1, "data": rows}))
    for name in ("pretty.json", "one_line.json"):
        with pytest.raises(LoraDpoError) as e:
            data.read_rows(str(tmp_path / name), "data.train")
        msg = str(e.value)
        assert "is a JSON object, not a list of rows or JSON Lines" in msg and "under the key 'data' (3 rows)" in msg
        assert "jq -c '.data[]'" in msg and "line 1" not in msg, name
    (tmp_path / "row.json").write_text(json.dumps(rows[0], indent=1))
    with pytest.raises(LoraDpoError, match="is one JSON object over several lines, not a list of rows"):
        data.read_rows(str(tmp_path / "row.json"), "data.train")
    # one conversational row on one line is JSON Lines: its message lists are not mistaken for rows
    conv = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    assert list(data.read_rows(str(write_jsonl(tmp_path / "c.jsonl", [conv])), "data.train")) == [conv]


def test_directory_named_like_a_file_is_a_directory(tmp_path):
    import datasets

    (tmp_path / "dir.jsonl").mkdir()
    assert data_sources.source_kind(str(tmp_path / "dir.jsonl")) == "disk"
    with pytest.raises(LoraDpoError, match=r"directory '.*dir\.jsonl' is not a saved dataset"):
        data.read_rows(str(tmp_path / "dir.jsonl"), "data.train")
    rows = arithmetic_rows(4)
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved.jsonl")
    assert plain(data.read_rows(str(tmp_path / "saved.jsonl"), "data.train")) == rows


def test_hub_only_settings_on_local_sources_are_refused(tmp_path):
    """split/name/revision that a local source cannot use are refused naming the key, never ignored."""
    import datasets

    f = write_jsonl(tmp_path / "a.jsonl", arithmetic_rows(4))
    datasets.Dataset.from_list(arithmetic_rows(4)).save_to_disk(tmp_path / "ds")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(arithmetic_rows(4))}).save_to_disk(tmp_path / "dd")
    cases = [
        ({"path": str(tmp_path / "ds"), "split": "test"},
         r"data.train\[0\].split: '.*ds' is a single saved Dataset with no splits; remove split"),
        ({"path": str(f), "split": "test"}, r"data.train\[0\].split: '.*a.jsonl' is a local file, which has no "
                                            r"splits; remove split"),
        ({"path": str(f), "name": "cfg"}, r"data.train\[0\].name: '.*a.jsonl' is a local file, and name applies "
                                          r"to hub datasets only; remove name"),
        ({"path": str(f), "revision": "main"}, r"data.train\[0\].revision: .*remove revision"),
        ({"path": str(tmp_path / "dd"), "name": "cfg"}, r"data.train\[0\].name: '.*dd' is a local directory"),
    ]
    for source, message in cases:
        with pytest.raises(LoraDpoError, match=message):
            data.read_data(data_cfg(train=[source]))
    assert len(data.read_data(data_cfg(train=[{"path": str(tmp_path / "ds")}]))[0]) == 4  # default split: fine


def test_eval_split_labels_name_the_held_out_count(tmp_path, tokenizer):
    """24 rows, eval_split 6: training is '24 minus 6 held out', eval is '6 held out' — in the printed report and
    in data_report.txt / .json (the training label said 'minus held-out 18 rows')."""
    f = write_jsonl(tmp_path / "t.jsonl", arithmetic_rows(24))
    dcfg = data_cfg(train=str(f), eval_split=6)
    train, eval_ = data.read_data(dcfg)
    assert train.label == f"{f} (minus held-out 6 rows, split_seed 42)" and len(train) == 18
    assert eval_.label == f"{f} (held-out 6 rows, split_seed 42)" and len(eval_) == 6
    prepared = data.prepare(dcfg, tokenizer, train, eval_, say=lambda _: None)
    prepared.save(tmp_path)
    text = (tmp_path / "data_report.txt").read_text()
    assert f"data.train: {f} (minus held-out 6 rows, split_seed 42): 18 rows read" in text
    assert f"data.eval: {f} (held-out 6 rows, split_seed 42): 6 rows read" in text
    saved = json.loads((tmp_path / "data_report.json").read_text())
    assert saved["train"]["source"] == train.label and saved["eval"]["source"] == eval_.label
