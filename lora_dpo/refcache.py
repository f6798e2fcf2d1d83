"""Reference log-probs computed once, stored on disk, and reused (`dpo.reference: precompute`).

The reference is the base with its adapters off, so its log-probs depend only on the base weights, how they are
quantized and computed, and the token ids of each pair. One no-grad pass (eval mode, eval batch size, no
checkpointing) computes them before training; training then runs no reference forward at all.

The cache key covers everything the values depend on:
- the base model: its source, revision (the hub snapshot's commit where one is cached) and a content hash of its
  weight and config files (sampled: size + first, middle and last MiB of each file, so multi-GB bases hash in
  milliseconds; for a local directory or .gguf file also each file's modification time, so a file rewritten in
  place, same size, new bytes elsewhere than those sampled, is seen too — and a copy that does not keep the times
  recomputes once);
- quantization settings and the compute dtype / device type;
- the tokenizer, chat template and truncation settings, both as named settings and through the data fingerprint:
  a hash of every pair's prompt / chosen / rejected token ids in order, which changes whenever the data, the
  tokenizer, the template or the truncation changes anything the model would see.
A β sweep, another loss type or a resumed run hits; any change to a key misses, says which key changed, and
recomputes. Files: `<dir>/<key>.safetensors` (tensors `chosen`, `rejected`) + `<key>.json` (the key's parts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_dpo import batching, heap
from lora_dpo import model as model_lib
from lora_dpo.data import Pair
from lora_dpo.errors import LoraDpoError
from lora_dpo.logps import batch_logps
from lora_dpo.recipe import Recipe

_MIB = 1 << 20
# the files that decide a model's log-probs; .py: the code a trust_remote_code model ships
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".json", ".model", ".py")


def cache_root(recipe: Recipe) -> Path:
    return Path(recipe.dpo.reference_cache_dir or model_lib.cache_dir() / "refcache").expanduser()


def _sampled_hash(path: Path, h, with_mtime: bool = False) -> None:
    st = path.stat()
    size = st.st_size
    h.update(f"{path.name}|{size}".encode())
    if with_mtime:  # a file rewritten in place (a merged model saved over the last one) with the same size
        h.update(f"|{st.st_mtime_ns}".encode())
    with path.open("rb") as f:
        for offset in sorted({0, max(0, size // 2 - _MIB // 2), max(0, size - _MIB)}):
            f.seek(offset)
            h.update(f.read(_MIB))


def model_fingerprint(recipe: Recipe) -> dict:
    """Source, revision and a sampled content hash of the base model's files."""
    src = model_lib.resolve_source(recipe.model)
    revision, files = src.revision, []
    if src.kind == "gguf":
        files = [Path(src.path)]
    elif src.kind == "dir":
        files = sorted(p for p in Path(src.path).iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    else:
        try:  # a cached hub snapshot: its folder name is the commit, its files are hashable like a directory
            from huggingface_hub import snapshot_download

            snap = Path(snapshot_download(src.path, revision=src.revision, local_files_only=True))
            revision = snap.name
            files = sorted(p for p in snap.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
        except Exception:  # noqa: BLE001 — not cached locally: the id and revision are all there is
            pass
    h = hashlib.sha256()
    for f in files:  # a hub snapshot's files are immutable blobs named by their commit: their mtime says nothing
        _sampled_hash(f, h, with_mtime=src.kind != "hub")
    return {"source": f"{src.kind}:{src.path}", "revision": revision, "content": h.hexdigest()[:20]}


def data_fingerprint(pairs: list[Pair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()[:20]


# bumped when lora-dpo computes log-probs differently for some model (2: logit_transform): older caches recompute
LOGPS_VERSION = 2


def cache_key(recipe: Recipe, pairs: list[Pair], dtype: torch.dtype, device: torch.device, tokenizer) -> dict:
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "logps_version": LOGPS_VERSION,
        "model": model_fingerprint(recipe),
        "quantization": dataclasses.asdict(recipe.quantization),
        "compute": {"dtype": str(dtype).removeprefix("torch."), "device": device.type},
        "tokenizer": {"vocab": len(tokenizer),
                      "chat_template": hashlib.sha256(template.encode()).hexdigest()[:16],
                      "system_prompt": recipe.data.system_prompt},
        "truncation": {"max_length": recipe.data.max_length, "max_prompt_length": recipe.data.max_prompt_length},
        "data": {"pairs": len(pairs), "tokens": data_fingerprint(pairs)},
    }


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _what_changed(root: Path, key: dict) -> str:
    """The key parts that differ from the closest entry already in the cache, or '' when it is empty."""
    best = None
    for meta in root.glob("*.json") if root.is_dir() else []:
        try:
            other = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(other, dict):  # some other JSON file in the directory
            continue
        diff = [k for k in key if key[k] != other.get(k)]
        best = diff if best is None or len(diff) < len(best) else best
    return ", ".join(best) if best else ""


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as e:
        raise LoraDpoError(f"dpo.reference_cache_dir: cannot write '{root}' ({e.strerror or type(e).__name__}); set "
                           "dpo.reference_cache_dir to a writable directory") from None


class ReferenceCache:
    """Reference (chosen, rejected) log-probs of every training pair, looked up by the pair objects."""

    def __init__(self, pairs: list[Pair], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.position = {id(p): i for i, p in enumerate(pairs)}
        self.chosen, self.rejected = chosen, rejected

    def lookup(self, pairs: list[Pair], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([self.position[id(p)] for p in pairs])
        return batching.to_device(self.chosen[idx], device), batching.to_device(self.rejected[idx], device)


STALE_TEMP_SECONDS = 24 * 3600  # a writer's temp file lives for one save_file call: a day old, its writer died


def _remove_stale_temps(root: Path) -> int:
    """Delete the temp files of writers killed mid-write (SIGKILL skips their cleanup), never a live one; → how
    many. Best effort: a file another process removes first, or one this user may not remove, is left."""
    n, now = 0, time.time()
    for tmp in root.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                tmp.unlink()
                n += 1
        except OSError:
            pass
    return n


@torch.no_grad()
def compute(model, pairs: list[Pair], pad_id: int, batch_size: int, layout: str, device: torch.device,
            autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (N,), rejected (N,)) reference log-probs, fp32 on CPU: adapters off, eval mode, no grad."""
    was_training = model.training
    model.eval()
    pieces = []
    with model_lib.reference_mode(model), heap.frozen():  # a pass over the whole training set: as training runs
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s: s + batch_size]
            with autocast:
                logps, _ = batch_logps(model, batching.build(chunk, pad_id, layout).to(device))
            pieces.append(logps.float().view(2, -1))  # (chosen, rejected) rows of the chunk
    # read back once, after the last batch: on a GPU a read per batch would make each wait for the one before
    both = torch.cat(pieces, dim=1).cpu() if pieces else torch.empty(2, 0)
    model.train(was_training)
    return both[0].contiguous(), both[1].contiguous()


def load_or_compute(recipe: Recipe, model, tokenizer, pairs: list[Pair], *, layout: str, device: torch.device,
                    dtype: torch.dtype, autocast_factory, ctx, say=print) -> tuple[ReferenceCache, bool]:
    """The cache for `pairs`: read from disk on a hit; on a miss computed (sharded over data-parallel processes)
    and written atomically by the main process. Returns (cache, hit)."""
    root = cache_root(recipe)
    key = cache_key(recipe, pairs, dtype, device, tokenizer)
    digest = _digest(key)
    path = root / f"{digest}.safetensors"
    t = None
    if path.is_file():
        try:
            t = load_file(path)
            if not t["chosen"].shape == t["rejected"].shape == (len(pairs),):
                t = None
                say(f"reference log-probs: cache file {path} has the wrong shape; recomputing")
        except Exception as e:  # noqa: BLE001 — a damaged cache file is recomputed, never trusted
            t = None
            say(f"reference log-probs: cache file {path} is unreadable ({type(e).__name__}); recomputing")
    # data parallel: every process must take the same branch, else those computing wait forever in the gather below
    # for those training (another node's own cache directory, a file written between two processes' looks)
    if ctx.enabled and ctx.sum([float(t is None)], device)[0] > 0 and t is not None:
        say("reference log-probs: another process has no usable copy of the cache; recomputing with it")
        t = None
    if t is not None:
        say(f"reference log-probs: cache hit ({len(pairs)} pairs, {path}); no reference forward in training")
        return ReferenceCache(pairs, t["chosen"], t["rejected"]), True
    problem = None  # said before the pass, not after it: the directory must take the result
    if ctx.main:
        try:
            _check_writable(root)
        except LoraDpoError as e:
            problem = e
    # data parallel: the others learn it too, rather than waiting for the main process in the gather after the pass
    if ctx.enabled and ctx.sum([float(problem is not None)], device)[0] > 0 and problem is None:
        problem = LoraDpoError(f"dpo.reference_cache_dir: the main process cannot write '{root}' (its own message "
                               "says why); set dpo.reference_cache_dir to a directory it can write")
    if problem is not None:
        raise problem
    changed = _what_changed(root, key)
    say(f"reference log-probs: cache miss{f' ({changed} changed)' if changed else ''}; computing {len(pairs)} "
        f"pairs once (adapters off, no grad)")
    mine = list(range(ctx.rank, len(pairs), ctx.world))
    bs = recipe.train.per_device_eval_batch_size
    try:
        chosen, rejected = compute(model, [pairs[i] for i in mine], tokenizer.pad_token_id, bs, layout, device,
                                   autocast_factory())
    except torch.cuda.OutOfMemoryError:
        fix = (f"train.per_device_eval_batch_size={bs // 2}" if bs > 1
               else f"data.max_length={max(16, recipe.data.max_length // 2)}")
        raise LoraDpoError(f"out of GPU memory in the reference pass of dpo.reference: precompute ({bs} pairs a "
                           f"batch); set {fix}") from None
    if ctx.enabled:  # every process computed a disjoint shard: a sum gathers them all
        full = torch.zeros(2, len(pairs), dtype=torch.float64)
        full[0, mine], full[1, mine] = chosen.double(), rejected.double()
        full = torch.tensor(ctx.sum(full.flatten().tolist(), device), dtype=torch.float64).view(2, -1)
        chosen, rejected = full[0].float(), full[1].float()
    if ctx.main:
        # a name no other writer has (two runs sharing the directory, in containers whose pids are alike, may both
        # miss), created as save_file creates files: readable by whoever may read the directory
        tmp = root / f".{digest}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(tmp))
            (root / f"{digest}.json").write_text(json.dumps(key, indent=1))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        say(f"reference log-probs: cached in {path}")
        _remove_stale_temps(root)
    ctx.barrier()
    return ReferenceCache(pairs, chosen, rejected), False
