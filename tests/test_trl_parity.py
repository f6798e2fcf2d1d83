"""Parity with the peer: TRL's `DPOTrainer` and lora-dpo agree on the same batch, model and adapter.

Both sides load the same tiny random Llama in 4-bit NF4 (double quant, fp32 compute) — TRL through its own model
loading (`quantization_config=` + `peft_config=`), lora-dpo through `lora_dpo.model.load_base` + `attach_lora` — and
carry the same LoRA adapter (r=8, α=16, all-linear) whose A *and* B matrices are set to identical non-zero seeded
values, so the policy differs from the reference and no loss sits at its zero-margin value. TRL's numbers come from
TRL itself: its tokenised dataset, its collator and train dataloader, `trainer.compute_loss`, the metrics it logs in
`trainer._metrics` and `trainer.compute_ref_log_probs`. lora-dpo's come from `data.tokenize_rows` →
`batching.collate` → `objective.dpo_forward`.

Compared, for "sigmoid", "ipo", "hinge" and "robust", on standard-text rows and on conversational rows:
  * the token ids (prompt / chosen / rejected) of every row, and the collated input ids / attention mask /
    completion mask: the tokenisation, masking and prompt/completion boundary conventions (EOS appended to standard
    text, chat template for conversations, the completion starting where the tokenised prompt and prompt+completion
    first differ — one text row has a prompt ending in a space that merges with the completion);
  * on one padded batch of all rows: the loss, the batch means TRL logs (rewards/chosen, rewards/rejected,
    rewards/margins, rewards/accuracies, logps/chosen, logps/rejected), and d loss / d (every LoRA parameter);
  * pair by pair: policy log-probs, reference log-probs, rewards and the per-pair loss.

Deliberate differences, stated here rather than "fixed":
  * TRL 1.16 ignores `label_smoothing` for "sigmoid"; lora-dpo applies cDPO smoothing there. Sigmoid parity is
    asserted at label_smoothing = 0; `test_sigmoid_label_smoothing_is_a_deliberate_difference` pins both behaviours
    down at ε > 0.
  * TRL casts the LoRA weights of a quantized model to bf16 (the QLoRA paper's recommendation); lora-dpo keeps them
    in fp32. The test writes the same fp32 values into both adapters, which undoes TRL's cast, so what is compared
    is conventions and maths, not adapter precision.
  * lora-dpo's `simpo` and `rpo_alpha` have no counterpart in TRL's DPOTrainer (SimPO lives in CPOTrainer; RPO is
    `loss_type=[..., "sft"]` there, pooled per token), so they are not compared here.

Tolerances: everything runs in fp32 on CPU. The two sides compute the same numbers with different kernels (TRL's
fused, tiled LM head vs lora-dpo's chunked one; a padded batch vs a one-pair batch), which leaves float32 rounding
noise — observed ≤ 1e-5 absolute on summed log-probs of magnitude ~100 and on losses of up to ~40 (IPO).
`rtol=1e-5, atol=1e-4` leaves a wide margin over that noise and stays far below any change of convention (one token
more or less moves a summed log-prob by ~10). Gradients are compared with rtol=1e-4 and an absolute floor of 1e-5 ×
the largest entry.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from conftest import arithmetic_rows, build_tiny  # noqa: E402

from lora_dpo import batching, data  # noqa: E402
from lora_dpo import model as model_lib  # noqa: E402
from lora_dpo.logps import batch_logps  # noqa: E402
from lora_dpo.objective import dpo_forward  # noqa: E402
from lora_dpo.recipe import DataConfig, DpoConfig, LoraConfig, ModelConfig, QuantizationConfig  # noqa: E402

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
WEIGHT_SEED = 20240611
# (loss_type, beta, label_smoothing). TRL's sigmoid ignores label_smoothing, so sigmoid is compared at ε = 0 only.
# Hinge uses a larger β so that some pairs have β·h > 1 and sit on the flat side of relu(1 - β·h).
CASES = [("sigmoid", 0.1, 0.0), ("ipo", 0.1, 0.0), ("hinge", 0.5, 0.0), ("robust", 0.1, 0.1)]
CASE_IDS = [c[0] for c in CASES]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")
RTOL, ATOL = 1e-5, 1e-4


def text_rows() -> list[dict]:
    """Standard text: arithmetic rows plus rows of clearly different lengths, one of them with a prompt that ends in
    a space which merges with the completion's first word (so the completion starts inside the prompt)."""
    return arithmetic_rows(4, seed=3) + [
        {"prompt": "Reply with one word: ", "chosen": "yes", "rejected": "no, not at all, never, under no condition"},
        {"prompt": "Name a colour that is often used for fire engines, stop signs and tomatoes.",
         "chosen": " Red is the usual colour for all three of them.", "rejected": " Blue."},
    ]


