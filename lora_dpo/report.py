"""report.html: one self-contained page per run — curves, data report, held-out numbers, generations.

Inputs are the run directory's files: metrics.jsonl, data_report.json (and data_report.txt), eval.json,
recipe.yaml; a missing one gets a one-line note in its section. Plots are PNGs embedded as base64 data URIs and the
CSS is inline: the page references nothing outside itself and opens offline, from a mail attachment or a zip.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from lora_dpo import plots
from lora_dpo.tracking import read_metrics

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; } th, td { border: 1px solid #ddd; padding: 0.3em 0.6em;
       text-align: left; vertical-align: top; } th { background: #f4f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; max-width: 30em; }
pre { background: #f6f6f8; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #6e6e73; font-style: italic; } .sub { color: #6e6e73; }
figure { display: inline-block; margin: 0.4em; width: calc(50% - 1em); vertical-align: top; }
figure.wide { width: calc(100% - 1em); } figure img { width: 100%; border: 1px solid #eee; }
@media (max-width: 50em) { figure { width: calc(100% - 1em); } }
"""

# eval.json metric keys shown in the before/after table, with their labels
EVAL_ROWS = (
    ("eval/rewards/accuracies", "reward accuracy (a tie counts ½)"),
    ("eval/rewards/margins", "reward margin"),
    ("eval/rewards/chosen", "chosen reward"),
    ("eval/rewards/rejected", "rejected reward"),
    ("eval/loss", "loss"),
    ("behaviour_rate", "behaviour rate"),
)


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _pct(v) -> str:
    return "—" if v is None else f"{v:.0%}"


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def find_lengths(report) -> dict | None:
    """The first `lengths` mapping (prompt/chosen/rejected token counts) in a data report, training first."""
    if isinstance(report, dict):
        if isinstance(report.get("lengths"), dict):
            return report["lengths"]
        items = sorted(report.items(), key=lambda kv: kv[0] != "train")
        report = [v for _, v in items]
    if isinstance(report, list):
        for item in report:
            found = find_lengths(item)
            if found:
                return found
    return None


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in prompt)
    return str(prompt)


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    classes = classes or [""] * len(header)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{cell}</td>' if c else f"<td>{cell}</td>"
                                    for c, cell in zip(classes, row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary(run_dir: Path, recipe: dict | None, rows: list[dict]) -> str:
    parts = []
    if recipe:
        m, d, lo = recipe.get("model", {}), recipe.get("dpo", {}), recipe.get("lora", {})
        parts.append(f"<p>model <b>{_e(m.get('name_or_path'))}</b> · loss {_e(d.get('loss_type'))} · "
                     f"β = {_e(d.get('beta'))} · LoRA r = {_e(lo.get('r'))}</p>")
    train_rows = [r for r in rows if "loss" in r]
    if train_rows:
        last = train_rows[-1]
        keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                            "learning_rate", "tokens_per_second", "peak_memory_mb", "host_wait_share") if k in last]
        parts.append(f"<p>last logged training step: <b>{_e(last.get('step'))}</b></p>")
        parts.append(_table(["metric", "value"], [[_e(k), _fmt(last[k])] for k in keys], ["", "num"]))
    if not (run_dir / "adapter").is_dir():
        parts.append(_note("No final adapter: the run was interrupted or has not finished; the numbers above are "
                           "those logged so far."))
    return "".join(parts)


def _plots_section(rows: list[dict], data_report) -> str:
    if not plots.available():
        return _note("Plots not drawn: matplotlib is not installed (pip install matplotlib).")
    lengths = find_lengths(data_report)
    try:  # a plotting failure must not cost the rest of the report (or the end of a finished training run)
        figures = plots.curves(rows) if rows else []
        hist = plots.length_histograms(lengths) if lengths else None
    except Exception as e:  # noqa: BLE001
        return _note(f"Plots not drawn: matplotlib failed ({type(e).__name__}: {e}).")
    out = "".join(f'<figure><img alt="{_e(t)}" src="data:image/png;base64,{png}"></figure>' for t, png in figures)
    if not figures:
        out += _note("No metrics logged yet (metrics.jsonl is missing or empty).")
    if hist:
        out += f'<figure class="wide"><img alt="{_e(hist[0])}" src="data:image/png;base64,{hist[1]}"></figure>'
    else:
        out += _note("No token-length distribution: the data report has no per-pair lengths.")
    return out


def _data_section(run_dir: Path, data_report) -> str:
    text = run_dir / "data_report.txt"
    if text.is_file():
        return f"<pre>{_e(text.read_text(encoding='utf-8', errors='replace'))}</pre>"
    if data_report is None:
        return _note("No data report (data_report.json is missing).")
    items = data_report if isinstance(data_report, list) else [data_report]
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        cells = []
        for k, v in item.items():
            if k == "lengths" and isinstance(v, dict):
                v = {p: f"{len(x)} pairs, mean {sum(x) / max(len(x), 1):.1f}, max {max(x, default=0)}"
                     for p, x in v.items() if isinstance(x, list)}
            value = _fmt(v) if not isinstance(v, (dict, list)) else json.dumps(v, ensure_ascii=False)
            cells.append([_e(k), _e(value)])
        out.append(_table(["field", "value"], cells))
    return "".join(out) or _note("No data report (data_report.json holds nothing readable).")


