"""Where preference rows come from: local files, saved dataset directories and hub datasets; mixing several
sources by weight or count; holding an eval split out of the training sources.

A source is a mapping (see `recipe.DataSource`); a plain string in the recipe is the mapping `{path: STRING}`.
Rows are returned raw (whatever columns the source has): `data_formats` turns them into (prompt, chosen, rejected).
Every error names the recipe key and the file (and line or row where there is one) and says what to do.
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
    if p.suffix.lower() in FILE_TYPES or p.is_file():
        return "file"
    if p.is_dir():
        return "disk"
    if path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
        return "file"
    return "hub"


def read_source(spec: dict, key: str) -> list[dict]:
    """All rows of one source, as dicts. Raises LoraDpoError naming `key` and the file for anything unreadable."""
    path = spec["path"]
    kind = source_kind(path)
    if kind == "hub":
        rows = _read_hub(spec, key)
    elif kind == "disk":
        rows = _read_saved(spec, key)
    else:
        rows = _read_file(Path(path).expanduser(), path, key)
    if not rows:
        raise LoraDpoError(f"{key}: '{label(spec)}' holds no rows; give a source with prompt/chosen/rejected rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise LoraDpoError(f"{key}: '{label(spec)}' row {i} is a {type(row).__name__}, not an object with "
                               "prompt, chosen, rejected; fix that row")
    return rows


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
        raise LoraDpoError(f"data.eval_split: holding out {k} of {n} rows leaves no training rows; use fewer "
                           "rows or a fraction below 1")
    return set(random.Random(seed).sample(range(n), k))
