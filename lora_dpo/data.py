"""Rows → (prompt, chosen, rejected) → token ids, with a report of everything that was cut, dropped or suspicious.

    read_data(cfg)                  sources read (data_sources), normalised (data_formats), mixed, eval split held out
    load(cfg, tokenizer, split, rows)   tokenise one split → (pairs, DataReport); every row dropped → an error
    prepare(cfg, tokenizer, ...)    both splits, the report printed, data.on_problem applied

Tokenisation follows the convention TRL's DPOTrainer uses, so that log-probs are comparable: the prompt and
prompt+completion are tokenised whole (standard text gets EOS appended; conversations go through the chat
template), and the completion starts where the two token sequences first differ. That keeps tokens that merge
across the prompt/completion boundary intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_dpo import data_formats, data_report, data_sources
from lora_dpo.data_formats import DROP
from lora_dpo.data_report import DOUBLE_BOS, DOUBLE_EOS, NOT_PREFIX, DataReport
from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import DataConfig

COLUMNS = data_formats.ROLES


@dataclass
class Pair:
    """One tokenised preference pair. `index` is the row's position in the split's row list."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int


class Rows(list):
    """Canonical rows of one split; `origins[i]` names where row i came from ("row 3" or "b.jsonl:3")."""

    def __init__(self, rows=(), origins=None, sources=None, label: str = ""):
        super().__init__(rows)
        self.origins = list(origins) if origins is not None else list(range(len(self)))
        self.sources = sources or []
        self.label = label


# ---------------------------------------------------------------- reading

def check_local_sources(cfg: DataConfig) -> list[str]:
    """What `lora-dpo validate` can check without the hub or a model: every local source reads and normalises (the
    errors training would give), and data.chat_template's file exists. → the hub datasets left unchecked."""
    hub = []
    for split, spec in (("train", cfg.train), ("eval", cfg.eval)):
        for skey, s in data_sources.source_specs(spec, f"data.{split}") if spec else []:
            if data_sources.source_kind(s["path"]) == "hub":
                hub.append(s["path"])
                continue
            data_formats.normalise(data_sources.read_source(s, skey), s["format"] or cfg.format, s["columns"], skey,
                                   data_sources.label(s))
    chat_template(cfg)
    return hub


def read_rows(spec: str | list | None, key: str, cfg: DataConfig | None = None) -> Rows:
    """Read, normalise and mix the sources of one recipe value (a path/id string or a list of source mappings)."""
    cfg = cfg or DataConfig(train="-")
    specs = data_sources.source_specs(spec, key)
    parts = []
    for skey, s in specs:
        raw = data_sources.read_source(s, skey)
        fmt = s["format"] or cfg.format
        rows, used = data_formats.normalise(raw, fmt, s["columns"], skey, data_sources.label(s))
        parts.append((s, rows, used, data_formats.unused_columns(raw, used, s["columns"])))
    chosen = data_sources.take([len(p[1]) for p in parts], specs, cfg.split_seed)
    many = len(parts) > 1
    out = Rows(label=" + ".join(data_sources.label(p[0]) for p in parts))
    for (s, rows, used, unused), idx in zip(parts, chosen):
        out.extend(rows[i] for i in idx)
        out.origins.extend(f"{data_sources.label(s)}:{i}" if many else i for i in idx)
        detected = (s["format"] or cfg.format) == "auto"
        out.sources.append({"label": data_sources.label(s), "format": used, "detected": detected,
                            "read": len(rows), "taken": len(idx), "unused": unused})
    return out


