"""GGUF writing with the `gguf` package (no compiled tool), and the checks that the file reads back right.

Layout follows llama.cpp's llama architecture, which both llama.cpp and transformers' GGUF loader read:
tensor names come from gguf's own name map (`blk.N.attn_q.weight` …), 1-D tensors (norms) stay F32, and the
q/k projection rows are reordered from Hugging Face's rotate-half RoPE layout into llama.cpp's interleaved-pair
layout — the loader undoes exactly this (transformers' `LlamaTensorProcessor._reverse_permute_weights`).
The tokenizer goes in as llama.cpp's "gpt2" (byte-level BPE) vocabulary: tokens, token types, merges, special ids
and the chat template, from which transformers rebuilds the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lora_dpo.errors import LoraDpoError

GGUF_TYPES = ("bf16", "f16", "q8_0")
SUPPORTED_ARCHITECTURES = ("llama",)
_GREEDY_TOKENS = 12


def check_supported(config) -> None:
    """Refuse, before any work, what this writer cannot represent faithfully."""
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise LoraDpoError(f"--format gguf: architecture '{config.model_type}' is not supported (supported: "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}, e.g. SmolLM2, Llama 2/3); export --format merged "
                           "and convert that with llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise LoraDpoError(f"--format gguf: RoPE scaling '{rope_type}' is not supported by this writer; export "
                           "--format merged and convert that with llama.cpp's convert_hf_to_gguf.py")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise LoraDpoError("--format gguf: llama models with attention or MLP biases are not supported; export "
                           "--format merged instead")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _to_llama_cpp_rope_order(w: np.ndarray, n_head: int) -> np.ndarray:
    """(n_head·head_dim, in) rows: per head, HF keeps the two RoPE halves apart, llama.cpp interleaves them."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(name: str, w: np.ndarray, gguf_type: str, fallbacks: list[str]):
    """→ (array for the writer, raw GGML type or None)."""
    import gguf

    if w.ndim == 1:
        return w.astype(np.float32), None
    if gguf_type == "f16":
        return w.astype(np.float16), None
    if gguf_type == "bf16":
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if w.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
        fallbacks.append(name)  # rows must be whole 32-value blocks; llama.cpp's converter falls back the same way
        return w.astype(np.float16), None
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def detect_pre(tokenizer) -> tuple[str, str | None]:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer → (name, note when it is a guess)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2", None  # llama.cpp's name for the GPT-2 split pattern
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm", None  # digits split one by one before the GPT-2 pattern (StarCoder/SmolLM family)
    if kinds == ["Split", "ByteLevel"] and "\\p{N}{1,3}" in json.dumps(steps[0]):
        return "llama-bpe", None
    return "default", (f"pre-tokenizer {kinds} not recognised; written as 'default' (llama.cpp may split text "
                       "differently from the Hugging Face tokenizer)")


def _add_tokenizer(writer, tokenizer, vocab_size: int, pre: str) -> None:
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    byte_level = "ByteLevel" in json.dumps(backend.get("pre_tokenizer")) or "ByteLevel" in json.dumps(
        backend.get("decoder"))
    if model.get("type") != "BPE" or not byte_level:
        raise LoraDpoError(f"--format gguf: only byte-level BPE tokenizers (llama.cpp 'gpt2': SmolLM2, Llama 3, "
                           f"Qwen …) are supported, this one is {model.get('type')}; export --format merged instead")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise LoraDpoError(f"--format gguf: the tokenizer has {len(vocab)} tokens but the model only {vocab_size} "
                           "embeddings; resize the embeddings or export --format merged")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows without a token (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model, tokenizer, path: Path, gguf_type: str = "bf16", name: str = "model",
               pre: str | None = None) -> dict:
    """Write a llama-architecture HF model (any float dtype) and its tokenizer as one GGUF file → info dict."""
    import gguf

    cfg = model.config
    check_supported(cfg)
    n_head, n_kv, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_head
    note = None
    if pre is None:
        pre, note = detect_pre(tokenizer)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    ftype = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    writer.add_file_type(ftype)
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, cfg.vocab_size, pre)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    fallbacks: list[str] = []
    written = {}
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output.weight; transformers ties on load
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(stem)
        if gguf_name is None:
            raise AssertionError(f"no GGUF name for tensor {hf_name}")
        gguf_name = f"{gguf_name}.{suffix}"
        heads = (n_head if "attn_q" in gguf_name else n_kv) if gguf_name.endswith(
            ("attn_q.weight", "attn_k.weight")) else None
        data, raw = _encode(gguf_name, _gguf_layout(t, heads), gguf_type, fallbacks)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
        written[gguf_name] = (hf_name, heads)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = {"gguf_file": path.name, "gguf_type": gguf_type, "tokenizer_pre": pre, "tensors": len(written),
            "f16_fallback_tensors": fallbacks}
    if note:
        info["tokenizer_note"] = note
    return info | {"_written": written}


