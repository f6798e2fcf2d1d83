"""Held-out metrics of a finished run, greedy generations of policy and reference side by side, a KL estimate,
and (optionally) a reward model's policy-vs-reference win rate."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_dpo import batching, checkpoints
from lora_dpo import compile as compile_blocks
from lora_dpo import data as data_lib
from lora_dpo import model as model_lib
from lora_dpo import reward_model as rm_lib
from lora_dpo.errors import LoraDpoError
from lora_dpo.generation import generate, kl_estimate
from lora_dpo.logps import causal_lm
from lora_dpo.losses import REFERENCE_FREE
from lora_dpo.objective import MetricMeter, dpo_forward
from lora_dpo.recipe import DpoConfig, Recipe, load_recipe

__all__ = ["evaluate", "evaluate_pairs", "generate", "load_run", "read_run", "snapshot", "snapshots_json"]


@torch.no_grad()
def evaluate_pairs(model, pairs: list[data_lib.Pair], cfg: DpoConfig, batch_size: int, pad_id: int,
                   device: torch.device, ties: bool = False, layout: str = "packed") -> dict:
    """Held-out metrics under the `eval/` names (adapter on vs off, no dropout); `ties` adds the share of pairs
    whose margin is exactly 0."""
    was_training = model.training
    model.eval()
    meter, results = MetricMeter(), []
    layout, _ = batching.resolve_layout(layout, causal_lm(model).config, pairs)
    dtype = causal_lm(model).get_input_embeddings().weight.dtype  # the run's compute dtype
    for chunk in batching.eval_batches(pairs, batch_size):
        # eagerly under train.compile: an eval-mode model would compile graphs of its own (minutes on a CPU) for a
        # pass that runs now and then
        with model_lib.autocast(device, dtype), compile_blocks.eager():  # as training computes
            loss, metrics = dpo_forward(model, batching.build(chunk, pad_id, layout).to(device), cfg)
        if ties:
            metrics["ties"] = (metrics["rewards/margins"] == 0).float()
        results.append((loss * len(chunk), metrics))
    for loss, metrics in results:  # read back after the last batch: on a GPU, no wait between batches
        meter.add(loss, metrics)
    model.train(was_training)
    result = meter.result("eval/")
    result["eval/loss"] = meter.loss_sum / max(meter.pairs, 1)  # loss weighted per pair, not per batch
    return result


def read_run(run_dir: str | Path) -> Recipe:
    """The recipe of a finished run, once its adapter files are there and readable: cheap checks that fail before
    minutes of base-model loading."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "adapter").is_dir():
        raise LoraDpoError(f"'{run_dir}' is not a finished run directory (needs recipe.yaml and adapter/); "
                           "pass the output.dir of a finished training run")
    _check_adapter(run_dir)
    return load_recipe(run_dir / "recipe.yaml")