def read_data(cfg: DataConfig) -> tuple[Rows, Rows | None]:
    """Training rows and eval rows (data.eval, or data.eval_split held out of the training sources, or None)."""
    chat_template(cfg)  # a missing template file fails here, before any model or tokenizer is loaded
    train = read_rows(cfg.train, "data.train", cfg)
    if cfg.eval is not None:
        return train, read_rows(cfg.eval, "data.eval", cfg)
    if cfg.eval_split is None:
        return train, None
    held = data_sources.split_off(len(train), cfg.eval_split, cfg.split_seed)
    parts = []
    for keep in (False, True):
        idx = [i for i in range(len(train)) if (i in held) == keep]
        # both labels name the held-out rows (the training part is "minus" them), never the part's own size
        part = Rows([train[i] for i in idx], [train.origins[i] for i in idx], train.sources,
                    f"{train.label} ({'held-out' if keep else 'minus held-out'} {len(held)} rows, "
                    f"split_seed {cfg.split_seed})")
        parts.append(part)
    return parts[0], parts[1]


def chat_template(cfg: DataConfig) -> str | None:
    """data.chat_template: a template string (it holds '{{' or '{%') or the path of a Jinja file."""
    t = cfg.chat_template
    if t is None or "{{" in t or "{%" in t:
        return t
    p = Path(t).expanduser()
    if not p.is_file():
        raise LoraDpoError(f"data.chat_template: file '{t}' not found; give a Jinja file, or the template itself "
                           "(text with {% … %} / {{ … }})")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LoraDpoError(f"data.chat_template: '{t}' is not UTF-8 text; save it as UTF-8") from None


# ---------------------------------------------------------------- tokenising

class TemplateFailure(Exception):
    """The chat template could not render a row (a broken template, or none at all)."""


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _template(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    if not tokenizer.chat_template:
        raise TemplateFailure("the tokenizer has no chat template")
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                            return_dict=True)
    except Exception as e:  # noqa: BLE001 - jinja syntax/runtime errors of a user template
        raise TemplateFailure(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return list(out["input_ids"])


def tokenize_row(row: dict, tokenizer, system_prompt: str | None = None, as_chat: bool = False,
                 ) -> tuple[list[int], list[int], list[int], bool]:
    """→ (prompt_ids, chosen_ids, rejected_ids, boundary_ok). Raises ValueError(reason) for an unusable row.
    `as_chat` renders string rows as a one-turn conversation (data.apply_chat_template)."""
    if row.get(DROP):
        raise ValueError(row[DROP])
    if row.get("system") is not None and not isinstance(row["system"], str):  # rows given directly (Python API)
        raise ValueError("wrong type (system must be a string or null)")
    prompt, chosen, rejected = (row[c] for c in COLUMNS)
    if as_chat and all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        prompt = [{"role": "user", "content": prompt.strip()}]
        chosen, rejected = ([{"role": "assistant", "content": x.strip()}] for x in (chosen, rejected))
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        if not prompt.strip() or not chosen.strip() or not rejected.strip():
            raise ValueError("empty field")
        if chosen == rejected:
            raise ValueError("chosen == rejected")
        eos = tokenizer.eos_token
        p = tokenizer(prompt)["input_ids"]
        pc = tokenizer(prompt + chosen + ("" if chosen.endswith(eos) else eos))["input_ids"]
        pr = tokenizer(prompt + rejected + ("" if rejected.endswith(eos) else eos))["input_ids"]
    elif data_formats.is_messages(prompt) and data_formats.is_messages(chosen) and data_formats.is_messages(rejected):
        if any(not m["content"].strip() for m in prompt + chosen + rejected):
            raise ValueError("empty field")
        if chosen == rejected:
            raise ValueError("chosen == rejected")
        system = row.get("system") or system_prompt
        if system and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system}] + prompt
        p = _template(tokenizer, prompt, generation_prompt=True)
        pc = _template(tokenizer, prompt + chosen, generation_prompt=False)
        pr = _template(tokenizer, prompt + rejected, generation_prompt=False)
    else:
        raise ValueError("wrong type (prompt/chosen/rejected must all be strings or all message lists)")
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    return p[:n], pc[n:], pr[n:], n == len(p)


