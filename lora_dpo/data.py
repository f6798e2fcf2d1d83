"""Rows → (prompt, chosen, rejected) → token ids, with a report of everything that was cut or dropped.

Tokenisation follows the convention TRL's DPOTrainer uses, so that log-probs are comparable: the prompt and
prompt+completion are tokenised whole (standard text gets EOS appended; conversations go through the chat
template), and the completion starts where the two token sequences first differ. That keeps tokens that merge
across the prompt/completion boundary intact.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import DataConfig

COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class Pair:
    """One tokenised preference pair. `index` is the row number in the source file (0-based)."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int


@dataclass
class DataReport:
    source: str
    rows: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)
    boundary_mismatch: int = 0

    def drop(self, reason: str, index: int) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(index)

    def lines(self) -> list[str]:
        out = [f"{self.source}: {self.rows} rows read, {self.kept} pairs kept, "
               f"{sum(self.dropped.values())} dropped; prompts cut from the left: {self.prompt_truncated}, "
               f"completions cut from the right: {self.completion_truncated}"]
        for reason, n in sorted(self.dropped.items()):
            out.append(f"  dropped {n} × {reason} (rows {', '.join(map(str, self.examples[reason]))}"
                       f"{', …' if n > len(self.examples[reason]) else ''})")
        if self.boundary_mismatch:
            out.append(f"  {self.boundary_mismatch} rows: the tokenised prompt is not a prefix of prompt+completion "
                       "(tokens merge across the boundary or the template renders the prompt differently); the "
                       "completion starts where they differ")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "kept": self.kept,
                "prompt_truncated": self.prompt_truncated, "completion_truncated": self.completion_truncated,
                "dropped": dict(self.dropped), "examples": self.examples,
                "boundary_mismatch": self.boundary_mismatch}


def read_rows(path: str, key: str) -> list[dict]:
    """Rows of a local .json (a list of objects) or .jsonl file. Errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise LoraDpoError(f"{key}: file '{path}' not found; give a local .jsonl/.json file")
    if p.suffix not in (".jsonl", ".json"):
        raise LoraDpoError(f"{key}: '{path}' has an unsupported extension '{p.suffix}'; use .jsonl or .json")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise LoraDpoError(f"{key}: '{path}' line {line} is not UTF-8 text; re-encode the file as UTF-8") from None
    if p.suffix == ".json" and not text.lstrip().startswith("{"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoraDpoError(f"{key}: '{path}' is not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(rows, list):
            raise LoraDpoError(f"{key}: '{path}' must hold a JSON list of rows")
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LoraDpoError(f"{key}: '{path}' line {n} is not valid JSON ({e.msg}); fix or remove that "
                                   "line") from None
    if not rows:
        raise LoraDpoError(f"{key}: '{path}' holds no rows; it needs objects with {', '.join(COLUMNS)}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise LoraDpoError(f"{key}: '{path}' row {i} is a {type(row).__name__}, not an object with "
                               f"{', '.join(COLUMNS)}")
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise LoraDpoError(f"{key}: '{path}' row {i} has no '{missing[0]}' column (it has "
                               f"{', '.join(map(repr, row)) or 'none'}); every row needs {', '.join(COLUMNS)}")
    return rows


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _template(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=True)
    return list(out["input_ids"])


def tokenize_row(row: dict, tokenizer, system_prompt: str | None = None,
                 ) -> tuple[list[int], list[int], list[int], bool]:
    """→ (prompt_ids, chosen_ids, rejected_ids, boundary_ok). Raises ValueError(reason) for an unusable row."""
    prompt, chosen, rejected = (row[c] for c in COLUMNS)
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        if not prompt.strip() or not chosen.strip() or not rejected.strip():
            raise ValueError("empty field")
        if chosen == rejected:
            raise ValueError("chosen == rejected")
        eos = tokenizer.eos_token
        p = tokenizer(prompt)["input_ids"]
        pc = tokenizer(prompt + chosen + ("" if chosen.endswith(eos) else eos))["input_ids"]
        pr = tokenizer(prompt + rejected + ("" if rejected.endswith(eos) else eos))["input_ids"]
    elif _is_messages(prompt) and _is_messages(chosen) and _is_messages(rejected):
        if any(not m["content"].strip() for m in prompt + chosen + rejected):
            raise ValueError("empty field")
        if chosen == rejected:
            raise ValueError("chosen == rejected")
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}] + prompt
        p = _template(tokenizer, prompt, generation_prompt=True)
        pc = _template(tokenizer, prompt + chosen, generation_prompt=False)
        pr = _template(tokenizer, prompt + rejected, generation_prompt=False)
    else:
        raise ValueError("wrong type (prompt/chosen/rejected must all be strings or all message lists)")
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    return p[:n], pc[n:], pr[n:], n == len(p)


def tokenize_rows(rows: list[dict], tokenizer, cfg: DataConfig, source: str) -> tuple[list[Pair], DataReport]:
    """Tokenise, truncate (prompt from the left, completions from the right), drop what cannot train; report it."""
    report = DataReport(source=source, rows=len(rows))
    pairs: list[Pair] = []
    for i, row in enumerate(rows):
        try:
            p, c, r, boundary_ok = tokenize_row(row, tokenizer, cfg.system_prompt)
        except ValueError as e:
            report.drop(str(e), i)
            continue
        if not c or not r:
            report.drop("empty completion after tokenisation", i)
            continue
        report.boundary_mismatch += not boundary_ok
        if len(p) > cfg.max_prompt_length:
            p = p[-cfg.max_prompt_length:]
            report.prompt_truncated += 1
        room = cfg.max_length - len(p)
        if len(c) > room or len(r) > room:
            c, r = c[:room], r[:room]
            report.completion_truncated += 1
        if c == r:
            report.drop("chosen == rejected after truncation", i)
            continue
        pairs.append(Pair(p, c, r, i))
    report.kept = len(pairs)
    return pairs, report


def load(cfg: DataConfig, tokenizer, split: str = "train", rows: list[dict] | None = None,
         ) -> tuple[list[Pair], DataReport]:
    """Read (unless `rows` are given) and tokenise `data.train` or `data.eval`. Every row dropped → an error."""
    path = cfg.train if split == "train" else cfg.eval
    key = f"data.{split}"
    pairs, report = tokenize_rows(read_rows(path, key) if rows is None else rows, tokenizer, cfg, source=path)
    if not pairs:
        reasons = ", ".join(f"{n} × {r}" for r, n in report.dropped.items())
        raise LoraDpoError(f"{key}: every row of '{path}' was dropped ({reasons}); fix the data")
    return pairs, report
