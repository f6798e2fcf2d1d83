"""Every common preference format → one canonical row: {"prompt", "chosen", "rejected"[, "system"]}.

    standard        prompt, chosen, rejected are strings
    conversational  prompt, chosen, rejected are message lists ([{"role": ..., "content": ...}, ...])
    implicit        no prompt: chosen and rejected are full texts or full conversations that share a prefix; the
                    shared part is the prompt (texts are cut at the last whitespace of the shared prefix, so
                    "The answer is four" / "The answer is five" give the prompt "The answer is", not "… f")
    hh              Anthropic HH raw text: "\\n\\nHuman: … \\n\\nAssistant: …" in chosen and rejected; parsed into
                    conversations, then treated as implicit
    auto            hh or implicit when there is no prompt column, else standard/conversational by value type

A `columns` mapping renames the source's columns (e.g. {prompt: question}); a `system` column, when present,
gives a per-row system message (a string; null or blank = none). A row that cannot be used is not thrown away
here: it carries `"__drop__"` with the reason, and the tokeniser counts it in the data report. Columns the format
does not read are counted (`unused_columns`) and named in the data report.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from lora_dpo.errors import LoraDpoError

ROLES = ("prompt", "chosen", "rejected")
DROP = "__drop__"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def is_messages(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x)


def looks_hh(text: Any) -> bool:
    return isinstance(text, str) and (text.startswith("Human:") or text.lstrip(" ").startswith("\n\nHuman:"))


def detect(row: dict) -> str:
    """The format of a (renamed) row: standard | conversational | implicit | hh."""
    if "prompt" in row:
        return "conversational" if isinstance(row["prompt"], list) else "standard"
    return "hh" if looks_hh(row.get("chosen")) else "implicit"


def normalise(rows: list[dict], fmt: str, columns: dict | None, key: str, name: str) -> tuple[list[dict], str]:
    """Rename, detect (fmt 'auto': from the first row) and canonicalise every row → (rows, format used)."""
    columns = columns or {}
    rename = {columns.get(role, role): role for role in (*ROLES, "system")}
    shadowed = {role for role, col in columns.items() if col != role}  # a 'prompt' column when prompt: question
    renamed = [{rename.get(k, k): v for k, v in row.items() if k in rename or k not in shadowed} for row in rows]
    used = detect(renamed[0]) if fmt == "auto" else fmt
    needed = ROLES if used in ("standard", "conversational") or "prompt" in columns else ROLES[1:]
    for i, row in enumerate(renamed):
        for role in needed:
            if role not in row:
                col = columns.get(role, role)
                have = ", ".join(map(repr, rows[i])) or "none"
                fix = (f"map yours with columns: {{{role}: YOUR_COLUMN}} in a data source mapping"
                       if role == "prompt" else f"map yours with columns: {{{role}: YOUR_COLUMN}}")
                if role == "prompt" and fmt != "auto":
                    fix += ", or use format: implicit"
                raise LoraDpoError(f"{key}: '{name}' row {i} has no '{col}' column for {role} (it has {have}); "
                                   f"{fix}")
    return [canonical(row, used) for row in renamed], used


def unused_columns(rows: list[dict], fmt: str, columns: dict | None) -> dict[str, int]:
    """Columns of the source (as named there) that format `fmt` does not read → how many rows have each.

    Nothing reads them, so they are named in the data report: a prompt column under another name ('question',
    or 'prompt' behind a byte order mark) would otherwise vanish, and implicit detection would train without
    it."""
    columns = columns or {}
    roles = ("chosen", "rejected", "system") if fmt in ("implicit", "hh") else (*ROLES, "system")
    read = {columns.get(role, role) for role in roles}
    counts: Counter = Counter(k for row in rows for k in row if k not in read)
    return dict(counts)


def canonical(row: dict, fmt: str) -> dict:
    out = _canonical(row, fmt)
    system = row.get("system")
    if system is not None and not isinstance(system, str) and DROP not in out:
        # a number or a list would otherwise be left out of the prompt without a word
        out[DROP] = "wrong type (system must be a string or null)"
    return out


def _canonical(row: dict, fmt: str) -> dict:
    out = {"system": row["system"]} if isinstance(row.get("system"), str) and row["system"].strip() else {}
    if fmt in ("standard", "conversational"):
        out.update({r: row[r] for r in ROLES})
        want = str if fmt == "standard" else list
        if not all(isinstance(row[r], want) for r in ROLES):
            out[DROP] = (f"wrong type (format {fmt} needs prompt/chosen/rejected as "
                         f"{'strings' if fmt == 'standard' else 'message lists'})")
        return out
    chosen, rejected = row["chosen"], row["rejected"]
    if fmt == "hh":
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            return {**out, **_placeholder(row), DROP: "wrong type (format hh needs chosen/rejected strings)"}
        chosen, rejected = parse_hh(chosen), parse_hh(rejected)
        if chosen is None or rejected is None:
            return {**out, **_placeholder(row), DROP: "not HH text ('\\n\\nHuman: … \\n\\nAssistant: …' turns)"}
    prompt, c, r, reason = split_implicit(chosen, rejected)
    out.update({"prompt": prompt, "chosen": c, "rejected": r})
    if reason:
        out[DROP] = reason
    return out


def _placeholder(row: dict) -> dict:
    return {"prompt": row.get("prompt", ""), "chosen": row["chosen"], "rejected": row["rejected"]}


def parse_hh(text: str) -> list[dict] | None:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' → [{user: hi}, {assistant: hello}]; None if it is not HH text."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2])]


def split_implicit(chosen: Any, rejected: Any) -> tuple[Any, Any, Any, str | None]:
    """Shared prefix → prompt. → (prompt, chosen, rejected, drop reason or None)."""
    if chosen == rejected:
        return "", chosen, rejected, "chosen == rejected"
    if is_messages(chosen) and is_messages(rejected):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            return "", chosen, rejected, "implicit prompt: chosen and rejected share no first message"
        if n == len(chosen) or n == len(rejected):
            return chosen[:n], chosen[n:], rejected[n:], "empty field"
        return chosen[:n], chosen[n:], rejected[n:], None
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        cut = max(chosen.rfind(" ", 0, n), chosen.rfind("\n", 0, n))
        if 0 < cut < n:  # keep whole words on both sides; the whitespace starts the completion
            n = cut
        if not chosen[:n].strip():
            return "", chosen, rejected, ("implicit prompt: chosen and rejected share no prefix (no prompt column? "
                                          "map it with columns: {prompt: NAME})")
        return chosen[:n], chosen[n:], rejected[n:], None
    return "", chosen, rejected, "wrong type (implicit format needs chosen/rejected as two strings or two " \
                                 "message lists)"
