"""What a run checks and sets up before any model loads: the output directory (refusing to overwrite a run), the
pairs against the model's context, and the process state training needs (restored afterwards)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch

from lora_dpo import checkpoints
from lora_dpo import model as model_lib
from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import Recipe

RUN_FILES = ("recipe.yaml", "metrics.jsonl", "adapter", "checkpoints", "data_report.json", "data_report.txt",
             "export", "eval.json", "report.html", "tensorboard", "wandb")


def prepare_output_dir(recipe: Recipe) -> Path:
    out = Path(recipe.output.dir)
    resuming = recipe.train.resume_from_checkpoint is not None
    holds_run = out.is_dir() and any((out / f).exists() for f in RUN_FILES)
    if holds_run and not resuming and not recipe.output.overwrite:
        if checkpoints.list_checkpoints(out):
            raise LoraDpoError(f"output.dir '{out}' already holds a run; choose another directory, resume it with "
                               "train.resume_from_checkpoint=latest, or replace it with output.overwrite=true")
        state = "a finished run" if (out / "adapter").is_dir() else "a run that stopped before its first checkpoint"
        raise LoraDpoError(f"output.dir '{out}' already holds {state} (no checkpoint to resume); choose another "
                           "directory, or replace it with output.overwrite=true")
    if out.exists() and not out.is_dir():
        raise LoraDpoError(f"output.dir '{out}' is a file; choose a directory path")
    parent = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    try:  # a real probe: os.access says yes to root even where nothing can be written (read-only mount, /proc)
        shutil.rmtree(tempfile.mkdtemp(dir=parent, prefix=".lora-dpo-write-test-"))
    except OSError:
        raise LoraDpoError(f"output.dir '{out}': '{parent}' is not writable; choose a directory you can write "
                           "to") from None
    return out


def clear_run(out: Path) -> None:
    for name in RUN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


@contextlib.contextmanager
def flushing_denormals():
    """Once the loss is near 0, backward carries subnormal floats, which x86 CPUs process ~100× slower; flushing
    them to zero changes nothing measurable (they are below 1e-38) and keeps late steps as fast as early ones. torch
    has no getter for the mode, so whether it was on is read from a product."""
    was_on = float(torch.tensor([1e-39]) * torch.tensor([1.0])) == 0.0
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


def check_context(recipe: Recipe, train_pairs: list, eval_pairs: list | None) -> None:
    """Pairs and generations must fit the model's context (its config, read before the weights load): past it, a
    model with learned positions fails mid-run (an index error) and a RoPE model trains on positions it never saw."""
    from transformers import AutoConfig

    if recipe.model.trust_remote_code:  # its config class is remote code: read when the model loads
        return
    try:
        path, kwargs = model_lib.local_dir(recipe.model)
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError):
        return  # loading the model says what is wrong
    config = getattr(config, "text_config", None) or config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(context, int):
        return
    eval_pairs = eval_pairs or []
    span = lambda p: len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))  # noqa: E731
    longest = max(map(span, train_pairs + eval_pairs), default=0)
    if longest > context:
        raise LoraDpoError(f"data.max_length: the longest pair spans {longest} positions (prompt + completion), "
                           f"beyond the model's context of {context} (max_position_embeddings); set data.max_length "
                           f"to at most {context}")
    ev = recipe.evaluation
    shown = max(ev.generations, ev.kl_samples, ev.behaviour_prompts if ev.behaviour_regex else 0)
    prompt = max((len(p.prompt_ids) for p in eval_pairs[:shown]), default=0)
    if prompt and prompt + ev.max_new_tokens > context:
        raise LoraDpoError(f"evaluation.max_new_tokens: a held-out prompt of {prompt} tokens plus "
                           f"{ev.max_new_tokens} new tokens is beyond the model's context of {context}; set "
                           f"evaluation.max_new_tokens to at most {context - prompt}, or data.max_prompt_length lower")
