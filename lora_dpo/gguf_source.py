"""A .gguf file as a model source: dequantized once into a cached Hugging Face directory that lora-dpo can
re-quantize and train, and its tokenizer with the special tokens the file declares."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lora_dpo.errors import LoraDpoError


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def gguf_to_hf_dir(gguf: str | Path) -> Path:
    """Dequantize a .gguf file once into a cached Hugging Face directory (safetensors) that can be re-quantized.

    transformers loads GGUF dequantized but marks the model as GGUF-quantized and refuses to train or save it, so
    the weights are moved into a fresh model built from the same config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = Path(gguf)
    out = gguf_cache_dir(gguf)
    if (out / "config.json").is_file():
        return out
    print(f"converting {gguf.name} to a Hugging Face checkpoint (once) → {out}", flush=True)
    try:
        tok = gguf_tokenizer(gguf)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any parser failure means the file is unusable
        raise LoraDpoError(f"model.name_or_path: cannot read GGUF file '{gguf}' ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160] if str(e) else ''}); is it a complete, "
                           "uncorrupted .gguf model?") from None
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "model_type", "transformers_version")},
                                  model_type=loaded.config.model_type)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process (data parallel) finished the same conversion first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


GGUF_CONVERSION = 2  # part of the cache key: 2 = special tokens from the file's metadata (older caches redone)


def gguf_cache_dir(gguf: Path) -> Path:
    from lora_dpo.model import cache_dir

    return cache_dir() / "gguf" / f"{gguf.stem}-{_file_key(gguf)}-c{GGUF_CONVERSION}"


def gguf_tokenizer(gguf: Path):
    """The tokenizer inside a GGUF file, its special tokens as the file declares them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _special_tokens_from_gguf(tok, gguf)
    return tok


def gguf_special_token_ids(gguf: Path) -> dict[str, int]:
    """The special-token ids a GGUF file declares (bos, eos, unk, pad), from its metadata."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    out = {}
    for name, key in keys.items():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None and field.data:
            out[name] = int(field.parts[field.data[0]][0])
    return out


def _special_tokens_from_gguf(tok, gguf: Path) -> None:
    """Set the tokenizer's special tokens from the file's metadata: some transformers releases (5.17 among them)
    convert a GGUF tokenizer with the wrong eos (SmolLM2's came out as <|im_start|>), which would end every
    completion with the wrong token. Each correction is printed."""
    for name, token_id in gguf_special_token_ids(gguf).items():
        if token_id >= len(tok):
            continue
        token, key = tok.convert_ids_to_tokens(token_id), f"{name}_token"
        was = tok.special_tokens_map.get(key)
        if was != token:
            print(f"{gguf.name}: {key} set to {token!r} (id {token_id}) from the file's metadata, was {was!r}",
                  flush=True)
            tok.add_special_tokens({key: token})  # already in the vocabulary: nothing is added, the role is set