def _eval_section(ev: dict | None) -> str:
    if not ev:
        return _note("No held-out evaluation (eval.json is missing): the run has no data.eval; run "
                     "`lora-dpo eval RUN_DIR --data FILE.jsonl`.")
    before, after = ev.get("before", {}), ev.get("after", {})
    out = [f'<p class="sub">held-out data {_e(ev.get("data"))}: {_e(ev.get("pairs"))} pairs. Before = the '
           "reference (adapter off); after = the policy.</p>"]
    rows = [[_e(label), *(_pct(x.get(k)) if k == "behaviour_rate" else _fmt(x.get(k)) for x in (before, after))]
            for k, label in EVAL_ROWS if k in before or k in after]
    logps = ev.get("logps") or {}
    for part in ("chosen", "rejected"):
        ref = logps.get("reference", {}).get(part)
        pol = logps.get("policy", {}).get(part, after.get(f"eval/logps/{part}"))
        if ref is not None or pol is not None:
            rows.append([_e(f"log-prob of the {part} completion (summed over its tokens)"), _fmt(ref), _fmt(pol)])
    out.append(_table(["held-out metric", "before (reference)", "after (policy)"], rows, ["", "num", "num"]))
    kl = ev.get("kl")
    if kl and kl.get("kl") is not None:
        se = f" ± {kl['std_error']:.3g}" if kl.get("std_error") is not None else ""
        out.append(f"<p><b>KL(policy ‖ reference) ≈ {kl['kl']:.4g}{se} nats per answer</b> "
                   f"({_fmt(kl.get('kl_per_token'))} per token; {_e(kl.get('samples'))} sampled answers, "
                   f"seed {_e(kl.get('seed'))})</p><p class=\"sub\">Estimator: {_e(kl.get('estimator'))}</p>")
    else:
        out.append(_note("No KL estimate (evaluation.kl_samples is 0, or the policy equals the reference)."))
    rm = ev.get("reward_model")
    if rm:
        out.append(f"<p><b>Reward model</b> {_e(rm.get('model'))}: policy wins {_e(rm.get('wins'))}, ties "
                   f"{_e(rm.get('ties'))}, loses {_e(rm.get('losses'))} of {_e(rm.get('prompts'))} prompts — win "
                   f"rate {_fmt(rm.get('win_rate'))}, tie rate {_fmt(rm.get('tie_rate'))}; mean score policy "
                   f"{_fmt(rm.get('mean_score_policy'))}, reference {_fmt(rm.get('mean_score_reference'))}.</p>")
    return "".join(out)


def _generations_section(ev: dict | None) -> str:
    gens = (ev or {}).get("generations") or []
    if not gens:
        return _note("No generations (eval.json is missing or holds none).")
    scored = any("score_policy" in g for g in gens)
    header = ["#", "prompt", "reference (adapter off)", "policy (adapter on)"] + (
        ["score ref.", "score policy"] if scored else [])
    rows = []
    for i, g in enumerate(gens, 1):
        row = [str(i), _e(_prompt_text(g.get("prompt", ""))), _e(g.get("reference", "")), _e(g.get("policy", ""))]
        if scored:
            row += [_fmt(g.get("score_reference")), _fmt(g.get("score_policy"))]
        rows.append(row)
    classes = ["num", "text", "text", "text"] + (["num", "num"] if scored else [])
    return '<p class="sub">Greedy answers to the same held-out prompts.</p>' + _table(header, rows, classes)


def build_html(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    data_report = _read_json(run_dir / "data_report.json")
    ev = _read_json(run_dir / "eval.json")
    recipe_text = (run_dir / "recipe.yaml").read_text(encoding="utf-8") if (run_dir / "recipe.yaml").is_file() \
        else None
    recipe = None
    if recipe_text:
        import yaml

        try:
            recipe = yaml.safe_load(recipe_text)
        except yaml.YAMLError:
            recipe = None
    sections = [
        ("Run", _summary(run_dir, recipe if isinstance(recipe, dict) else None, rows)),
        ("Training curves", _plots_section(rows, data_report)),
        ("Held-out evaluation", _eval_section(ev)),
        ("Generations: reference vs policy", _generations_section(ev)),
        ("Data", _data_section(run_dir, data_report)),
        ("Recipe", f"<pre>{_e(recipe_text)}</pre>" if recipe_text else _note("No recipe.yaml.")),
    ]
    body = "".join(f"<h2>{_e(title)}</h2>\n{content}\n" for title, content in sections)
    title = f"lora-dpo report: {run_dir.resolve().name}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>\n'
            f"<body><h1>{_e(title)}</h1><p class=\"sub\">{_e(run_dir)}</p>\n{body}</body></html>\n")


def write_report(run_dir: str | Path) -> Path:
    """Write (or refresh) RUN_DIR/report.html, atomically; → its path."""
    run_dir = Path(run_dir)
    path = run_dir / "report.html"
    tmp = run_dir / ".report.html.tmp"
    tmp.write_text(build_html(run_dir), encoding="utf-8")
    os.replace(tmp, path)
    return path