def _check_adapter(run_dir: Path) -> None:
    adapter = run_dir / "adapter"
    config, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    if not config.is_file():
        raise LoraDpoError(f"adapter file '{config}' is missing; {_adapter_fix(run_dir)}")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LoraDpoError(f"adapter file '{config}' is unreadable ({type(e).__name__}); "
                           f"{_adapter_fix(run_dir)}") from None
    if not weights.is_file():
        if (adapter / "adapter_model.bin").is_file():  # peft's pickle format: peft reads it, we cannot check it here
            return
        raise LoraDpoError(f"adapter file '{weights}' is missing; {_adapter_fix(run_dir)}")
    from safetensors import safe_open

    try:  # reads the header and checks that the file holds every tensor it lists (no tensor data is loaded)
        with safe_open(weights, framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: either way the file is unusable
        raise LoraDpoError(f"adapter file '{weights}' is corrupt or truncated ({str(e).splitlines()[0][:120]}); "
                           f"{_adapter_fix(run_dir)}") from None


def _adapter_fix(run_dir: Path) -> str:
    found = checkpoints.list_checkpoints(run_dir)
    if not found:
        return "the run has no checkpoint to restore it from: train the run again (output.overwrite=true)"
    return (f"restore it by resuming the run (train.resume_from_checkpoint=latest, from {found[-1]}), or copy "
            f"{found[-1] / 'adapter'} over {run_dir / 'adapter'} (the adapter as of that step)")


@contextlib.contextmanager
def quiet_libraries():
    """The notices training also drops (lora_dpo/model.py): bitsandbytes' advice to install `kernels` (registered
    before bitsandbytes is first imported, which importing peft does) and peft reading `is_gradient_checkpointing`,
    deprecated by recent transformers."""
    model_lib.drop_kernels_hub_notice()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_run(run_dir: str | Path, recipe: Recipe | None = None):
    """→ (recipe, PeftModel with the run's adapter, tokenizer, device). `recipe`: the run's, when already read by
    `read_run` (and perhaps changed by the caller)."""
    run_dir = Path(run_dir)
    recipe = recipe or read_run(run_dir)
    device, dtype = model_lib.device_and_dtype(recipe.train.precision, recipe.train.device)
    with quiet_libraries():
        from peft import PeftModel

        tokenizer = model_lib.load_tokenizer(recipe.model)
        base = model_lib.load_base(recipe.model, recipe.quantization, dtype, device)
        try:
            model = PeftModel.from_pretrained(base, run_dir / "adapter")
        except (ValueError, RuntimeError, OSError) as e:  # e.g. an adapter for another base model (shapes differ)
            if isinstance(e, torch.OutOfMemoryError):
                raise
            raise LoraDpoError(f"adapter '{run_dir / 'adapter'}' does not load onto '{recipe.model.name_or_path}' "
                               f"({str(e).strip().splitlines()[0][:160]}); check that model.name_or_path is the base "
                               f"it was trained on, or {_adapter_fix(run_dir)}") from None
    model.eval()
    return recipe, model, tokenizer, device


@dataclass
class Snapshot:
    """Held-out numbers and greedy answers of one model state (the reference before training, the policy after)."""
    metrics: dict | None  # None for the reference alone: no policy to compare it with
    answers: list[str]
    behaviour_rate: float | None
    strict: dict | None = None  # the same metrics with TRL's accuracy convention (ties count as wrong)
    logps: dict | None = None  # mean chosen/rejected log-probs of policy and reference on the held-out pairs
    kl: dict | None = None  # generation.kl_estimate of the policy against the reference

    def summary(self) -> str:
        m = self.metrics
        parts = [] if m is None else [f"reward accuracy {m['eval/rewards/accuracies']:.2f}",
                                      f"margin {m['eval/rewards/margins']:+.3f}", f"loss {m['eval/loss']:.4f}"]
        if self.behaviour_rate is not None:
            parts.append(f"behaviour rate {self.behaviour_rate:.0%}")
        if self.kl and self.kl["kl"] is not None:  # a sampled estimate: negative values happen, the error says why
            err = self.kl.get("std_error")
            parts.append(f"KL {self.kl['kl']:.3f}" + (f" ± {err:.3f}" if err is not None else "") + " nats/answer"
                         + f" ({self.kl['samples']} samples)" * ("samples" in self.kl))
        return ", ".join(parts)


def _logps(strict: dict, cfg: DpoConfig) -> dict:
    """Policy log-probs are measured; the reference's follow from the rewards, β·(π − ref) (means are linear)."""
    out = {"policy": {"chosen": strict["eval/logps/chosen"], "rejected": strict["eval/logps/rejected"]}}
    if cfg.loss_type not in REFERENCE_FREE:
        out["reference"] = {k: strict[f"eval/logps/{k}"] - strict[f"eval/rewards/{k}"] / cfg.beta
                            for k in ("chosen", "rejected")}
    return out


def snapshot(model, tokenizer, pairs: list, recipe, device, reference: bool = False, prompts: int = 0) -> Snapshot:
    """Held-out metrics (policy vs reference), a KL estimate and greedy answers on the first held-out prompts (of
    the reference alone, without metrics, when `reference`); `prompts` asks for at least that many answers.

    Before training the policy IS the reference, so every reward is 0 and every pair a tie; ties count as half a
    correct ranking here (and as wrong in `eval/rewards/accuracies`, TRL's convention), so 'before' reads as chance.
    """
    ev = recipe.evaluation
    metrics = strict = logps = kl = None
    if not reference:
        strict = evaluate_pairs(model, pairs, recipe.dpo, recipe.train.per_device_eval_batch_size,
                                tokenizer.pad_token_id, device, ties=True)
        ties = strict.pop("eval/ties")
        metrics = {**strict, "eval/rewards/accuracies": strict["eval/rewards/accuracies"] + 0.5 * ties}
        logps = _logps(strict, recipe.dpo)
        # every margin exactly 0 = the adapter changes nothing (a fresh one, before training): KL is 0, not sampled
        if ev.kl_samples and ties < 1:
            kl = kl_estimate(model, tokenizer, [p.prompt_ids for p in pairs[: ev.kl_samples]], ev.max_new_tokens,
                             seed=recipe.train.seed, batch_size=recipe.train.per_device_eval_batch_size)
    n = max(ev.generations, ev.behaviour_prompts if ev.behaviour_regex else 0, prompts)
    chosen = pairs[:n]
    answers = generate(model, tokenizer, [p.prompt_ids for p in chosen], ev.max_new_tokens, reference=reference)
    rate = None
    if ev.behaviour_regex:
        pattern = re.compile(ev.behaviour_regex)
        rate = sum(bool(pattern.search(a)) for a in answers) / max(len(answers), 1)
    return Snapshot(metrics, answers, rate, strict, logps, kl)


EMPTY_ANSWER = "(empty answer)"


def print_before_after(before: Snapshot, after: Snapshot, rows: list[dict], pairs: list, n: int) -> None:
    # the reference alone has no metrics: without a behaviour_regex its line would be a label with nothing after it
    lines = [(who, text) for who, text in (("before training (reference)", before.summary()),
                                           ("after training (policy)", after.summary())) if text]
    width = max((len(who) for who, _ in lines), default=0) + 1
    for who, text in lines:
        print(f"held-out, {who + ':':<{width}} {text}")
    for pair, ref, pol in list(zip(pairs, before.answers, after.answers))[:n]:
        prompt = rows[pair.index]["prompt"]
        prompt = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        one_line = {"\n": " ⏎ "}
        ref, pol = (a.translate(str.maketrans(one_line)) if a.strip() else EMPTY_ANSWER for a in (ref, pol))
        print(f"\n  prompt:    {prompt}\n  reference: {ref}\n  policy:    {pol}")


def evaluate(run_dir: str | Path, data: str | None = None, generations: int | None = None,
             reward_model: str | None = None, reward_prompts: int | None = None) -> dict:
    """Held-out metrics of a finished run, a KL estimate, reference vs policy answers side by side and, with
    `reward_model`, its policy-vs-reference win rate on them; writes eval.json and refreshes report.html."""
    from lora_dpo.report import write_report

    run_dir = Path(run_dir)
    check_counts(generations, reward_prompts)
    recipe = read_run(run_dir)
    if generations is not None:
        recipe.evaluation.generations = generations
    if reward_prompts is not None:
        recipe.evaluation.reward_prompts = reward_prompts
    rows, path = eval_rows(run_dir, recipe, data)  # a missing file fails here, before the model loads
    rm = None
    if reward_model:  # loaded first: a bad name fails in seconds, not after the base model has loaded
        device = model_lib.device_and_dtype(recipe.train.precision, recipe.train.device)[0]
        with quiet_libraries():
            rm = rm_lib.load(reward_model, device)
    recipe, model, tokenizer, device = load_run(run_dir, recipe)
    pairs, report = data_lib.load(recipe.data, tokenizer, "eval", rows)  # also applies data.chat_template
    for line in report.lines():
        print(line)
    n_rm = recipe.evaluation.reward_prompts if rm else 0
    before = _with_training_metrics(snapshot(model, tokenizer, pairs, recipe, device, reference=True, prompts=n_rm),
                                    run_dir, path, len(pairs))
    after = snapshot(model, tokenizer, pairs, recipe, device, prompts=n_rm)
    print_before_after(before, after, rows, pairs, recipe.evaluation.generations)
    result = snapshots_json(path, pairs, rows, before, after)
    if rm:
        result["reward_model"] = score_generations(rm, reward_model, result["generations"][:n_rm])
        w = result["reward_model"]
        print(f"\nreward model {reward_model}: policy wins {w['wins']}, ties {w['ties']}, loses {w['losses']} of "
              f"{w['prompts']} prompts (win rate {w['win_rate']:.2f}, tie rate {w['tie_rate']:.2f})"
              + (f"; {w['texts_cut_to_context']} texts longer than its context lost their beginning"
                 if w["texts_cut_to_context"] else ""))
    write_json(run_dir / "eval.json", result)
    print(f"written: {run_dir / 'eval.json'}, {write_report(run_dir)}")
    return result


def _with_training_metrics(before: Snapshot, run_dir: Path, data: str, n_pairs: int) -> Snapshot:
    """The reference's held-out metrics as training measured them before its first step (eval.json), where they
    are of the same held-out pairs: the reference alone has no policy to compare with, and eval.json would
    otherwise lose them."""
    try:
        previous = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return before
    if not isinstance(previous, dict) or previous.get("data") != data or previous.get("pairs") != n_pairs:
        return before
    kept = {k: v for k, v in (previous.get("before") or {}).items() if k.startswith("eval/")}
    return dataclasses.replace(before, metrics=kept) if {"eval/rewards/accuracies", "eval/rewards/margins",
                                                        "eval/loss"} <= kept.keys() else before


def check_counts(generations: int | None, reward_prompts: int | None) -> None:
    """The limits the recipe keys evaluation.generations / evaluation.reward_prompts have, for the arguments that
    override them."""
    if generations is not None and generations < 0:
        raise LoraDpoError(f"--generations must be >= 0 (0 shows no answers), got {generations}")
    if reward_prompts is not None and reward_prompts <= 0:
        raise LoraDpoError(f"--reward-prompts must be > 0, got {reward_prompts}; leave it out for the recipe's "
                           "evaluation.reward_prompts")


def eval_rows(run_dir: Path, recipe: Recipe, data: str | None) -> tuple[list[dict], str]:
    """→ (held-out rows, where they come from): `data`, the run's data.eval, or the rows its data.eval_split held
    out of the training sources (same split_seed)."""
    if data is None and recipe.data.eval is None and recipe.data.eval_split is None:
        raise LoraDpoError(f"run '{run_dir}' has no data.eval or data.eval_split; pass --data FILE.jsonl")
    data_lib.chat_template(recipe.data)  # a missing template file fails here too
    if data is not None:
        return data_lib.read_rows(data, "--data", recipe.data), data
    if recipe.data.eval is not None:
        return data_lib.read_rows(recipe.data.eval, "data.eval", recipe.data), data_lib.source_label(recipe.data,
                                                                                                      "eval")
    return data_lib.read_data(recipe.data)[1], data_lib.source_label(recipe.data, "eval")


def score_generations(rm, name: str, generations: list[dict]) -> dict:
    """Scores each generation's policy and reference answer (stored in the rows) → the win-rate summary."""
    model, tokenizer = rm
    prompts = [g["prompt"] for g in generations]
    policy, cut_p = rm_lib.score(model, tokenizer, prompts, [g["policy"] for g in generations])
    reference, cut_r = rm_lib.score(model, tokenizer, prompts, [g["reference"] for g in generations])
    for g, p, r in zip(generations, policy, reference):
        g["score_policy"], g["score_reference"] = p, r
    return {"model": name, **rm_lib.win_rate(policy, reference), "texts_cut_to_context": cut_p + cut_r}


def write_json(path: Path, obj) -> None:
    """Written beside, then renamed: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def snapshots_json(path: str, pairs: list, rows: list[dict], before: Snapshot, after: Snapshot) -> dict:
    prompts = [rows[p.index]["prompt"] for p in pairs[: len(after.answers)]]
    return {"data": path, "pairs": len(pairs), "before": {"behaviour_rate": before.behaviour_rate,
                                                           **(before.metrics or {})},
            "after": {"behaviour_rate": after.behaviour_rate, **after.metrics},
            "logps": after.logps, "kl": after.kl,
            "generations": [{"prompt": p, "reference": r, "policy": q}
                            for p, r, q in zip(prompts, before.answers, after.answers)]}
