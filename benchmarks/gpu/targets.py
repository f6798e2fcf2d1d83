"""The speed-and-memory targets of the issue (the GPU ones, or the CPU ones for results from a CPU), checked against
the GPU kit's results: reads the JSON files `run.sh` wrote (long.json, short.json, long-b16.json, long-sdpa.json,
short-causal.json, long-offload.json, long-compile.json, short-compile.json, losses-short.json, losses-long.json from
vs_trl.py; memory.json, ckpt.json, offload.json from memory.py) and prints one markdown line per target with the
measured value and ✓ / ✗, or "not measured" where a stage did not run. Prints; asserts nothing.

    python3 benchmarks/gpu/targets.py "$OUT"
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vs_trl import mfu  # noqa: E402

GiB = 2**30
# lora-dpo ÷ TRL: pairs/s at least, peak memory at most (CUDA max allocated on a GPU, peak RSS on a CPU)
SPEED = {True: {"long": 2.0, "short": 1.5}, False: {"long": 1.5, "short": 1.2}}  # keyed by "ran on CUDA"
MEMORY_RATIO = {True: 0.6, False: 0.8}
PAIR_2x2048_GIB = 12.0  # peak of a 2×2048-token pair, at most
ESTIMATE_WITHIN = 0.15  # |predicted ÷ measured − 1|, at most
LOSSES_AGREE = 1e-3  # max |Δ loss| over steps 1-3, in fp32 (a CPU run, or the GPU's fp32 stage)


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _line(target: str, value: str, ok: bool | None) -> str:
    return f"| {target} | {value} | {'—' if ok is None else '✓' if ok else '✗'} |"


def losses_line(label: str, meta: dict, r: dict) -> str:
    """Judged where both trainers compute in fp32. In bf16, step 1 (both at ln 2) still agrees, but the first LoRA
    updates are below bf16's resolution of the hidden states, so rounding (which differs with layout and kernel)
    moves the next losses by ~1e-2 even between two layouts of lora-dpo itself (benchmarks/bf16_drift.py): shown, not
    judged — the fp32 stage judges the maths on the GPU."""
    t, o = r["trl"][0]["losses"], r["ours"][0]["losses"]
    dl = max(abs(x - y) for x, y in zip(t[:3], o[:3]))
    if not meta.get("cuda", "NVIDIA" in meta["machine"]) or meta.get("precision") == "fp32":
        return _line(f"{label}: losses agree (steps 1-3) within {LOSSES_AGREE:g}", f"max abs Δ {dl:.1e}",
                     dl <= LOSSES_AGREE)
    return _line(f"{label}: losses (steps 1-3, bf16)", f"step 1 Δ {abs(t[0] - o[0]):.1e}, steps 1-3 max Δ {dl:.1e}",
                 None)


def _step_spread(r: dict) -> str:
    """How uneven the timed steps were on each side (seconds per token, slowest ÷ median over every repeat), with
    a note where one side had a step over 1.5× its median: its pairs/s then says more about that step than the run.
    Empty for results from before vs_trl.py kept per-step times."""
    ratios = []
    for side in ("trl", "ours"):
        per_token = [s / n for x in r[side] for s, n in zip(x.get("step_seconds", []), x.get("step_tokens", []))]
        if not per_token:
            return ""
        ratios.append(max(per_token) / statistics.median(per_token))
    uneven = [name for name, q in zip(("TRL", "lora-dpo"), ratios) if q > 1.5]
    return f"{ratios[0]:.2f} / {ratios[1]:.2f}" + (f" (uneven: {', '.join(uneven)})" if uneven else "")


def vs_trl_lines(name: str, doc: dict | None, label: str, losses_only: bool = False) -> list[str]:
    if not doc or name not in doc.get("results", {}):
        return [_line(f"{label}: lora-dpo vs TRL", "not measured", None)]
    meta, r = doc["meta"], doc["results"][name]
    if not (r.get("ours") and r.get("trl")):  # the stage's time limit stopped it between the two trainers
        return [_line(f"{label}: lora-dpo vs TRL", f"incomplete (only {'lora-dpo' if r.get('ours') else 'TRL'} ran)",
                      None)]
    if losses_only:
        return [losses_line(label, meta, r)]
    cuda = meta.get("cuda", "NVIDIA" in meta["machine"])
    speed_target, memory_target = SPEED[cuda][name], MEMORY_RATIO[cuda]
    med = lambda side, k: statistics.median(x[k] for x in r[side])  # noqa: E731
    speed = med("ours", "pairs_per_s") / med("trl", "pairs_per_s")
    mem = med("ours", "peak_bytes") / med("trl", "peak_bytes")
    work = f" (tokens TRL ÷ lora-dpo: {r['ours'][0]['work_ratio']:.2f})" if "work_ratio" in r["ours"][0] else ""
    out = [_line(f"{label}: pairs/s ≥ {speed_target}× TRL", f"{speed:.2f}×{work}", speed >= speed_target),
           _line(f"{label}: peak {'' if cuda else 'RSS '}≤ {memory_target}× TRL",
                 f"{mem:.2f} ({med('ours', 'peak_bytes') / GiB:.2f} vs {med('trl', 'peak_bytes') / GiB:.2f} GiB)",
                 mem <= memory_target),
           *([_line(f"{label}: step memory (peak − resident between steps) vs TRL", f"{step:.2f} ("
                     f"{med('ours', 'peak_bytes') / GiB - med('ours', 'resident_bytes') / GiB:.2f} vs "
                     f"{med('trl', 'peak_bytes') / GiB - med('trl', 'resident_bytes') / GiB:.2f} GiB)", None)]
             if (step := _step_memory_ratio(r)) is not None else []),
           losses_line(label, meta, r),
           _line(f"{label}: MFU TRL / lora-dpo", " / ".join(
               mfu(meta["n_params"], med(side, "tokens_per_s"), meta["machine"]) if cuda else "n/a (CPU)"
               for side in ("trl", "ours")), None)]
    spread = _step_spread(r)
    if spread:
        out.append(_line(f"{label}: slowest timed step ÷ median step, per token, TRL / lora-dpo", spread, None))
    shares = [x for run in r["ours"] for x in (run.get("host_wait_shares") or []) if x is not None]
    if shares:  # lora_dpo/pace.py: near 0, the GPU waited for the host
        out.append(_line(f"{label}: lora-dpo's host waiting for the GPU, share of each timed step (min / median / "
                         f"max)", " / ".join(f"{x:.0%}" for x in (min(shares), statistics.median(shares),
                                                                  max(shares))), None))
    if "predicted_bytes" in r["ours"][0]:  # informational: the planner assumes every row is the longest
        out.append(_estimate_line(f"{label}: estimate (worst-case rows)", r["ours"][0]["predicted_bytes"],
                                  med("ours", "peak_bytes"), judged=False))
    return out


def _with_trl_from(doc: dict | None, name: str, base: dict | None) -> dict | None:
    """A variant stage that ran lora-dpo alone (vs_trl.py --trainers ours) compared with TRL's run in the `base`
    stage (the same data, batch and settings on TRL's side, in the same kit call)."""
    r = (doc or {}).get("results", {}).get(name)
    if not r or r.get("trl") or not (base or {}).get("results", {}).get(name, {}).get("trl"):
        return doc
    return {**doc, "results": {**doc["results"], name: {**r, "trl": base["results"][name]["trl"]}}}


def _step_memory_ratio(r: dict) -> float | None:
    """lora-dpo ÷ TRL of the memory a step adds on top of what stays between steps (the 4-bit weights, adapter and
    optimizer state, common to both): the part of the peak the trainers' work decides. None before results had it."""
    try:
        ours = [x["peak_bytes"] - x["resident_bytes"] for x in r["ours"]]
        trl = [x["peak_bytes"] - x["resident_bytes"] for x in r["trl"]]
    except KeyError:
        return None
    if not all(x["resident_bytes"] for x in r["ours"] + r["trl"]):  # a CPU run: no CUDA figures
        return None
    return statistics.median(ours) / statistics.median(trl)


def _estimate_line(what: str, predicted: int, measured: int, judged: bool = True) -> str:
    err = predicted / measured - 1
    return _line(f"{what}" + (f" within {ESTIMATE_WITHIN:.0%} of the peak" if judged else " vs the peak"),
                 f"{predicted / GiB:.2f} predicted, {measured / GiB:.2f} GiB measured ({err:+.0%})",
                 abs(err) <= ESTIMATE_WITHIN if judged else None)


def memory_lines(name: str, rows: list | None) -> list[str]:
    if not rows:
        return [_line(f"2×2048-token pairs ({name})", "not measured", None)]
    out = []
    for r in rows:
        cuda = r.get("device") == "cuda"
        span = r.get("prompt_tokens", 1024) + r.get("completion_tokens", 1024)  # chosen and rejected each
        ckpt = r["checkpointing"] + (f" = {r['checkpointed_layers']} layers" if r["checkpointing"] == "auto" else "")
        off = r.get("offload", "off")
        label = f"2×{span}-token pairs ({r['attn']}, checkpointing {ckpt}" + (")" if off == "off" else
                                                                             f", offloaded: {off})")
        target = cuda and span == 2048 and r["checkpointing"] == "on"  # the case: full checkpointing
        out.append(_line(f"{label}: peak" + (f" ≤ {PAIR_2x2048_GIB:g} GiB" if target else ""),
                         f"{r['peak_bytes'] / GiB:.2f} GiB" + ("" if cuda else " (CPU RSS)"),
                         r["peak_bytes"] / GiB <= PAIR_2x2048_GIB if target else None))
        if cuda:
            out.append(_estimate_line(f"{label}: estimate", r["predicted_bytes"], r["peak_bytes"]))
    return out


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    lines = ["| target | measured | met |", "|---|---|---|"]
    for name, file, label in (("long", "long.json", "long prompts"), ("short", "short.json", "short prompts"),
                              ("long", "long-b16.json", "long prompts, 16 pairs per step"),
                              ("long", "long-sdpa.json", "long prompts, lora-dpo on sdpa"),
                              ("short", "short-causal.json", "short prompts, lora-dpo on sdpa_causal"),
                              ("long", "long-offload.json", "long prompts, lora-dpo offloading to CPU memory"),
                              ("long", "long-compile.json", "long prompts, lora-dpo with train.compile"),
                              ("short", "short-compile.json", "short prompts, lora-dpo with train.compile")):
        doc = _load(out / file)
        label += f" ({doc['meta']['attn']})" if doc and "sdpa" not in file else ""
        lines += vs_trl_lines(name, _with_trl_from(doc, name, _load(out / f"{name}.json")), label)
    for name in ("short", "long"):
        lines += vs_trl_lines(name, _load(out / f"losses-{name}.json") or _load(out / "losses.json"),
                              f"{name} prompts, fp32 on both sides", True)
    for name, file in (("default kernel", "memory.json"), ("checkpointing share", "ckpt.json"),
                       ("offloading", "offload.json")):
        lines += memory_lines(name, _load(out / file))
    doc = _load(out / "long.json") or _load(out / "short.json")
    print(f"machine: {doc['meta']['machine'] if doc else 'unknown (no vs-TRL results)'}\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