def _doubled(ids: list[int], token: int | None) -> bool:
    return token is not None and any(a == b == token for a, b in zip(ids, ids[1:]))


def tokenize_rows(rows: list[dict], tokenizer, cfg: DataConfig, source: Any, split: str = "train",
                  ) -> tuple[list[Pair], DataReport]:
    """Tokenise, truncate (prompt from the left, completions from the right), drop what cannot train, note template
    problems; report all of it."""
    origins = getattr(rows, "origins", range(len(rows)))
    report = DataReport(source=source if isinstance(source, str) else json.dumps(source), split=split,
                        rows=len(rows), sources=list(getattr(rows, "sources", [])))
    pairs: list[Pair] = []
    seen: set[str] = set()
    seen_tokens: set[tuple] = set()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text_rows = two_systems = 0
    for i, (row, where) in enumerate(zip(rows, origins)):
        try:
            p, c, r, boundary_ok = tokenize_row(row, tokenizer, cfg.system_prompt, cfg.apply_chat_template)
        except ValueError as e:
            report.drop(str(e), where)
            continue
        except TemplateFailure as e:
            fix = ("set data.chat_template (a Jinja file or the template)" if not tokenizer.chat_template
                   else "fix data.chat_template" if cfg.chat_template else "set data.chat_template to a working one")
            raise LoraDpoError(f"data.{split}: the chat template cannot render row {where} ({e}); {fix}") from None
        key = json.dumps([row[k] for k in COLUMNS] + [row.get("system")], sort_keys=True, ensure_ascii=False)
        if key in seen and cfg.drop_duplicates:
            report.drop("duplicate", where)
            continue
        seen.add(key)
        # a system message (the row's or data.system_prompt) has no place in plain text: counted, not hidden
        text_rows += (isinstance(row["prompt"], str) and not cfg.apply_chat_template
                      and bool(row.get("system") or cfg.system_prompt))
        two_systems += _system_overridden(row)
        if not p:
            report.drop("empty prompt after tokenisation (the first completion token could not be scored)", where)
            continue
        if not c or not r:
            report.drop("empty completion after tokenisation", where)
            continue
        if not boundary_ok:
            report.problem(NOT_PREFIX, where)
        if _doubled((p + c)[:2], bos) or (bos is not None and bos != eos and _doubled(p, bos)):
            report.problem(DOUBLE_BOS, where)
        if _doubled(c, eos) or _doubled(r, eos):
            report.problem(DOUBLE_EOS, where)
        if cfg.max_prompt_length is None and len(p) >= cfg.max_length:
            report.drop("prompt alone beyond max_length", where)
            continue
        if cfg.max_prompt_length is not None and len(p) > cfg.max_prompt_length:
            # the end is kept; a leading BOS stays too: a model never sees text without it at inference
            keep_bos = bos is not None and p[0] == bos and cfg.max_prompt_length > 1
            p = [bos] + p[-(cfg.max_prompt_length - 1):] if keep_bos else p[-cfg.max_prompt_length:]
            report.prompt_truncated += 1
        room = cfg.max_length - len(p)
        if len(c) > room or len(r) > room:
            c, r = c[:room], r[:room]
            report.completion_truncated += 1
        if c == r:
            report.drop("chosen == rejected after truncation", where)
            continue
        tokens = (tuple(p), tuple(c), tuple(r))  # rows that differed only in what truncation cut are one pair now
        if tokens in seen_tokens and cfg.drop_duplicates:
            report.drop("duplicate after truncation", where)
            continue
        seen_tokens.add(tokens)
        pairs.append(Pair(p, c, r, i))
        report.keep(len(p), len(c), len(r))
    if text_rows:
        report.notes.append(f"{text_rows} text rows have a system message (system column or data.system_prompt) "
                            "that plain text cannot carry; set data.apply_chat_template: true to render them as "
                            "conversations")
    if two_systems:
        report.notes.append(f"{two_systems} conversational rows have a system column and a different system "
                            "message in the prompt; the prompt's was used, the column's was not")
    return pairs, report