def chat_rows() -> list[dict]:
    """Conversations (the ChatML template adds a default system message): one- and multi-turn prompts."""
    def user(text):
        return {"role": "user", "content": text}

    def assistant(text):
        return {"role": "assistant", "content": text}

    return [
        {"prompt": [user("What is 2 plus 3?")], "chosen": [assistant("5.")], "rejected": [assistant("6.")]},
        {"prompt": [user("What is 17 plus 25?")], "chosen": [assistant("17 plus 25 is 42.")],
         "rejected": [assistant("41.")]},
        {"prompt": [user("Say hello.")], "chosen": [assistant("Hello!")],
         "rejected": [assistant("I would rather not say anything at all today, thank you.")]},
        {"prompt": [user("What is 1 plus 1?"), assistant("2."), user("And times 3?")],
         "chosen": [assistant("6.")], "rejected": [assistant("5.")]},
        {"prompt": [user("Name a primary colour.")], "chosen": [assistant("Red.")],
         "rejected": [assistant("Green, which is a primary colour of light but not of paint.")]},
        {"prompt": [user("Is the sky blue on a clear day, and if so, why does it look that way to us?")],
         "chosen": [assistant("Yes: air scatters blue light more than red.")], "rejected": [assistant("No.")]},
    ]


FORMATS = {"text": text_rows, "chat": chat_rows}


def _lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def _assert_not_cpu_packed(model) -> None:
    """Both models only ever run in train mode (dropout is 0, so it computes what eval mode would). On a CPU with
    AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit the first time it runs in eval mode without grad
    (`quant_state.packing_format_for_cpu`): forwards then take another kernel (log-probs move by ~1e-3 per token), no
    gradient flows back through the 4-bit matmul, and `state_dict()` undoes the packing lossily. lora-dpo's
    `load_base` switches that off; TRL does not, so its model must stay out of eval mode here, or the test would
    compare bitsandbytes kernels instead of DPO conventions."""
    packed = [n for n, m in model.named_modules()
              if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]
    assert not packed, f"bitsandbytes repacked these 4-bit layers for CPU inference: {packed[:3]}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The shapes here are tiny: one intra-op thread is as fast, and on a busy 2-core machine it avoids OpenMP
    spin-waiting that makes each forward ~20× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def parity_model_dir(tmp_path_factory, tokenizer):
    """`tiny_model_dir`'s architecture and tokenizer with a wider weight init (0.3 instead of 0.02): at 0.02 every
    next-token distribution is almost uniform, so no adapter can move a log-prob by more than ~0.1 nat and every loss
    sits next to its zero-margin value; at 0.3 the per-pair β·h spread over about ±2."""
    return build_tiny(tmp_path_factory.mktemp("parity") / "model", tokenizer, seed=0, initializer_range=0.3)


# ---------------------------------------------------------------- lora-dpo side


@pytest.fixture(scope="module")
def ours(parity_model_dir):
    """lora-dpo's model: `load_base` (4-bit NF4, fp32 compute) + `attach_lora`, adapter set to seeded values."""
    model_cfg = ModelConfig(name_or_path=str(parity_model_dir))
    base = model_lib.load_base(
        model_cfg,
        QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype="float32"),
        torch.float32, torch.device("cpu"))
    model = model_lib.attach_lora(base, LoraConfig(**LORA), seed=0, gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(WEIGHT_SEED)
    with torch.no_grad():
        for name, p in sorted(_lora_params(model).items()):
            # A scaled like its kaiming init; B (zero at init) non-zero, so policy ≠ reference.
            scale = p.shape[1] ** -0.5 if "lora_A" in name else 1.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in _lora_params(model).values())
    return model, model_lib.load_tokenizer(model_cfg)


def our_batch(rows: list[dict], tokenizer) -> tuple[list[data.Pair], batching.Batch]:
    cfg = DataConfig(train="x.jsonl", max_length=512, max_prompt_length=256)
    pairs, report = data.tokenize_rows(rows, tokenizer, cfg, source="test")
    assert report.kept == len(rows) and not report.dropped
    assert not report.prompt_truncated and not report.completion_truncated
    return pairs, batching.collate(pairs, tokenizer.pad_token_id)


def our_forward(model, batch, loss_type, beta, label_smoothing, *, grad=False):
    model.train()  # never eval mode, see `_assert_not_cpu_packed`
    with torch.set_grad_enabled(grad):
        out = dpo_forward(model, batch, DpoConfig(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing))
    _assert_not_cpu_packed(model)
    return out


