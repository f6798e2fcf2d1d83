"""Export a finished run: the adapter, a merged model (safetensors) or a GGUF file — each with a parity report.

Where the LoRA deltas are merged decides which function the exported model computes. The trained policy is the
NF4 base + adapter, so `base="dequantized"` merges B·A·scale into the NF4 round trip of every quantized weight
(in fp32, then cast): the merged model computes the trained policy up to the final rounding. `base="original"`
merges into the original 16-bit weights, which the adapter never saw; the parity report measures that gap.

Every export is written into a temporary directory next to its destination and renamed into place, and
`parity.json` beside it records max/mean |Δ log-prob| between the exported model and the trained policy on
held-out pairs, and the held-out reward accuracy of both. parity.json also lists the files the export wrote: that
is how `force` knows a previous export (the only thing it replaces, besides an empty directory) from the user's files.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import torch

from lora_dpo import batching, prequantized
from lora_dpo import data as data_lib
from lora_dpo import model as model_lib
from lora_dpo.checkpoints import atomic_dir
from lora_dpo.errors import LoraDpoError
from lora_dpo.export_card import model_card
from lora_dpo.logps import batch_logps, causal_lm

FORMATS = ("adapter", "merged", "gguf")
BASES = ("dequantized", "original")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PARITY_PAIRS = 64           # held-out pairs the parity check runs on (the first ones; the count is reported)
FALLBACK_PAIRS = 8          # training pairs used when the run has no held-out data (said in parity.json)
GENERATIONS, NEW_TOKENS = 4, 16
PARITY = "parity.json"      # written last into every export; it lists the export's files


def default_out(run_dir: Path, format: str, base: str) -> Path:
    return run_dir / "export" / (format if format == "adapter" else f"{format}-{base}")


def export(run_dir, format: str = "adapter", base: str = "dequantized", dtype: str = "bf16", out=None,
           force: bool = False, gguf_type: str = "bf16", data: str | None = None) -> Path:
    """Export the run in `run_dir`; → the export directory (it holds parity.json and a README.md model card)."""
    from lora_dpo import export_gguf
    from lora_dpo.evaluate import load_run, read_run

    run_dir = Path(run_dir)
    _check_choice("--format", format, FORMATS)
    _check_choice("--base", base, BASES)
    _check_choice("--dtype", dtype, tuple(DTYPES))
    _check_choice("--gguf-type", gguf_type, export_gguf.GGUF_TYPES)
    recipe = read_run(run_dir)  # a missing or damaged adapter fails here, before the base model loads
    out = Path(out) if out is not None else default_out(run_dir, format, base)
    check_out(out, run_dir, force)
    if format == "gguf":
        export_gguf.check_supported(_base_config(run_dir))
    if format != "adapter":  # before the policy loads
        _check_original_exists(recipe, base, model_lib.stored_quantization(recipe.model))
    rows = heldout_rows(recipe, data)  # so does a missing --data file

    recipe, policy, tokenizer, device = load_run(run_dir, recipe)
    pairs, data_note = heldout_pairs(recipe, tokenizer, data, rows)
    pad_id, bs = tokenizer.pad_token_id, recipe.train.per_device_eval_batch_size
    policy_lp = sequence_logps(policy, pairs, pad_id, device, bs)
    with model_lib.reference_mode(policy):
        reference_lp = sequence_logps(policy, pairs, pad_id, device, bs)
    prompts = [p.prompt_ids for p in pairs[:GENERATIONS]]
    policy_answers = _answers(policy, tokenizer, prompts)
    parity = {"format": format, "run": str(run_dir), "data": data_note,
              "policy": _policy_description(recipe), "reference": "the same base with the adapter off",
              "exported_computed_in": "the policy's precision" if format == "adapter" else
              "float32 from the stored weights (measures the export, not the inference precision)",
              "beta": recipe.dpo.beta}
    merged = None
    if format != "adapter":
        merged, info = merge(policy, recipe, base)
        parity.update(info)
        policy = None  # the 4-bit policy is not needed any more: free it before the export is written
        gc.collect()

    def write(tmp: Path) -> None:
        if format == "adapter":
            exported_lp, exported_answers = _write_adapter(run_dir, policy, tokenizer, tmp, pairs, pad_id, device,
                                                           bs, prompts)
        else:
            if format == "merged":
                exported = _write_merged(merged, tokenizer, tmp, dtype)
                parity.update(dtype=dtype, loads_with="AutoModelForCausalLM.from_pretrained(dir)")
            else:
                exported, gguf_info = export_gguf.write_and_verify(merged, tokenizer, tmp, gguf_type, recipe,
                                                                   prompts)
                parity.update(gguf_info)
            exported.to(device)
            exported_lp = sequence_logps(exported, pairs, pad_id, device, bs)
            exported_answers = _answers(exported, tokenizer, prompts)
        parity.update(compare(policy_lp, reference_lp, exported_lp, recipe.dpo.beta))
        parity["generations"] = [{"policy": a, "exported": b} for a, b in zip(policy_answers, exported_answers)]
        parity["greedy_answers_equal"] = sum(a == b for a, b in zip(policy_answers, exported_answers))
        (tmp / "recipe.yaml").write_text((run_dir / "recipe.yaml").read_text())
        (tmp / "README.md").write_text(model_card(run_dir, recipe, format, parity))
        # last, listing every file: what makes this directory one that a later --force may replace
        parity["files"] = sorted([str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file()] + [PARITY])
        (tmp / PARITY).write_text(json.dumps(parity, indent=1, ensure_ascii=False))
        check_out(out, run_dir, force)  # minutes have passed: the destination may have changed meanwhile

    created_parent = not out.parent.exists()
    try:
        atomic_dir(out, write)
    except BaseException:
        if created_parent and out.parent.is_dir() and not any(out.parent.iterdir()):
            out.parent.rmdir()
        raise
    print(f"{format} export written to {out}: |Δ log-prob| vs the trained policy max {parity['max_abs_logp_diff']:.2e}"
          f", mean {parity['mean_abs_logp_diff']:.2e} on {len(pairs)} "
          f"{'held-out pairs' if data_note['held_out'] else 'training pairs (the run has no held-out data)'}; "
          "reward accuracy: policy "
          f"{parity['policy_reward_accuracy']:.2f}, exported {parity['exported_reward_accuracy']:.2f}")
    return out


def check_out(out: Path, run_dir: Path, force: bool) -> None:
    """Where an export may go: a new directory, or with `force` an empty one or a previous export — never the run
    directory, a directory holding it or the working directory, never a part of a run (its adapter/, checkpoints/,
    …), never a directory holding anything else: --force replaces an export, not the user's files."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise LoraDpoError(f"--out '{out}' is a file or a link; choose a directory path")
    target, run, cwd = out.resolve(), run_dir.resolve(), Path.cwd().resolve()
    fix = f"choose another --out (a new directory), or leave --out out to write under '{run_dir / 'export'}'"
    if target == run or target in run.parents:
        raise LoraDpoError(f"--out '{out}' is the run directory '{run_dir}' or holds it; {fix}")
    if target == cwd or target in cwd.parents:
        raise LoraDpoError(f"--out '{out}' is the current directory or holds it; {fix}")
    part = _run_part(target)
    if part is not None:
        raise LoraDpoError(f"--out '{out}' is or lies inside '{part.name}' of the training run '{part.parent}' "
                           f"(not an export); {fix}")
    if not out.exists():
        return
    if not force:
        raise LoraDpoError(f"export directory '{out}' already exists; pass --force to replace it, or --out DIR")
    added = _added_files(out)
    if added is None and any(out.iterdir()):
        raise LoraDpoError(f"--out '{out}' holds files that are not a lora-dpo export (--force replaces only a "
                           f"previous export or an empty directory); {fix}")
    if added:
        raise LoraDpoError(f"--out '{out}' is a previous export with files added to it ({', '.join(added[:3])}"
                           f"{', …' if len(added) > 3 else ''}); move them out before --force replaces it, or {fix}")


