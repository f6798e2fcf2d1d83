"""PNG plots of a run for report.html: training curves from metrics.jsonl, token-length histograms from the data
report. matplotlib is optional: without it `available()` is False and the report says so instead of plotting.

Figures are built with matplotlib's object API (`Figure`, no pyplot): no global figure state, no GUI backend,
nothing changes in the caller's matplotlib configuration.
"""

from __future__ import annotations

import base64
import importlib.util
import io

# (title, y label, [(metric key, legend label)]); each metric is drawn for train rows and, where logged, eval rows
CURVES = (
    ("Loss", "loss", [("loss", "loss")]),
    ("Reward margins", "β·log-ratio", [("rewards/margins", "margin (chosen − rejected)"),
                                      ("rewards/chosen", "chosen reward"), ("rewards/rejected", "rejected reward")]),
    ("Reward accuracy", "share of pairs", [("rewards/accuracies", "chosen reward > rejected reward")]),
    ("Log-probs of the completions (policy)", "log p, summed over tokens", [("logps/chosen", "chosen"),
                                                                            ("logps/rejected", "rejected")]),
)
LENGTH_PARTS = ("prompt", "chosen", "rejected")


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def curves(rows: list[dict]) -> list[tuple[str, str]]:
    """→ [(title, base64 PNG)] for each curve family with at least one logged point (train or eval)."""
    from matplotlib.figure import Figure

    out = []
    for title, ylabel, metrics in CURVES:
        fig = Figure(figsize=(6.4, 3.6))
        ax = fig.add_subplot()
        drawn = 0
        for i, (key, label) in enumerate(metrics):
            color = f"C{i}"
            steps, values = _series(rows, key)
            if steps:
                ax.plot(steps, values, color=color, label=f"train: {label}", marker="." if len(steps) < 30 else None)
                drawn += 1
            steps, values = _series(rows, f"eval/{key}")
            if steps:
                ax.plot(steps, values, color=color, linestyle="--", marker="o", label=f"eval: {label}")
                drawn += 1
        if not drawn:
            continue
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out.append((title, _png(fig)))
    return out


def length_histograms(lengths: dict) -> tuple[str, str] | None:
    """Token counts per kept training pair (prompt, chosen, rejected) → one figure with three histograms."""
    from matplotlib.figure import Figure

    parts = [p for p in LENGTH_PARTS if lengths.get(p)]
    if not parts:
        return None
    fig = Figure(figsize=(4.2 * len(parts), 3.2), layout="constrained")
    for i, part in enumerate(parts):
        ax = fig.add_subplot(1, len(parts), i + 1)
        values = lengths[part]
        ax.hist(values, bins=min(30, max(1, len(set(values)))), color=f"C{i}")
        ax.set_title(f"{part} ({len(values)} pairs)")
        ax.set_xlabel("tokens")
        if i == 0:
            ax.set_ylabel("pairs")
    fig.suptitle("Token lengths of the kept training pairs")
    return "Token lengths", _png(fig)
