"""The model card (README.md) written into every export: base model, data, hyperparameters, final metrics, parity."""

from __future__ import annotations

import json
from pathlib import Path

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


def model_card(run_dir: Path, recipe, format: str, parity: dict) -> str:
    m, d, lo, dp, t, q = recipe.model, recipe.data, recipe.lora, recipe.dpo, recipe.train, recipe.quantization
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
                     f"- training pairs: `{d.train}`", f"- held-out pairs: `{d.eval}`" if d.eval else
                     "- held-out pairs: none", f"- max_length {d.max_length}, max_prompt_length {d.max_prompt_length}",
                     "", "## Hyperparameters", "",
                     f"- DPO: loss_type {dp.loss_type}, beta {dp.beta}"
                     + (f", rpo_alpha {dp.rpo_alpha}" if dp.rpo_alpha else "")
                     + (f", label_smoothing {dp.label_smoothing}" if dp.label_smoothing else ""),
                     f"- LoRA: r {lo.r}, lora_alpha {lo.lora_alpha}, dropout {lo.lora_dropout}, target_modules "
                     f"{lo.target_modules}" + (", rsLoRA" if lo.use_rslora else ""),
                     f"- optimisation: {t.optim}, learning_rate {t.learning_rate}, {t.lr_scheduler_type} schedule, "
                     f"max_steps {t.max_steps}, per_device_train_batch_size {t.per_device_train_batch_size}, "
                     f"gradient_accumulation_steps {t.gradient_accumulation_steps}, seed {t.seed}",
                     "- the full resolved recipe is in `recipe.yaml`", "", "## Final metrics", ""]
    last = (read_metrics(run_dir) or [{}])[-1]
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