def is_export(directory: Path) -> bool:
    """A directory written by `export` (and nothing added to it since)."""
    return _added_files(directory) == []


def _added_files(directory: Path) -> list[str] | None:
    """Files of a previous export that `export` did not write; None when `directory` is no export: an export's
    parity.json names its format and run, and lists its files (exports written before that list: [])."""
    try:
        parity = json.loads((directory / PARITY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(parity, dict) or parity.get("format") not in FORMATS or "run" not in parity:
        return None
    listed = set(parity.get("files") or [])
    if not listed:
        return []
    return sorted(str(f.relative_to(directory)) for f in directory.rglob("*") if f.is_file()
                  and str(f.relative_to(directory)) not in listed)


def _run_part(target: Path) -> Path | None:
    """The entry of a training run's directory that `target` lies in (adapter/, checkpoints/, a file …), unless it
    is the run's export/ directory, a previous export, or not there yet; None when `target` is in no run."""
    for run in target.parents:
        if (run / "recipe.yaml").is_file() and any((run / f).exists() for f in ("adapter", "checkpoints",
                                                                                  "metrics.jsonl")):
            top = run / target.relative_to(run).parts[0]
            if top.name == "export" or not top.exists() or is_export(top):
                return None
            return top
    return None


def _check_choice(option: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise LoraDpoError(f"{option} '{value}' is not supported; use one of {', '.join(allowed)}")


def _base_config(run_dir: Path):
    """The base model's config, without loading weights (cheap checks before the real work)."""
    from transformers import AutoConfig

    from lora_dpo.recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml")
    path, kwargs = model_lib.local_dir(recipe.model)
    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise LoraDpoError(f"model.name_or_path: cannot read the config of '{recipe.model.name_or_path}' "
                           f"({str(e).splitlines()[0][:160]}); check the path or hub id (this machine may be "
                           "offline)") from None


def _policy_description(recipe) -> str:
    q = recipe.quantization
    stored = model_lib.stored_quantization(recipe.model) if q.load_in_4bit or q.load_in_8bit else None
    kind = (f"4-bit {prequantized.quant_type(stored, q)}" if q.load_in_4bit else "8-bit" if q.load_in_8bit
            else "unquantized")
    return f"{kind} base{' (stored quantized)' if stored else ''} + adapter (as trained)"


# ---------------------------------------------------------------- held-out pairs and log-probs

def heldout_rows(recipe, data: str | None) -> tuple[list[dict], str, bool]:
    """→ (rows, where they come from, held out?): `data`, the run's held-out rows, or else its training rows.
    Reads files only (no tokenizer): a missing file fails before the model loads."""
    if data:
        return data_lib.read_rows(data, "--data", recipe.data), data, True
    train_rows, eval_rows = data_lib.read_data(recipe.data)  # data.eval, or the data.eval_split rows
    if eval_rows:
        return eval_rows, data_lib.source_label(recipe.data, "eval"), True
    return train_rows, data_lib.source_label(recipe.data, "train"), False


def heldout_pairs(recipe, tokenizer, data: str | None, rows: tuple | None = None) -> tuple[list, dict]:
    """→ (pairs, a note saying where they came from). Up to PARITY_PAIRS held-out pairs; when the run has no
    held-out data, a few training pairs (said so: the exported model has seen them). `rows`: `heldout_rows`'s
    answer, when already read."""
    rows, source, held_out = rows or heldout_rows(recipe, data)
    pairs, _ = data_lib.load(recipe.data, tokenizer, "eval" if held_out else "train", rows)
    if not pairs:
        raise LoraDpoError(f"no usable pairs in '{source}' for the parity check; pass --data FILE.jsonl")
    used = pairs[:PARITY_PAIRS if held_out else FALLBACK_PAIRS]
    note = {"source": source, "held_out": held_out, "pairs_available": len(pairs), "pairs_used": len(used)}
    if not held_out:
        note["note"] = (f"the run has no data.eval: the parity check uses the first {len(used)} training pairs "
                        "(the log-prob comparison is still valid; the reward accuracies are not held-out numbers)")
    return used, note


@torch.no_grad()
def sequence_logps(model, pairs: list, pad_id: int, device, batch_size: int) -> torch.Tensor:
    """(2, N) fp32: summed completion log-probs of chosen (row 0) and rejected (row 1) for each pair."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for chunk in batching.eval_batches(pairs, batch_size):
        logps, _ = batch_logps(model, batching.collate(chunk, pad_id).to(device))
        c, r = logps.float().cpu().chunk(2)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    return torch.stack([torch.cat(chosen), torch.cat(rejected)])


def compare(policy: torch.Tensor, reference: torch.Tensor, exported: torch.Tensor, beta: float) -> dict:
    """Parity numbers from (2, N) log-prob tensors; reward accuracy counts strict wins (TRL's convention)."""
    diff = (exported - policy).abs()

    def accuracy(lp: torch.Tensor) -> float:
        rewards = beta * (lp - reference)  # (2, N): chosen, rejected
        return float((rewards[0] > rewards[1]).float().mean())

    return {"max_abs_logp_diff": float(diff.max()), "mean_abs_logp_diff": float(diff.mean()),
            "sequences": int(diff.numel()), "policy_reward_accuracy": accuracy(policy),
            "exported_reward_accuracy": accuracy(exported),
            "logps_finite": bool(torch.isfinite(exported).all())}


def _answers(model, tokenizer, prompts: list[list[int]]) -> list[str]:
    from lora_dpo.generation import generate

    return generate(model, tokenizer, prompts, max_new_tokens=NEW_TOKENS)


# ---------------------------------------------------------------- adapter

def _write_adapter(run_dir: Path, policy, tokenizer, tmp: Path, pairs, pad_id, device, bs, prompts):
    src = run_dir / "adapter"
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    tokenizer.save_pretrained(tmp)  # tokenizer + chat template, also when the run's adapter dir lacks them
    # the exported adapter, loaded back beside the trained one on the same base: one copy of the weights
    policy.load_adapter(tmp, adapter_name="exported")
    active = policy.active_adapter
    policy.set_adapter("exported")
    try:
        lp = sequence_logps(policy, pairs, pad_id, device, bs)
        answers = _answers(policy, tokenizer, prompts)
    finally:
        policy.set_adapter(active)
        policy.delete_adapter("exported")
    return lp, answers


# ---------------------------------------------------------------- merged

def merge(policy, recipe, base: str):
    """→ (fp32 unquantized model with the LoRA deltas merged, info for parity.json).

    `dequantized`: every quantized Linear gets the NF4 round trip of its weight (what the policy computed with);
    `original`: the original weights. Everything that was never quantized (embeddings, norms, an unquantized
    lm_head, biases) comes from the original checkpoint either way.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    path, kwargs = model_lib.local_dir(recipe.model)
    stored = model_lib.stored_quantization(recipe.model, path, kwargs)  # export() refused --base original for it
    if stored:  # loads as stored, then every quantized Linear becomes its dequantized fp32 weight
        merged = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map={"": "cpu"}, **kwargs)
        merged = merged.dequantize() or merged
        merged.float()
    else:
        merged = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    weights = dict(merged.named_parameters(remove_duplicate=False))
    inner = causal_lm(policy)
    quantized = deltas = 0
    if base == "dequantized":
        for name, module in inner.named_modules():
            if isinstance(module, bnb.nn.Linear8bitLt):
                raise LoraDpoError("--base dequantized: merging into an 8-bit base is not supported; export with "
                                   "--base original, or train with quantization.load_in_4bit: true")
            if isinstance(module, bnb.nn.Linear4bit):
                w = module.weight
                deq = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
                _assign(weights, name.removesuffix(".base_layer") + ".weight", deq)
                quantized += 1
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer):
            key = name + ".weight"
            w = weights[key].data
            for adapter in module.active_adapters:
                if adapter not in module.lora_A:
                    raise LoraDpoError(f"LoRA adapter on '{name}' is not on a Linear layer (embedding or "
                                       "convolution adapters cannot be merged here); export --format adapter")
                a = module.lora_A[adapter].weight.detach().float().cpu()     # (r, in)
                b = module.lora_B[adapter].weight.detach().float().cpu()     # (out, r)
                w += (b @ a) * module.scaling[adapter]
                deltas += 1
    merged.eval()
    q = recipe.quantization
    info = {"base": base, "quantized_layers_dequantized": quantized, "lora_deltas_merged": deltas}
    if not q.load_in_4bit and not q.load_in_8bit:
        info["base_note"] = "the run trained on an unquantized base: dequantized and original are the same weights"
    return merged, info


def _check_original_exists(recipe, base: str, stored: dict | None) -> None:
    if stored and base == "original":
        raise LoraDpoError(f"--base original: '{recipe.model.name_or_path}' is stored quantized, so its original "
                           "weights are not in it; export with --base dequantized (the default), or retrain on the "
                           "unquantized model")


def _assign(weights: dict, key: str, value: torch.Tensor) -> None:
    if key not in weights:
        raise AssertionError(f"quantized layer {key} has no counterpart in the original checkpoint")
    if weights[key].shape != value.shape:
        raise AssertionError(f"{key}: dequantized shape {tuple(value.shape)} ≠ {tuple(weights[key].shape)}")
    weights[key].data.copy_(value)


def _write_merged(merged, tokenizer, tmp: Path, dtype: str):
    from transformers import AutoModelForCausalLM

    merged.to(DTYPES[dtype])
    merged.config.use_cache = True
    merged.save_pretrained(tmp, max_shard_size="2GB")
    if not (tmp / "generation_config.json").is_file() and merged.generation_config is not None:
        merged.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # the parity check reads the files back, as a user would; fp32 compute isolates the export from inference
    # precision (the stored weights are what is measured)
    return AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)