def _system_overridden(row: dict) -> bool:
    """A row's system column that loses to the system message its conversation already opens with."""
    first = row["prompt"][0] if data_formats.is_messages(row["prompt"]) else {}
    return bool(row.get("system")) and first.get("role") == "system" and first["content"] != row["system"]


def apply_chat_template(cfg: DataConfig, tokenizer) -> None:
    """data.chat_template replaces the tokenizer's template (and is saved with the adapter's tokenizer)."""
    template = chat_template(cfg)
    if template is not None:
        tokenizer.chat_template = template
        check_template_syntax(tokenizer)


def check_template_syntax(tokenizer) -> None:
    """A data.chat_template that does not parse fails here, whatever the rows are: plain-text rows never render it,
    but it is saved with the adapter's tokenizer and used by whoever chats with the model."""
    import jinja2

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    except jinja2.TemplateSyntaxError as e:
        raise LoraDpoError(f"data.chat_template: the template does not parse (line {e.lineno}: {e.message}); "
                           "fix its Jinja syntax") from None
    except Exception:  # noqa: BLE001 - it parses; a row it cannot render is reported with that row
        pass


def load(cfg: DataConfig, tokenizer, split: str = "train", rows: list[dict] | None = None,
         ) -> tuple[list[Pair], DataReport]:
    """Read (unless `rows` are given) and tokenise `data.train` or `data.eval`. Every row dropped → an error."""
    apply_chat_template(cfg, tokenizer)
    if rows is None:
        rows = read_rows(cfg.train if split == "train" else cfg.eval, f"data.{split}", cfg)
    source = getattr(rows, "label", "") or (cfg.train if split == "train" else cfg.eval)
    pairs, report = tokenize_rows(rows, tokenizer, cfg, source=source, split=split)
    if not pairs:
        reasons = ", ".join(f"{n} × {r} ({data_report._rows(report.examples[r], n)})"
                            for r, n in report.dropped.items())
        raise LoraDpoError(f"data.{split}: every row of '{report.source}' was dropped ({reasons}); fix the data")
    return pairs, report


@dataclass
class Prepared:
    train_pairs: list[Pair]
    eval_pairs: list[Pair] | None
    reports: list[DataReport]

    def text(self) -> str:
        return data_report.as_text(self.reports)

    def save(self, out_dir: Path) -> None:
        data_report.save(out_dir, self.reports)


def prepare(cfg: DataConfig, tokenizer, train_rows: Rows, eval_rows: Rows | None, say=print,
            check: bool = True) -> Prepared:
    """Tokenise both splits, print the data report, and stop if data.on_problem=error and a problem was found."""
    train_pairs, train_report = load(cfg, tokenizer, "train", train_rows)
    reports, eval_pairs = [train_report], None
    if eval_rows:
        eval_pairs, eval_report = load(cfg, tokenizer, "eval", eval_rows)
        train_keys = {_pair_key(p) for p in train_pairs}
        leaked = sum(_pair_key(p) in train_keys for p in eval_pairs)
        if leaked:
            eval_report.notes.append(f"{leaked} eval pairs are also training pairs (identical token ids)")
        reports.append(eval_report)
    for line in data_report.as_text(reports).splitlines():
        say(line)
    if check:
        data_report.check(reports, cfg.on_problem)
    return Prepared(train_pairs, eval_pairs, reports)


def _pair_key(p: Pair) -> tuple:
    return tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids)


def source_label(cfg: DataConfig, split: str) -> str:
    value = cfg.train if split == "train" else cfg.eval
    if value is None and split == "eval" and cfg.eval_split is not None:
        return f"data.eval_split={cfg.eval_split} of data.train"
    return value if isinstance(value, str) or value is None else " + ".join(
        data_sources.label({**s}) for s in value)
