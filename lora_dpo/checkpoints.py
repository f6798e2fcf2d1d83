"""Checkpoints: adapter + optimizer + scheduler + RNG + data position, written atomically, read without pickle.

Layout: <run>/checkpoints/step-00000010/{adapter/, optimizer.pt, scheduler.json, rng.pt, trainer_state.json}.
`.pt` files hold only tensors and plain containers and are read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lora_dpo.errors import LoraDpoError

STATE = "trainer_state.json"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE).is_file())


def atomic_dir(final: Path, write) -> None:
    """Call write(tmp_dir), then rename tmp_dir → final, so a crash never leaves a half-written `final`. A previous
    `final` is renamed aside first and deleted only once the new one is in place: deleting it first (seconds for a
    merged model) left a half-deleted `final`, or none, to a crash or Ctrl-C in between."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    old = None
    try:
        write(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-old-{final.name}-")) / final.name
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old, final)  # the new one did not arrive: the previous one is back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def save(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int | None) -> Path:
    """Write checkpoint `step`; prune to the newest `keep`."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / "adapter")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=1))

    final = checkpoint_dir(run_dir, step)
    atomic_dir(final, write)
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def resolve(run_dir: Path, which: str) -> Path:
    for stale in (run_dir / "checkpoints").glob(".tmp-*"):  # a checkpoint whose writer was killed mid-way
        shutil.rmtree(stale, ignore_errors=True)
    if which == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise LoraDpoError(f"train.resume_from_checkpoint: 'latest' but '{run_dir}/checkpoints' holds no "
                               "checkpoint; set train.save_steps to write some, or start without resuming")
        return found[-1]
    path = Path(which)
    if not (path / STATE).is_file():
        raise LoraDpoError(f"train.resume_from_checkpoint: '{which}' is not a checkpoint directory (no {STATE})")
    return path


# what a resumed run may set differently from the run it continues: how it runs, logs, checkpoints and evaluates —
# never what it computes (the data, the model, the adapter's shape, the loss, the optimizer and its schedule)
RESUME_MAY_CHANGE = ("output.dir", "output.overwrite", "output.export", "train.resume_from_checkpoint",
                     "train.save_steps", "train.save_total_limit", "train.logging_steps", "train.eval_steps",
                     "train.report_to",
                     "train.max_nonfinite_steps", "train.per_device_eval_batch_size", "train.device",
                     "train.gradient_checkpointing", "train.gradient_checkpointing_layers",
                     "train.offload_activations", "train.compile", "train.layout", "model.attn_implementation",
                     "model.offload_embeddings", "data.on_problem", "evaluation.",
                     # where the reference cache lives, not what it holds (its key says that): a moved cache hits
                     "dpo.reference_cache_dir")


def check_resumable(recipe, path: Path, run_dir: Path) -> None:
    """Refuse to resume checkpoint `path` with a recipe that changes what the run computes: the checkpoint's
    optimizer state and schedule belong to its own settings (a new learning rate or max_steps would be silently
    ignored, a new LoRA shape would not load). Reads the recipe saved in the checkpoint, else the run's recipe.yaml
    (checkpoints written before the recipe was saved in them)."""
    import yaml

    try:
        saved = json.loads((path / STATE).read_text()).get("recipe")
        if saved is None and (run_dir / "recipe.yaml").is_file():
            saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        saved = None  # unreadable: checkpoints.load says so
    if not isinstance(saved, dict):
        return
    now = recipe.to_dict()
    for section, values in now.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            before = (saved.get(section) or {}).get(key, value)
            if before != value and not any(name == k or (k.endswith(".") and name.startswith(k))
                                           for k in RESUME_MAY_CHANGE):
                raise LoraDpoError(f"{name}: {value!r} differs from {before!r} in the run being resumed ({path}); "
                                   f"a resumed run continues the same training: set {name} back, or start a new "
                                   "run in another output.dir")


def check_same_data(path: Path, fingerprint: str) -> None:
    """Refuse to resume on other training pairs than the checkpoint's run trained on (its data files edited since, or
    its tokenizer): the same recipe then trains something else. Checkpoints written before they held the
    fingerprint are not checked."""
    try:
        saved = json.loads((path / STATE).read_text()).get("data_fingerprint")
    except (OSError, ValueError, AttributeError):
        return  # unreadable: checkpoints.load says so
    if saved is not None and saved != fingerprint:
        raise LoraDpoError(f"data.train: the training pairs differ from those of the run being resumed ({path}): its "
                           "data files or tokenizer changed since; restore them, or start a new run in another "
                           "output.dir")


def load(path: Path, model, optimizer, scheduler) -> dict:
    """Restore everything saved by `save` into live objects; → the trainer state dict."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        state = json.loads((path / STATE).read_text())
        weights = load_file(path / "adapter" / "adapter_model.safetensors")
        opt = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        sched = json.loads((path / "scheduler.json").read_text())
        rng = torch.load(path / "rng.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable piece means the checkpoint is unusable
        older = [p for p in list_checkpoints(path.parent.parent) if p.name < path.name]
        hint = f"; resume from the previous one: train.resume_from_checkpoint={older[-1]}" if older else ""
        raise LoraDpoError(f"checkpoint '{path}' is incomplete or corrupt ({type(e).__name__}){hint}") from None
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(opt)
    scheduler.load_state_dict(sched)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        restore_cuda_rng(list(rng["cuda"]))
    return state


def restore_cuda_rng(states: list) -> None:
    """Each visible GPU's generator from the checkpoint's, as far as both go: a checkpoint written where more (or
    fewer) GPUs were visible still resumes (torch.cuda.set_rng_state_all would fail on the extra states)."""
    for index, s in enumerate(states[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(s, index)
