"""Where preference rows come from: local files, saved dataset directories and hub datasets; mixing several
sources by weight or count; holding an eval split out of the training sources.

A source is a mapping (see `recipe.DataSource`); a plain string in the recipe is the mapping `{path: STRING}`.
Rows are returned raw (whatever columns the source has): `data_formats` turns them into (prompt, chosen, rejected).
Every error names the recipe key and the file (and line or row where there is one) and says what to do; a
setting a source cannot use (split, name or revision of a local file) is refused, never ignored.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path
from typing import Any

from lora_dpo.errors import LoraDpoError

FILE_TYPES = (".json", ".jsonl", ".parquet", ".csv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SOURCE_DEFAULTS = {"name": None, "split": "train", "revision": None, "format": None, "columns": None,
                    "weight": None, "count": None}


def source_specs(value: str | list | None, key: str) -> list[tuple[str, dict]]:
    """The recipe's data.train / data.eval value → [(key naming the source, source mapping)]."""
    if value is None:
        return []
    if isinstance(value, str):
        return [(key, {**_SOURCE_DEFAULTS, "path": value})]
    return [(f"{key}[{i}].path", {**_SOURCE_DEFAULTS, **src}) for i, src in enumerate(value)]


def label(spec: dict) -> str:
    """How reports name a source: the path, plus config/split for hub datasets and saved DatasetDicts."""
    extra = [x for x in (spec.get("name"), spec.get("split") if spec.get("split") != "train" else None) if x]
    return spec["path"] + (f" [{'/'.join(extra)}]" if extra else "")


def source_kind(path: str) -> str:
    """'file' | 'disk' (a save_to_disk directory) | 'hub' (a dataset id); a missing local path is still 'file'."""
    p = Path(path).expanduser()
    if p.is_dir():  # before the suffix: a directory named train.jsonl is not a file ("not found" would mislead)
        return "disk"
    if p.suffix.lower() in FILE_TYPES or p.is_file():
        return "file"
    if path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
        return "file"
    return "hub"


def read_source(spec: dict, key: str) -> list[dict]:
    """All rows of one source, as dicts. Raises LoraDpoError naming `key` and the file for anything unreadable."""
    path = spec["path"]
    kind = source_kind(path)
    if kind == "hub":
        rows = _read_hub(spec, key)
    else:
        _refuse_hub_settings(spec, kind, key)
        rows = _read_saved(spec, key) if kind == "disk" else _read_file(Path(path).expanduser(), path, key)
    if not rows:
        raise LoraDpoError(f"{key}: '{label(spec)}' holds no rows; give a source with prompt/chosen/rejected rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise LoraDpoError(f"{key}: '{label(spec)}' row {i} is a {type(row).__name__}, not an object with "
                               "prompt, chosen, rejected; fix that row")
    return rows


def _setting_key(key: str, setting: str) -> str:
    """data.train[0].path → data.train[0].split: errors name the setting the user wrote."""
    return (key[: -len(".path")] if key.endswith(".path") else key) + "." + setting


def _refuse_hub_settings(spec: dict, kind: str, key: str) -> None:
    """name and revision pick a hub dataset's config and commit, split one of its splits: a local source has none
    of them, and a setting that does nothing is refused rather than ignored."""
    what = "local file" if kind == "file" else "local directory"
    for setting in ("name", "revision"):
        if spec[setting] is not None:
            raise LoraDpoError(f"{_setting_key(key, setting)}: '{spec['path']}' is a {what}, and {setting} applies "
                               f"to hub datasets only; remove {setting}")
    if kind == "file" and spec["split"] != "train":  # "train" is the default, so it cannot be told from unset
        raise LoraDpoError(f"{_setting_key(key, 'split')}: '{spec['path']}' is a local file, which has no splits; "
                           "remove split (give each split's file as a source of its own)")