# ---------------------------------------------------------------- TRL side


@pytest.fixture(scope="module", params=sorted(FORMATS))
def trl_trainer(request, ours, parity_model_dir, tmp_path_factory):
    """TRL loads and quantizes the model itself and wraps it with a fresh adapter from `peft_config`; the adapter's
    weights are then overwritten with lora-dpo's (in fp32, undoing TRL's bf16 cast of QLoRA adapters)."""
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    fmt = request.param
    rows = FORMATS[fmt]()
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp(f"trl-{fmt}")), per_device_train_batch_size=len(rows),
                     max_length=None, beta=0.1, loss_type="sigmoid", use_cpu=True, bf16=False, fp16=False,
                     report_to="none", dataset_num_proc=None,
                     model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"})
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    # A tokenizer of its own: TRL may set attributes on the one it is given.
    trainer = DPOTrainer(str(parity_model_dir), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(parity_model_dir), quantization_config=bnb,
                         peft_config=PeftLoraConfig(task_type="CAUSAL_LM", bias="none", **LORA))
    # A fresh adapter from peft_config, no "ref" adapter and no ref_model: TRL's reference is the model with its
    # adapters disabled, as in lora-dpo's `reference_mode`.
    assert list(trainer.model.peft_config) == ["default"]
    assert trainer.ref_model is None

    theirs, mine = _lora_params(trainer.model), _lora_params(ours[0])
    assert sorted(theirs) == sorted(mine)
    assert {p.dtype for p in theirs.values()} == {torch.bfloat16}  # TRL's QLoRA convention, undone just below
    for name, p in theirs.items():
        p.data = mine[name].detach().clone()
    return trainer, rows


def trl_batch(trainer):
    """One batch of every row from TRL's own train dataloader (TRL's collator; the order may be shuffled)."""
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == 1
    return trainer._prepare_inputs(batches[0])


def trl_step(trainer, batch, loss_type, beta, label_smoothing, *, grad=False) -> tuple[torch.Tensor, dict]:
    """TRL's `compute_loss` on `batch` → (loss, the metrics TRL logged for this call)."""
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing = beta, label_smoothing
    trainer.model.train()  # never eval mode, see `_assert_not_cpu_packed`; TRL then logs under "train"
    trainer._metrics["train"].clear()
    with torch.set_grad_enabled(grad):
        loss = trainer.compute_loss(trainer.model, batch)
    _assert_not_cpu_packed(trainer.model)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


# ---------------------------------------------------------------- the checks


def test_same_quantized_base_and_adapter(trl_trainer, ours):
    """Both sides hold bit-identical 4-bit weights (packed NF4 + quantization state) and identical adapters."""
    trainer, _ = trl_trainer
    theirs, mine = trainer.model.state_dict(), ours[0].state_dict()
    assert sorted(theirs) == sorted(mine)
    for key, value in mine.items():
        assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), key
    packed = [k for k, v in mine.items() if k.endswith("base_layer.weight") and v.dtype == torch.uint8]
    assert len(packed) == 14  # 7 linear layers × 2 decoder layers, stored as packed 4-bit
    assert all(v.abs().sum() > 0 for k, v in mine.items() if "lora_B" in k)


def test_tokenisation_and_masks_match_trl(trl_trainer, ours):
    """Token ids and the prompt/completion boundary of every row equal TRL's processed dataset; TRL's collator on the
    rows in order builds exactly lora-dpo's batch."""
    trainer, rows = trl_trainer
    pairs, batch = our_batch(rows, ours[1])
    ds = trainer.train_dataset
    assert len(ds) == len(pairs)
    for i, pair in enumerate(pairs):
        assert pair.index == i
        assert pair.prompt_ids == ds[i]["prompt_ids"], f"row {i}: prompt ids differ"
        assert pair.chosen_ids == ds[i]["chosen_ids"], f"row {i}: chosen ids differ"
        assert pair.rejected_ids == ds[i]["rejected_ids"], f"row {i}: rejected ids differ"
    theirs = trainer.data_collator([ds[i] for i in range(len(ds))])
    assert torch.equal(theirs["input_ids"], batch.input_ids)
    assert torch.equal(theirs["attention_mask"], batch.attention_mask)
    assert torch.equal(theirs["completion_mask"].bool(), batch.completion_mask)
    assert len(set(batch.attention_mask.sum(-1).tolist())) > 2  # padding matters: rows of many lengths