def _gguf_layout(t: torch.Tensor, heads: int | None) -> np.ndarray:
    w = t.detach().float().cpu().numpy()
    return w if heads is None else _to_llama_cpp_rope_order(w, heads)


def read_back(path: Path, model, written: dict[str, tuple[str, int | None]]) -> dict:
    """Read the file with gguf.GGUFReader: same tensor names and shapes, values within the type's rounding."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    found = {t.name: t for t in reader.tensors}
    if arch != "llama" or set(found) != set(written):
        missing, unexpected = sorted(set(written) - set(found))[:3], sorted(set(found) - set(written))[:3]
        raise AssertionError(f"GGUF read-back: architecture {arch}, tensors missing {missing}, unexpected {unexpected}")
    state = model.state_dict()
    worst = 0.0
    for name, t in found.items():
        want = _gguf_layout(state[written[name][0]], written[name][1])
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        scale = float(np.abs(want).max()) or 1.0
        worst = max(worst, float(np.abs(values - want).max()) / scale)
    return {"read_back": {"tensors": len(found), "max_abs_err_relative_to_tensor_max": worst,
                          "types": sorted({t.tensor_type.name for t in found.values()})}}


@torch.no_grad()
def greedy_tokens(model, prompts: list[list[int]], eos_id: int | None, n: int = _GREEDY_TOKENS) -> list[list[int]]:
    """Greedy continuations, one prompt at a time (no padding, so nothing but the model can differ)."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                           pad_token_id=eos_id, eos_token_id=eos_id)
        out.append(g[0, len(p):].tolist())
    return out


def write_and_verify(merged, tokenizer, tmp: Path, gguf_type: str, recipe, prompts: list[list[int]]):
    """Write the GGUF, read it back, reload it with transformers' GGUF loader and compare greedy tokens with the
    merged model → (the reloaded model, info for parity.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_dpo import model as model_lib

    pre = None
    src = model_lib.resolve_source(recipe.model)
    if src.kind == "gguf":  # a .gguf base: keep the pre-tokenizer name its file gave
        import gguf

        field = gguf.GGUFReader(src.path).fields.get("tokenizer.ggml.pre")
        pre = field.contents() if field is not None else None
    path = tmp / f"model-{gguf_type}.gguf"
    info = write_gguf(merged, tokenizer, path, gguf_type, name=Path(recipe.output.dir).name, pre=pre)
    written = info.pop("_written")
    info.update(read_back(path, merged, written))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32)
    eos = tokenizer.eos_token_id
    want, got = greedy_tokens(merged, prompts, eos), greedy_tokens(reloaded, prompts, eos)
    info["greedy_tokens_vs_merged"] = {"prompts": len(prompts), "equal": sum(a == b for a, b in zip(want, got)),
                                       "new_tokens": _GREEDY_TOKENS}
    rebuilt = AutoTokenizer.from_pretrained(tmp, gguf_file=path.name)
    texts = [tokenizer.decode(p) for p in prompts]
    same = sum(rebuilt(t, add_special_tokens=False)["input_ids"] == tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in texts)
    info["tokenizer_rebuilt_from_gguf"] = {"texts": len(texts), "same_token_ids": same,
                                           "chat_template": rebuilt.chat_template == tokenizer.chat_template}
    return reloaded, info