def _read_file(p: Path, path: str, key: str) -> list[Any]:
    if not p.is_file():
        raise LoraDpoError(f"{key}: file '{path}' not found; check the path (a local .jsonl/.json/.parquet/.csv "
                           "file, a save_to_disk directory or a hub dataset id)")
    suffix = p.suffix.lower()
    if suffix not in FILE_TYPES:
        raise LoraDpoError(f"{key}: '{path}' has an unsupported extension '{p.suffix}'; use .jsonl, .json, "
                           ".parquet or .csv")
    if suffix == ".parquet":
        return _read_parquet(p, path, key)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise LoraDpoError(f"{key}: '{path}' line {line} is not UTF-8 text; re-encode the file as UTF-8") from None
    except OSError as e:
        raise LoraDpoError(f"{key}: cannot read '{path}' ({e.strerror}); check its permissions") from None
    # Excel's "CSV UTF-8" and some editors start the file with a byte order mark: left in, it would rename the first
    # CSV column ('\ufeffprompt', so the prompt went unused) and break the first JSON line
    text = text.removeprefix("\ufeff")
    if suffix == ".csv":
        return _read_csv(text, path, key)
    if suffix == ".json" and not text.lstrip().startswith("{"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoraDpoError(f"{key}: '{path}' is not valid JSON (line {e.lineno}: {e.msg}); fix the file or "
                               "write one JSON object per line (.jsonl)") from None
        if not isinstance(rows, list):
            raise LoraDpoError(f"{key}: '{path}' must hold a JSON list of rows; wrap the rows in [ ]")
        return rows
    whole = _one_object(text)
    if whole is not None:
        return _object_rows(whole, text, p, path, key)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise LoraDpoError(f"{key}: '{path}' line {n} is not valid JSON ({e.msg}); fix or remove that "
                               "line") from None
    return rows


def _one_object(text: str) -> dict | None:
    """The file's whole text as one JSON object, or None (JSON Lines, or broken: read line by line, which names
    the bad line)."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        whole = json.loads(text)  # JSON Lines fails fast here, with "Extra data" after its first row
    except json.JSONDecodeError:
        return None
    return whole if isinstance(whole, dict) else None


def _holds_rows(value: Any) -> bool:
    """A list of objects that are not chat messages (a row's conversation is a list of {role, content} too)."""
    return (isinstance(value, list) and bool(value) and all(isinstance(x, dict) for x in value)
            and not any("role" in x for x in value))


def _object_rows(whole: dict, text: str, p: Path, path: str, key: str) -> list[dict]:
    """A file that is one JSON object: a one-row JSON Lines file, or an export that keeps its rows under a key
    ({"data": [...]}) — read as one row, that would only fail later as "no 'chosen' column"."""
    holder = next((k for k, v in whole.items() if _holds_rows(v)), None)
    if holder is not None and "chosen" not in whole:  # a row may carry a list of objects too (scores, ratings)
        out = p.with_suffix(".jsonl") if p.suffix.lower() == ".json" else p.with_name(p.stem + "_rows.jsonl")
        query = f".{holder}[]" if holder.isidentifier() else f'.["{holder}"][]'
        raise LoraDpoError(f"{key}: '{path}' is a JSON object, not a list of rows or JSON Lines; its rows are under "
                           f"the key '{holder}' ({len(whole[holder])} rows): write them one per line, e.g. "
                           f"jq -c '{query}' {path} > {out}, and give that file")
    if sum(1 for line in text.splitlines() if line.strip()) > 1:
        raise LoraDpoError(f"{key}: '{path}' is one JSON object over several lines, not a list of rows or JSON "
                           "Lines; wrap the rows in [ ] (.json) or write one object per line (.jsonl)")
    return [whole]


def _read_parquet(p: Path, path: str, key: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise LoraDpoError(f"{key}: '{path}' is not a readable parquet file ({msg}); re-export it, e.g. with "
                           "Dataset.to_parquet") from None


def _read_csv(text: str, path: str, key: str) -> list[dict]:
    reader = csv.DictReader(text.splitlines(), strict=True)
    rows = []
    try:
        for row in reader:
            if None in row or None in row.values():
                raise LoraDpoError(f"{key}: '{path}' line {reader.line_num} has {'more' if None in row else 'fewer'}"
                                   f" fields than the header ({len(reader.fieldnames)}); fix that line "
                                   "(quote fields that hold commas)")
            rows.append(row)
    except csv.Error as e:
        raise LoraDpoError(f"{key}: '{path}' line {reader.line_num} is not valid CSV ({e}); fix that line") from None
    return rows


def _read_saved(spec: dict, key: str) -> list[dict]:
    path = spec["path"]
    p = Path(path).expanduser()
    if not any((p / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
        raise LoraDpoError(f"{key}: directory '{path}' is not a saved dataset (no dataset_dict.json or state.json);"
                           " give a save_to_disk directory, or list its data files as sources")
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 - any failure means the directory is unusable
        raise LoraDpoError(f"{key}: cannot load the saved dataset '{path}' ({_first_line(e)}); save it again "
                           "with save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if spec["split"] not in ds:
            raise LoraDpoError(f"{key}: saved dataset '{path}' has no split '{spec['split']}' (it has "
                               f"{', '.join(ds)}); set split to one of them")
        ds = ds[spec["split"]]
    elif spec["split"] != "train":  # the default; any other split would be ignored (the report even showed it)
        raise LoraDpoError(f"{_setting_key(key, 'split')}: '{path}' is a single saved Dataset with no splits; "
                           "remove split")
    return ds.to_list()


def _read_hub(spec: dict, key: str) -> list[dict]:
    import datasets

    from lora_dpo.hub import offline_if_unreachable

    offline_if_unreachable()
    path, name, split, revision = spec["path"], spec["name"], spec["split"], spec["revision"]
    try:
        ds = datasets.load_dataset(path, name, split=split, revision=revision)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, unknown config/split: one message
        raise LoraDpoError(f"{key}: cannot load hub dataset '{label(spec)}' ({_first_line(e)}); if it is a local "
                           "path, check it exists; offline, save the dataset once (save_to_disk or to_json) and "
                           "give that local path") from None
    return ds.to_list()


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:160]


def take(sizes: list[int], specs: list[tuple[str, dict]], seed: int) -> list[list[int]]:
    """Which rows of each source go into the mix (row indices in source order).

    A source with `count` gives exactly that many rows; one with neither count nor weight gives all of its rows.
    Sources with a `weight` share one mix in proportion to their weights, as large as it can be without
    repeating a row: its size is limited by the source that runs out first.
    """
    n_take: list[int] = list(sizes)
    weighted = [i for i, (_, s) in enumerate(specs) if s["weight"] is not None]
    for i, (key, s) in enumerate(specs):
        if s["count"] is not None:
            if s["count"] > sizes[i]:
                count_key = key[: -len(".path")] + ".count"
                raise LoraDpoError(f"{count_key}: {s['count']} rows asked for, but '{label(s)}' has {sizes[i]}; "
                                   f"lower count to at most {sizes[i]} or use weight")
            n_take[i] = s["count"]
    if weighted:
        total = sum(specs[i][1]["weight"] for i in weighted)
        mix = min(sizes[i] * total / specs[i][1]["weight"] for i in weighted)
        for i in weighted:
            n_take[i] = int(mix * specs[i][1]["weight"] / total + 1e-9)
    out = []
    for i, n in enumerate(n_take):
        rng = random.Random(seed * 1_000_003 + i)
        out.append(list(range(sizes[i])) if n == sizes[i] else sorted(rng.sample(range(sizes[i]), n)))
    return out


def split_off(n: int, eval_split: int | float, seed: int) -> set[int]:
    """Indices (of n mixed training rows) held out as eval rows."""
    k = eval_split if isinstance(eval_split, int) else round(n * eval_split)
    if k < 1:
        raise LoraDpoError(f"data.eval_split: {eval_split} of {n} rows is 0 rows; use a larger fraction or a "
                           "number of rows")
    if k >= n:
        how = "" if isinstance(eval_split, int) else f" ({eval_split:g} × {n} rounds to {k})"
        raise LoraDpoError(f"data.eval_split: holding out {k} of {n} rows{how} leaves no training rows; hold out "
                           f"fewer rows (at most {n - 1}{f', a fraction below {(n - 0.5) / n:.3g}' if how else ''})")
    return set(random.Random(seed).sample(range(n), k))
