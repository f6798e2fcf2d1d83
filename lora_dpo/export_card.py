"""The model card (README.md) written into every export: base model, data, hyperparameters, final metrics, parity."""

from __future__ import annotations

import json
from pathlib import Path

from lora_dpo import data_sources
from lora_dpo.tracking import read_metrics

_USAGE = {
    "adapter": ("```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                "model = AutoPeftModelForCausalLM.from_pretrained(\"{dir}\")\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"{dir}\")\n```\n\n"
                "The adapter was trained on the base quantized to 4 bit; load the base the same way "
                "(`BitsAndBytesConfig(load_in_4bit=True, ...)`, see recipe.yaml) to compute exactly the trained "
                "policy."),
    "merged": ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
               "model = AutoModelForCausalLM.from_pretrained(\"{dir}\")\n"
               "tokenizer = AutoTokenizer.from_pretrained(\"{dir}\")\n```"),
    "gguf": ("```bash\nllama-cli -m {dir}/{file} -cnv\n```\n\nor in Python: "
             "`AutoModelForCausalLM.from_pretrained(\"{dir}\", gguf_file=\"{file}\")`."),
}


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _source(spec: dict) -> str:
    """One source mapping as people read it: `path [name/split]`, revision, share of the mix."""
    extra = [f"revision `{spec['revision']}`"] if spec.get("revision") else []
    if spec.get("weight") is not None:
        extra.append(f"weight {spec['weight']:g}")
    if spec.get("count") is not None:
        extra.append(f"{spec['count']} rows")
    return f"`{data_sources.label(spec)}`" + (f" ({', '.join(extra)})" if extra else "")


def _data_lines(what: str, value) -> list[str]:
    """data.train / data.eval: a path or hub id, or a list of source mappings (one sub-item each)."""
    if isinstance(value, str):
        return [f"- {what}: `{value}`"]
    if len(value) == 1:
        return [f"- {what}: {_source(value[0])}"]
    return [f"- {what}, mixed from {len(value)} sources:"] + [f"  - {_source(s)}" for s in value]


def _heldout_lines(run_dir: Path, d) -> list[str]:
    if d.eval is not None:
        return _data_lines("held-out pairs", d.eval)
    if d.eval_split is None:
        return ["- held-out pairs: none"]
    share = (f"{d.eval_split} rows" if isinstance(d.eval_split, int) else f"{d.eval_split * 100:g} %")
    line = (f"- held-out pairs: {share} of the training sources, held out before training (data.eval_split "
            f"{d.eval_split}, split_seed {d.split_seed})")
    try:  # how many pairs that made, as the run counted them
        kept = json.loads((run_dir / "data_report.json").read_text(encoding="utf-8"))["eval"]["kept"]
        line += f": {int(kept)} pairs"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return [line]


def _steps(t, metrics: list[dict]) -> str:
    """The optimizer steps the run took (its last metrics row), and what set their number."""
    done = metrics[-1].get("step") if metrics else None
    if t.max_steps == -1:
        epochs = f"num_train_epochs {t.num_train_epochs:g}"
        return f"{done} steps ({epochs})" if done is not None else epochs
    return f"{done if done is not None else t.max_steps} steps (max_steps {t.max_steps})"


