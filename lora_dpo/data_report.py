"""The data report: what was read, kept, cut and dropped (and why), token lengths, and template problems.

It is printed before training and saved in the run directory as data_report.txt (the same text) and
data_report.json (machine-readable; `lengths` holds per-pair token counts of the kept training pairs, for plots).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_dpo.errors import LoraDpoError

EXAMPLES = 5
# template problems: the pair is kept (and trained as tokenised), but the tokens are probably not what was meant
NOT_PREFIX = "tokenised prompt is not a prefix of prompt+completion"
DOUBLE_BOS = "doubled BOS at the start"
DOUBLE_EOS = "doubled EOS in a completion"
PROBLEM_HINTS = {
    NOT_PREFIX: "tokens merge across the boundary or the template renders the prompt differently; the completion "
                "starts where they first differ",
    DOUBLE_BOS: "the text or template already holds the BOS token and the tokenizer adds another",
    DOUBLE_EOS: "the completion text already ends with EOS and the template adds another",
}


@dataclass
class DataReport:
    source: str
    split: str = "train"
    rows: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list] = field(default_factory=dict)
    problems: Counter = field(default_factory=Counter)
    problem_examples: dict[str, list] = field(default_factory=dict)
    lengths: dict[str, list[int]] = field(default_factory=lambda: {"prompt": [], "chosen": [], "rejected": []})
    sources: list[dict] = field(default_factory=list)  # label, format, rows read, rows taken, unused columns
    notes: list[str] = field(default_factory=list)

    @property
    def boundary_mismatch(self) -> int:
        return self.problems[NOT_PREFIX]

    def drop(self, reason: str, where: Any) -> None:
        self.dropped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < EXAMPLES:
            ex.append(where)

    def problem(self, kind: str, where: Any) -> None:
        self.problems[kind] += 1
        ex = self.problem_examples.setdefault(kind, [])
        if len(ex) < EXAMPLES:
            ex.append(where)

    def keep(self, prompt: int, chosen: int, rejected: int) -> None:
        self.kept += 1
        for k, n in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            self.lengths[k].append(n)

    def source_problems(self) -> list[str]:
        """Sources detected as implicit (no prompt column) that also have columns nothing reads: the prompt is
        probably one of them, and training would go on with only the start chosen and rejected share."""
        return [f"{s['label']}: no prompt column (format implicit detected) and columns not used: "
                f"{_names(s['unused'])} — map the prompt column with columns: {{prompt: NAME}}, or set format: implicit"
                for s in self.sources if s.get("detected") and s["format"] == "implicit" and s.get("unused")]

    def problem_count(self) -> int:
        return sum(self.dropped.values()) + sum(self.problems.values()) + len(self.source_problems())

    def problem_summary(self, limit: int = 3) -> str:
        parts = self.source_problems()
        items = [(n, r, self.examples[r]) for r, n in self.dropped.most_common()]
        items += [(n, k, self.problem_examples[k]) for k, n in self.problems.most_common()]
        parts += [f"{n} × {r} ({_rows(ex, n)})" for n, r, ex in items]
        return "; ".join(parts[:limit]) + ("; …" if len(parts) > limit else "")

    def lines(self) -> list[str]:
        out = [f"data.{self.split}: {self.source}: {_n(self.rows, 'row')} read, {_n(self.kept, 'pair')} kept, "
               f"{sum(self.dropped.values())} dropped; prompts cut from the left: {self.prompt_truncated}, "
               f"completions cut from the right: {self.completion_truncated}"]
        if len(self.sources) > 1 or any(s["taken"] != s["read"] for s in self.sources):
            for s in self.sources:
                out.append(f"  source {s['label']} ({_fmt(s)}): {_n(s['read'], 'row')} read, {s['taken']} taken")
        elif self.sources:
            out[0] += f"; format {_fmt(self.sources[0])}"
        for s in self.sources:
            if s.get("unused"):
                out.append(f"  {'source ' + s['label'] + ': ' if len(self.sources) > 1 else ''}{_unused(s)}")
        for reason, n in sorted(self.dropped.items()):
            out.append(f"  dropped {n} × {reason} ({_rows(self.examples[reason], n)})")
        for kind, n in sorted(self.problems.items()):
            out.append(f"  template problem: {n} × {kind} ({_rows(self.problem_examples[kind], n)}): "
                       f"{PROBLEM_HINTS[kind]}")
        out.extend(f"  note: {note}" for note in self.notes)
        if self.kept:
            out.append(f"  tokens per pair    {'min':>6} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}")
            for k in ("prompt", "chosen", "rejected"):
                out.append(f"    {k:<16} " + " ".join(f"{v:>6}" for v in percentiles(self.lengths[k])))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "source": self.source, "sources": self.sources, "rows": self.rows,
                "kept": self.kept, "prompt_truncated": self.prompt_truncated,
                "completion_truncated": self.completion_truncated, "dropped": dict(self.dropped),
                "examples": self.examples, "template_problems": dict(self.problems),
                "template_problem_examples": self.problem_examples, "notes": self.notes,
                "percentiles": {k: dict(zip(("min", "p50", "p90", "p99", "max"), percentiles(v)))
                                for k, v in self.lengths.items() if v}}


def _fmt(source: dict) -> str:
    return source["format"] + (", detected" if source.get("detected") else "")


def _names(unused: dict[str, int]) -> str:
    return ", ".join(repr(c) if c != c.strip() or not c.isprintable() else c for c in unused)


def _unused(source: dict) -> str:
    """Which columns of a source nothing reads, and the `columns` mapping that would read one."""
    unused = source["unused"]
    cols = ", ".join(f"{_names({c: n})} ({n} rows)" for c, n in unused.items())
    system = next((c for c in unused if "system" in c.lower()), None)
    other = next((c for c in unused if c != system), None)
    hints = []
    if source["format"] == "implicit" and other is not None:
        hints.append(f"format implicit{' (detected: no prompt column)' if source.get('detected') else ''} takes "
                     "the prompt from the start chosen and rejected share; if a column holds the prompt, map it in "
                     f"a data source mapping with columns: {{prompt: {other}}}"
                     + (", else set format: implicit" if source.get("detected") else ""))
    if system is not None:
        hints.append(f"if {system} holds the system message, map it in a data source mapping with columns: "
                     f"{{system: {system}}}")
    if not hints:
        hints.append("nothing reads them; to use one, map it in a data source mapping with columns: "
                     "{prompt|chosen|rejected|system: NAME}")
    return f"columns not used: {cols} — " + "; ".join(hints)


def _rows(examples: list, n: int) -> str:
    word = "row" if n == 1 else "rows"
    return f"{word} {', '.join(map(str, examples))}{', …' if n > len(examples) else ''}"


def percentiles(values: list[int]) -> list[int]:
    """min, p50, p90, p99, max by the nearest-rank rule (each one a length that occurs)."""
    s = sorted(values)
    return [s[0]] + [s[max(0, -(-len(s) * q // 100) - 1)] for q in (50, 90, 99)] + [s[-1]]


def check(reports: list[DataReport], on_problem: str) -> None:
    """data.on_problem=error: stop (after the report was printed) if any split has a problem."""
    if on_problem != "error":
        return
    for rep in reports:
        if rep.problem_count():
            raise LoraDpoError(f"data.{rep.split}: {rep.problem_count()} data problems in '{rep.source}' "
                               f"({rep.problem_summary()}); fix the data (see the data report above), or set "
                               "data.on_problem=warn to train anyway")


def as_json(reports: list[DataReport]) -> dict:
    by_split = {r.split: r.to_dict() for r in reports}
    train = next(r for r in reports if r.split == "train")
    return {"train": by_split["train"], "eval": by_split.get("eval"), "lengths": train.lengths}


def as_text(reports: list[DataReport]) -> str:
    return "".join(line + "\n" for rep in reports for line in rep.lines())


def save(out_dir: Path, reports: list[DataReport]) -> None:
    (out_dir / "data_report.json").write_text(json.dumps(as_json(reports), indent=1, ensure_ascii=False))
    (out_dir / "data_report.txt").write_text(as_text(reports), encoding="utf-8")


def _n(count: int, noun: str) -> str:
    """'1 pair', '2 pairs'."""
    return f"{count} {noun}{'s' * (count != 1)}"