@pytest.mark.parametrize("loss_type,beta,label_smoothing", CASES, ids=CASE_IDS)
def test_loss_metrics_and_gradients_match_trl(trl_trainer, ours, loss_type, beta, label_smoothing):
    """One padded batch of every row: the loss, TRL's logged batch means, and d loss / d (every LoRA parameter)."""
    trainer, rows = trl_trainer
    model, tokenizer = ours
    theirs, mine = _lora_params(trainer.model), _lora_params(model)
    for p in (*theirs.values(), *mine.values()):
        p.grad = None
    their_loss, logged = trl_step(trainer, trl_batch(trainer), loss_type, beta, label_smoothing, grad=True)
    our_loss, metrics = our_forward(model, our_batch(rows, tokenizer)[1], loss_type, beta, label_smoothing, grad=True)

    torch.testing.assert_close(our_loss.detach(), their_loss.detach(), rtol=RTOL, atol=ATOL)
    for key in METRICS:
        assert metrics[key].mean().item() == pytest.approx(logged[key], rel=RTOL, abs=ATOL), key
    # Not a trivial case: pairs with margins of both signs, well away from zero.
    margins = metrics["rewards/margins"]
    assert (margins > 0.1).any() and (margins < -0.1).any()
    if loss_type == "hinge":  # both sides of the hinge's kink
        assert (margins > 1).any() and (margins < 1).any()

    their_loss.backward()
    our_loss.backward()
    scale = max(p.grad.abs().max().item() for p in mine.values())
    assert scale > 0
    for name, p in mine.items():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    for p in (*theirs.values(), *mine.values()):
        p.grad = None


def test_per_pair_values_match_trl(trl_trainer, ours):
    """Pair by pair (TRL on one-pair batches, in dataset order, against lora-dpo's padded batch of all pairs):
    policy and reference log-probs, rewards, per-pair loss."""
    trainer, rows = trl_trainer
    model, tokenizer = ours
    _, batch = our_batch(rows, tokenizer)
    _, metrics = our_forward(model, batch, "sigmoid", 0.1, 0.0)
    with model_lib.reference_mode(model):
        ref_c, ref_r = batch_logps(model, batch)[0].chunk(2)
    their_losses = []
    for i in range(len(rows)):
        one = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i]]))
        their_loss, logged = trl_step(trainer, one, "sigmoid", 0.1, 0.0)
        their_losses.append(their_loss.item())
        for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"):
            assert metrics[key][i].item() == pytest.approx(logged[key], rel=RTOL, abs=ATOL), (i, key)
        their_ref_c, their_ref_r = trainer.compute_ref_log_probs(trainer.model, one)  # adapters disabled
        assert ref_c[i].item() == pytest.approx(their_ref_c.item(), rel=RTOL, abs=ATOL), (i, "reference chosen")
        assert ref_r[i].item() == pytest.approx(their_ref_r.item(), rel=RTOL, abs=ATOL), (i, "reference rejected")
    _assert_not_cpu_packed(trainer.model)
    ours_per_pair = -torch.nn.functional.logsigmoid(metrics["rewards/margins"])
    torch.testing.assert_close(ours_per_pair, torch.tensor(their_losses), rtol=RTOL, atol=ATOL)


def test_sigmoid_label_smoothing_is_a_deliberate_difference(trl_trainer, ours):
    """TRL 1.16's sigmoid ignores label_smoothing; lora-dpo applies cDPO: -(1-ε)·logσ(β·h) - ε·logσ(-β·h)."""
    trainer, rows = trl_trainer
    model, tokenizer = ours
    batch, eps = trl_batch(trainer), 0.1
    their_plain, _ = trl_step(trainer, batch, "sigmoid", 0.1, 0.0)
    their_smoothed, logged = trl_step(trainer, batch, "sigmoid", 0.1, eps)
    assert their_smoothed.item() == their_plain.item()  # TRL: ε has no effect on sigmoid

    our_smoothed, metrics = our_forward(model, our_batch(rows, tokenizer)[1], "sigmoid", 0.1, eps)
    logits = metrics["rewards/margins"]  # β·h per pair
    logsigmoid = torch.nn.functional.logsigmoid
    torch.testing.assert_close(our_smoothed, (-(1 - eps) * logsigmoid(logits) - eps * logsigmoid(-logits)).mean(),
                               rtol=RTOL, atol=ATOL)
    assert abs(our_smoothed.item() - their_plain.item()) > 1e-3  # ten times the tolerance: a real difference
    assert metrics["rewards/margins"].mean().item() == pytest.approx(logged["rewards/margins"], rel=RTOL, abs=ATOL)