def model_card(run_dir: Path, recipe, format: str, parity: dict) -> str:
    m, d, lo, dp, t, q = recipe.model, recipe.data, recipe.lora, recipe.dpo, recipe.train, recipe.quantization
    metrics = read_metrics(run_dir)
    front = ["---", f"base_model: {json.dumps(m.name_or_path)}", "tags:", "- dpo", "- lora", "- lora-dpo"]
    if format == "adapter":
        front.append("library_name: peft")
    front.append("---")
    quant = (f"4-bit {q.bnb_4bit_quant_type}" + (" (double quantization)" if q.bnb_4bit_use_double_quant else "")
             if q.load_in_4bit else "8-bit" if q.load_in_8bit else "unquantized")
    what = {"adapter": "a LoRA adapter (PEFT format)",
            "merged": f"the model with its LoRA adapter merged ({parity.get('dtype')}, safetensors)",
            "gguf": f"the merged model as a GGUF file ({parity.get('gguf_type')})"}[format]
    lines = front + ["", f"# {run_dir.name} — {format}", "",
                     f"This is {what}, preference-tuned with DPO on LoRA adapters by lora-dpo.", "",
                     "## Base model", "", f"- `{m.name_or_path}`" + (f" at revision `{m.revision}`" if m.revision
                                                                       else ""),
                     f"- trained on the base loaded {quant}", "", "## Data", "",
                     *_data_lines("training pairs", d.train), *_heldout_lines(run_dir, d),
                     f"- max_length {d.max_length}, max_prompt_length {d.max_prompt_length}",
                     "", "## Hyperparameters", "",
                     f"- DPO: loss_type {dp.loss_type}, beta {dp.beta}"
                     + (f", rpo_alpha {dp.rpo_alpha}" if dp.rpo_alpha else "")
                     + (f", label_smoothing {dp.label_smoothing}" if dp.label_smoothing else ""),
                     f"- LoRA: r {lo.r}, lora_alpha {lo.lora_alpha}, dropout {lo.lora_dropout}, target_modules "
                     + (lo.target_modules if isinstance(lo.target_modules, str) else ", ".join(lo.target_modules))
                     + (", rsLoRA" if lo.use_rslora else ""),
                     f"- optimisation: {t.optim}, learning_rate {t.learning_rate}, {t.lr_scheduler_type} schedule, "
                     f"{_steps(t, metrics)}, per_device_train_batch_size {t.per_device_train_batch_size}, "
                     f"gradient_accumulation_steps {t.gradient_accumulation_steps}, seed {t.seed}",
                     "- the full resolved recipe is in `recipe.yaml`", "", "## Final metrics", ""]
    last = (metrics or [{}])[-1]
    if last:
        keys = [k for k in ("step", "loss", "rewards/accuracies", "rewards/margins", "eval/loss",
                            "eval/rewards/accuracies", "eval/rewards/margins") if k in last]
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(last[k])} |" for k in keys]
    else:
        lines.append("(no metrics.jsonl in the run)")
    evaluation = run_dir / "eval.json"
    if evaluation.is_file():
        ev = json.loads(evaluation.read_text())
        for when in ("before", "after"):
            nums = ev.get(when) or {}
            if "eval/rewards/accuracies" in nums:
                lines.append(f"\nHeld-out {when} training: reward accuracy {_fmt(nums['eval/rewards/accuracies'])}, "
                             f"margin {_fmt(nums.get('eval/rewards/margins'))}"
                             + (f", behaviour rate {nums['behaviour_rate']:.0%}"
                                if nums.get("behaviour_rate") is not None else ""))
    data = parity["data"]
    lines += ["", "## Parity with the trained policy", "",
              f"On {data['pairs_used']} {'held-out' if data['held_out'] else 'training'} pairs from "
              f"`{data['source']}` (`parity.json`): |Δ log-prob| per sequence between this export and the trained "
              f"policy ({parity['policy']}) max {parity['max_abs_logp_diff']:.3g}, mean "
              f"{parity['mean_abs_logp_diff']:.3g}; reward accuracy {parity['exported_reward_accuracy']:.3f} "
              f"(trained policy {parity['policy_reward_accuracy']:.3f})."]
    if format != "adapter":
        into = ("the NF4 round trip of the base weights (it computes the trained policy)"
                if parity.get("base") == "dequantized" else "the original base weights (not the trained function)")
        lines.append(f"The adapter was merged into {into}.")
    lines += ["", "## Use", "", _USAGE[format].format(dir=".", file=parity.get("gguf_file", "")), ""]
    return "\n".join(lines)
