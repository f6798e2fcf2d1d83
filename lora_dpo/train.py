"""setup → step-0 check → loop (accumulate, clip, step, log, eval, checkpoint) → final adapter.

Read top to bottom: this is the order things happen in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import resource
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_dpo import (
    batching,
    checkpoints,
    data,
    distributed,
    heap,
    losses,
    offload,
    preflight,
    prequantized,
    refcache,
    tracking,
)
from lora_dpo import compile as compile_blocks
from lora_dpo import model as model_lib
from lora_dpo.errors import LoraDpoError, TrainingStopped
from lora_dpo.evaluate import evaluate_pairs, print_before_after, snapshot, snapshots_json
from lora_dpo.logps import causal_lm, model_inputs
from lora_dpo.objective import MetricMeter, dpo_forward, step0_check
from lora_dpo.optim import epochs_line, make_optimizer, make_scheduler, total_steps  # noqa: F401
from lora_dpo.pace import Pace
from lora_dpo.recipe import Recipe, recipe_from_dict, recipe_notes, warmup_note
from lora_dpo.report import write_report


@dataclass
class RunResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    step0_loss: float | None
    history: list[dict] = field(default_factory=list)
    eval_metrics: dict = field(default_factory=dict)
    stopped: str | None = None  # "SIGINT"/"SIGTERM" when a signal ended the run early (a checkpoint was written)

    @property
    def final_metrics(self) -> dict:
        return self.history[-1] if self.history else {}


@dataclass
class MicroBatch:
    """A micro-batch ready for its step: on the device, its mask built, its tokens counted on the host."""
    batch: batching.Batch | batching.SharedBatch
    tokens: int
    reference: tuple | None  # precomputed reference log-probs (dpo.reference: precompute)


# ---------------------------------------------------------------- setup helpers

def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------- the run

def run(recipe: Recipe) -> RunResult:
    """Train as the recipe says. Raises LoraDpoError on bad input (before any model loads, where it can be known),
    TrainingStopped when Ctrl-C / SIGTERM stopped it after a checkpoint. Leaves the process as it found it: warning
    filters and the CPU's subnormal-float mode are restored on return."""
    # the recipe may have been edited in Python since it was loaded: check it again, as loading did
    recipe = recipe_from_dict(recipe.to_dict())
    with warnings.catch_warnings(), preflight.flushing_denormals():
        # bitsandbytes' CPU 4-bit kernel has no registered autograd kernel; the gradient w.r.t. its input is still
        # correct (tests/test_model.py compares against the dequantized twin), so the warning is noise for users
        warnings.filterwarnings("ignore", message=r"bitsandbytes::gemv_4bit: an autograd kernel")
        # a skipped step (fp16 overflow, non-finite loss) still advances the schedule, on purpose: torch's warning
        # about the scheduler stepping before the optimizer would only alarm
        warnings.filterwarnings("ignore",
                                message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
        return _setup_and_run(recipe)


def _setup_and_run(recipe: Recipe) -> RunResult:
    tcfg = recipe.train
    device, dtype = model_lib.device_and_dtype(tcfg.precision, tcfg.device)
    if recipe.model.attn_implementation == "flex_attention" and device.type == "cpu":
        raise LoraDpoError("model.attn_implementation: flex_attention cannot train on CPU (torch has no FlexAttention "
                           "backward there); use sdpa (the same log-probs), or train on a CUDA GPU")
    ctx = distributed.setup(device)
    # only the writer checks the run directory: another process could otherwise see the one rank 0 just made
    out = preflight.prepare_output_dir(recipe) if ctx.main else Path(recipe.output.dir)
    tracking.check_available(tcfg.report_to)
    if device.type == "cuda" and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
    ckpt = None  # found and checked against this recipe before any model loads
    if tcfg.resume_from_checkpoint:
        ckpt = checkpoints.resolve(out, tcfg.resume_from_checkpoint)
        checkpoints.check_resumable(recipe, ckpt, out)
    try:
        return _run(recipe, out, device, dtype, ctx, ckpt)
    finally:
        ctx.close()


def _run(recipe: Recipe, out: Path, device: torch.device, dtype: torch.dtype, ctx: distributed.Context,
         ckpt: Path | None) -> RunResult:
    tcfg, dcfg = recipe.train, recipe.dpo
    say = ctx.print
    for note in recipe_notes(recipe):
        say(f"note: {note}")
    random.seed(tcfg.seed)
    torch.manual_seed(tcfg.seed)

    # data first: it fails fast and cheaply on bad files, before any model is loaded
    train_rows, eval_rows = data.read_data(recipe.data)
    tokenizer = model_lib.load_tokenizer(recipe.model)
    prepared = data.prepare(recipe.data, tokenizer, train_rows, eval_rows, say)  # prints the report; on_problem
    train_pairs, eval_pairs = prepared.train_pairs, prepared.eval_pairs
    preflight.check_context(recipe, train_pairs, eval_pairs)
    fingerprint = refcache.data_fingerprint(train_pairs)  # checkpoints hold it: a resume trains on the same pairs
    if ckpt:
        checkpoints.check_same_data(ckpt, fingerprint)

    policy = _load_policy(recipe, device, dtype, ctx, train_pairs)
    params = [p for p in policy.parameters() if p.requires_grad]
    layout, note = batching.resolve_layout(tcfg.layout, causal_lm(policy).config, train_pairs)
    if note:
        say(note)
    refs = None  # precomputed reference log-probs: training then runs no reference forward
    if dcfg.reference == "precompute" and dcfg.loss_type not in losses.REFERENCE_FREE:
        refs, _ = refcache.load_or_compute(recipe, policy, tokenizer, train_pairs, layout=layout, device=device,
                                           dtype=dtype, autocast_factory=lambda: model_lib.autocast(device, dtype),
                                           ctx=ctx, say=say)
    ref_of = (lambda chunk: refs.lookup(chunk, device)) if refs else (lambda chunk: None)

    global_batch = tcfg.per_device_train_batch_size * ctx.world  # pairs per micro-batch, all processes together
    say(batching.describe(train_pairs, global_batch, tcfg.gradient_accumulation_steps, tcfg.seed, layout,
                          tcfg.group_by_length))
    steps = total_steps(tcfg, len(train_pairs), ctx.world)
    say(epochs_line(tcfg, len(train_pairs), steps, ctx.world))
    if tcfg.max_steps < 0 and (note := warmup_note(tcfg, steps)):  # max_steps set: said with the recipe's notes
        say(f"note: {note}")
    optimizer = make_optimizer(policy, tcfg)
    scheduler = make_scheduler(optimizer, tcfg, steps)
    pad_id = tokenizer.pad_token_id

    start, history, resumed = 0, [], {}
    if ckpt:
        resumed = checkpoints.load(ckpt, policy, optimizer, scheduler)
        start = resumed["step"]
        history = [m for m in tracking.read_metrics(out) if m["step"] <= start]
        say(f"resumed from {ckpt} at step {start}/{steps}")
    if ctx.main:
        if not tcfg.resume_from_checkpoint and out.exists():
            preflight.clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(recipe.to_yaml())
        prepared.save(out)  # data_report.json, data_report.txt
        _write_metrics(out, history)
    trackers = tracking.open_trackers(tcfg.report_to, out) if ctx.main else []

    def batches_from(k: int):  # micro-batch k onwards; a function of the seed only, so resume is exact
        return batching.micro_batches(train_pairs, global_batch, tcfg.seed, start=k, group_by_length=tcfg.
                                      group_by_length, accumulation=tcfg.gradient_accumulation_steps)

    stream = batches_from(start * tcfg.gradient_accumulation_steps)
    step0 = None
    if start == 0:
        first = ctx.shard(next(batches_from(0)))
        with model_lib.autocast(device, dtype):  # as the training steps run
            step0 = step0_check(policy, batching.build(first, pad_id, layout).to(device), dcfg, say, ref_of(first),
                                dtype)
    before = None
    if eval_pairs and start == 0 and ctx.main:
        before = snapshot(policy, tokenizer, eval_pairs, recipe, device)  # policy == reference here
        say(f"held-out, before training: {before.summary()}")

    policy.train()
    meter, tokens, t_window = MetricMeter(), 0, time.perf_counter()
    if resumed.get("meter") and ctx.main:  # the logging window the checkpoint fell in (all processes' sums)
        vars(meter).update(resumed["meter"])
    bar = _progress(steps, start, enabled=ctx.main)
    nonfinite, last_ckpt = resumed.get("nonfinite", 0), None  # skipped steps count across a resume
    # fp16 has 5 exponent bits: small gradients underflow to 0 unless the loss is scaled up first
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    if scaler and resumed.get("grad_scaler"):  # the calibrated scale, so a resume does not re-learn it
        scaler.load_state_dict(resumed["grad_scaler"])
    def prepare() -> MicroBatch:  # the host's share of the next micro-batch; on a GPU nothing in it waits for the GPU
        chunk = ctx.shard(next(stream))
        host = batching.build(chunk, pad_id, layout)
        batch = host.to(device)
        model_inputs(policy, batch)  # its attention mask, memoised on the batch
        offload.look_up_ahead(causal_lm(policy), batch.input_ids)  # embeddings kept in CPU memory: looked up now
        return MicroBatch(batch, host.num_tokens(), ref_of(chunk))

    layers = model_lib.decoder_layers(policy)
    all_recompute = (tcfg.gradient_checkpointing and tcfg.gradient_checkpointing_layers != "auto" and bool(layers)
                     and all(layer.gradient_checkpointing for layer in layers))
    upcoming, pace = None, Pace(device, compiled=tcfg.compile, all_recompute=all_recompute)  # from the loop's third
    # step: the first ones compile kernels
    with _StopSignal() as stop, heap.frozen():  # no full collection walking the libraries' objects mid-step
        for step in range(start + 1, steps + 1):
            step_meter, step_tokens, results, at = MetricMeter(), 0, [], step
            pace.start(step)
            try:
                for _ in range(tcfg.gradient_accumulation_steps):
                    micro, upcoming = upcoming or prepare(), None
                    with model_lib.autocast(device, dtype):
                        loss, metrics = dpo_forward(policy, micro.batch, dcfg, micro.reference)
                    part = loss / tcfg.gradient_accumulation_steps
                    (scaler.scale(part) if scaler else part).backward()
                    results.append((loss.detach(), metrics))
                    step_tokens += micro.tokens
                if step < steps:  # the next step's first micro-batch, prepared while the GPU runs this backward
                    at = step + 1  # whose batch it is, should it not fit
                    upcoming = prepare()
                with pace.reading():  # the step's first wait for the GPU: its results read back
                    for loss, metrics in results:
                        step_meter.add(loss, metrics)
            except torch.cuda.OutOfMemoryError:
                raise LoraDpoError(_oom_message(recipe, at, offload.embeddings_movable(policy))) from None
            ctx.average_grads(params)
            if scaler:
                scaler.unscale_(optimizer)
            with pace.reading():  # waits for the gradients' all-reduce (data parallel) and the norm
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm or float("inf")))
            lr = scheduler.get_last_lr()[0]
            # with a loss scaler an overflowing gradient is its calibration, not a data problem: it skips the step
            overflow = bool(scaler) and math.isfinite(step_meter.loss_sum) and not math.isfinite(grad_norm)
            bad = not overflow and not (math.isfinite(step_meter.loss_sum) and math.isfinite(grad_norm))
            if ctx.sum([float(bad)], device)[0] > 0:  # every process skips the same steps
                nonfinite += 1
                say(f"warning: step {step}: non-finite loss or gradient (loss {step_meter.loss_sum:.4g}, grad norm "
                    f"{grad_norm:.4g}); step skipped ({nonfinite}/{tcfg.max_nonfinite_steps})")
                if nonfinite >= tcfg.max_nonfinite_steps:
                    raise LoraDpoError(_nonfinite_message(step, nonfinite, last_ckpt, start))
            elif overflow:
                scaler.update()  # lowers the scale; the step is skipped
            else:
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                meter.merge(step_meter)
                tokens += step_tokens
            scheduler.step()  # the schedule follows the step count, skipped steps included
            optimizer.zero_grad(set_to_none=True)
            pace.end()
            bar.update(1)

            eval_step = bool(eval_pairs and tcfg.eval_steps and step % tcfg.eval_steps == 0)
            if ((step % tcfg.logging_steps == 0 or step == steps or eval_step)  # an eval step is logged, with its row
                    and ctx.sum([meter.batches], device)[0] > 0):
                elapsed = time.perf_counter() - t_window
                meter.reduce(ctx, device)
                tokens = ctx.sum([tokens], device)[0]
                row = {"step": step, **meter.result(), "learning_rate": lr, "grad_norm": grad_norm,
                       "tokens_per_second": tokens / max(elapsed, 1e-9), "peak_memory_mb": peak_memory_mb(device),
                       **pace.take()}
                if eval_step and step != steps and ctx.main:
                    row.update(evaluate_pairs(policy, eval_pairs, dcfg, tcfg.per_device_eval_batch_size, pad_id,
                                              device))
                history.append(row)
                if ctx.main:
                    _log(out, row, trackers, bar)
                    if note := pace.note(row):
                        bar.write(note)
                meter, tokens, t_window = MetricMeter(), 0, time.perf_counter()
            stopping = ctx.sum([float(stop.requested is not None)], device)[0] > 0 and step != steps
            if (tcfg.save_steps and step % tcfg.save_steps == 0 and step != steps) or stopping:
                window = MetricMeter()  # the logging window so far, so a resumed run logs its row as this one would
                window.merge(meter)
                window.reduce(ctx, device)
                if ctx.main:
                    state = {"steps": steps, "grad_scaler": scaler.state_dict() if scaler else None,
                             "recipe": recipe.to_dict(), "meter": vars(window), "data_fingerprint": fingerprint,
                             "nonfinite": nonfinite}
                    last_ckpt = checkpoints.save(out, step, policy, optimizer, scheduler, state, tcfg.save_total_limit)
                    bar.write(f"checkpoint {last_ckpt}")
            if stopping:
                bar.close()
                message = (f"stopped by {stop.requested} at step {step}/{steps}; checkpoint {last_ckpt}. Resume with: "
                           f"lora-dpo RECIPE.yaml train.resume_from_checkpoint=latest")
                say(message)
                if ctx.main:
                    write_report(out)  # the curves so far
                ctx.barrier()
                adapter = checkpoints.checkpoint_dir(out, step) / "adapter"
                raise TrainingStopped(message, RunResult(out, adapter, step, step0, history, {},
                                                         stopped=stop.requested))
    bar.close()

    eval_metrics = {}
    if ctx.main:
        eval_metrics = _finish(recipe, out, policy, tokenizer, device, eval_rows, eval_pairs, before, history, say)
        for tracker in trackers:
            if eval_metrics:  # the held-out numbers after training: the trackers' last row, as metrics.jsonl's
                tracker.log({"step": history[-1]["step"], **eval_metrics})
            tracker.close()
    ctx.barrier()
    return RunResult(out, out / "adapter", steps, step0, history, eval_metrics)


def _load_policy(recipe: Recipe, device: torch.device, dtype: torch.dtype, ctx: distributed.Context,
                 train_pairs: list):
    """The base model with a fresh adapter, saying what was loaded: precision, attention kernel, LoRA size and
    checkpointed layers."""
    tcfg, q, say = recipe.train, recipe.quantization, ctx.print
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    stored = model_lib.stored_quantization(recipe.model)
    notes = prequantized.check(recipe.model.name_or_path, stored, q)  # raises where the recipe cannot apply
    as_stored = ", stored so" if stored else ""
    kind = (f"4-bit {prequantized.quant_type(stored, q)}{as_stored}, {precision} compute" if q.load_in_4bit
            else f"8-bit{as_stored}, {precision} compute" if q.load_in_8bit else precision)
    where = f"{ctx.world} processes on {device.type}" if ctx.enabled else str(device)
    say(f"loading {recipe.model.name_or_path} ({kind}) on {where}")
    for note in notes:
        say(f"note: {note}")
    base = model_lib.load_base(recipe.model, q, dtype, device, tcfg.layout, stored=stored)
    dropped = model_lib.disable_dropout(base)
    if dropped:
        say(f"the model's dropout is off for DPO (the reference pass must be the policy's function): "
            f"{', '.join(dropped)}")
    if recipe.model.offload_embeddings:
        say(offload.offload_embeddings(base))
    share, why = tcfg.gradient_checkpointing_layers, ""
    if tcfg.gradient_checkpointing and share == "auto":
        share, why = _auto_checkpoint_share(recipe, base, device, train_pairs)
    elif tcfg.gradient_checkpointing:
        why = _fewer_would_fit(recipe, base, device, train_pairs, share)
    policy = model_lib.attach_lora(base, recipe.lora, seed=tcfg.seed, gradient_checkpointing=tcfg.
                                   gradient_checkpointing, checkpoint_share=share)
    attn = causal_lm(policy).config._attn_implementation
    say(f"attention: {attn}" + (" (auto)" if recipe.model.attn_implementation == "auto" else "")
        + ("; its kernels compile during the first step, once for all lengths" if attn == "flex_attention" else ""))
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    say(f"LoRA r={recipe.lora.r}: {trainable:,} trainable parameters")
    if tcfg.gradient_checkpointing:
        flags = [layer.gradient_checkpointing for layer in model_lib.decoder_layers(policy)]
        say(f"gradient checkpointing: {sum(flags)} of {len(flags)} decoder layers recompute in backward{why}")
    if tcfg.offload_activations:
        say(offload.offload_checkpointed_inputs(policy, model_lib.decoder_layers(policy), device))
    if tcfg.compile:
        n = compile_blocks.compile_layers(model_lib.decoder_layers(policy), device)
        say(f"torch.compile: the attention and MLP of each decoder layer ({n} blocks); the first steps compile")
    return policy


def _auto_checkpoint_share(recipe: Recipe, base, device: torch.device, pairs: list) -> tuple[float, str]:
    """train.gradient_checkpointing_layers auto → (share, the reason to print): the fewest recomputing layers that
    `lora-dpo estimate` says fit in this GPU with estimate.AUTO_SPARE of it to spare, for micro-batches as long as
    the training pairs can make (estimate.for_data); all layers on a CPU."""
    from lora_dpo.estimate import AUTO_SPARE, Arch, as_stored, estimate_for, for_data, gib

    if device.type != "cuda":
        return 1.0, " (auto: all, on a CPU)"
    total = torch.cuda.get_device_properties(device).total_memory
    try:
        planned = as_stored(for_data(recipe, pairs), prequantized.stored(base.config))  # as the base is quantized
        est = estimate_for(planned, total, arch=Arch.from_config(base.config))
    except LoraDpoError as e:  # a model family the planner does not model: the safe choice, said
        return 1.0, f" (auto: all, since {str(e).split(': ', 1)[-1]})"
    return est.checkpointed_layers / est.layers, (
        f" (auto: the fewest that fit, predicted peak {gib(est.total)} of {gib(total)} with {AUTO_SPARE:.0%} to spare)"
        if est.fits and est.total <= (1 - AUTO_SPARE) * total else
        f" (auto: all, and even so the predicted peak is {gib(est.total)} of {gib(total)}; see lora-dpo estimate)")


def _fewer_would_fit(recipe: Recipe, base, device: torch.device, pairs: list, share: float) -> str:
    """With the share of recomputing layers a recipe chose, on a GPU: what auto would recompute instead, to print,
    when that is fewer (each layer left out saves its recompute: faster steps); "" otherwise."""
    from lora_dpo.estimate import AUTO_SPARE
    from lora_dpo.recipe import checkpointed_layers

    if device.type != "cuda":
        return ""
    n = len(model_lib.decoder_layers(base))
    as_auto = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, gradient_checkpointing_layers="auto"))
    try:
        fewer = checkpointed_layers(True, _auto_checkpoint_share(as_auto, base, device, pairs)[0], n)
    except Exception:  # noqa: BLE001 — a hint: a model the planner trips over trains as the recipe says, unhinted
        return ""
    if fewer >= checkpointed_layers(True, share, n):
        return ""
    return (f" (train.gradient_checkpointing_layers: auto would recompute {fewer} of them on this GPU, predicted to "
            f"fit with {AUTO_SPARE:.0%} of its memory to spare: faster steps)")


def _finish(recipe: Recipe, out: Path, policy, tokenizer, device: torch.device, eval_rows, eval_pairs, before,
            history: list, say) -> dict:
    """After the last step, on the main process: held-out evaluation (before vs after), the adapter, the report and
    the exports. → the held-out metrics."""
    eval_metrics = {}
    if eval_pairs:
        after = snapshot(policy, tokenizer, eval_pairs, recipe, device)  # one held-out pass serves both
        eval_metrics = after.strict
        history[-1].update(eval_metrics)
        _write_metrics(out, history)
        before = before or snapshot(policy, tokenizer, eval_pairs, recipe, device, reference=True)
        print_before_after(before, after, eval_rows, eval_pairs, recipe.evaluation.generations)
        report = snapshots_json(data.source_label(recipe.data, "eval"), eval_pairs, eval_rows, before, after)
        (out / "eval.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    adapter_dir = out / "adapter"
    checkpoints.atomic_dir(adapter_dir, lambda tmp: (policy.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    say(f"adapter written to {adapter_dir}")
    say(f"report written to {write_report(out)}")
    if recipe.output.export:
        from lora_dpo.export import export

        for fmt in recipe.output.export:  # from the files just written, as `lora-dpo export` reads them
            export(out, format=fmt, force=True)  # an older export here belonged to the run replaced above
    return eval_metrics


# ---------------------------------------------------------------- stopping well

class _StopSignal:
    """SIGINT (Ctrl-C) and SIGTERM ask the loop to checkpoint and stop after the current step; a second Ctrl-C
    stops at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing this step, writing a checkpoint, then stopping "
              "(Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _nonfinite_message(step: int, count: int, last_ckpt: Path | None, start: int) -> str:
    where = f"the last good checkpoint {last_ckpt} is intact" if last_ckpt else (
        "no checkpoint was written in this run" + (f" (it resumed from step {start})" if start else ""))
    return (f"training stopped at step {step}: {count} steps had a non-finite (NaN/Inf) loss or gradient; likely "
            "causes: train.learning_rate too high, fp16 overflow (use train.precision bf16 or fp32), or a data row "
            f"that breaks the model; {where}")


def _oom_message(recipe: Recipe, step: int, embeddings_movable: bool = False) -> str:
    t = recipe.train
    hints = [f"train.per_device_train_batch_size={max(1, t.per_device_train_batch_size // 2)} with "
             f"train.gradient_accumulation_steps={t.gradient_accumulation_steps * 2}"]
    if not t.gradient_checkpointing:
        hints.append("train.gradient_checkpointing=true")
    if embeddings_movable:
        hints.append("model.offload_embeddings=true")
    hints.append(f"data.max_length={max(16, recipe.data.max_length // 2)}")
    return (f"out of GPU memory at step {step}; try " + ", or ".join(hints)
            + " (`lora-dpo estimate RECIPE.yaml --gpu-memory SIZE` plans what fits)")


# ---------------------------------------------------------------- logging plumbing

def _progress(steps: int, start: int, enabled: bool = True):
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                mininterval=0.5 if tty else 30, disable=not enabled)


def _log(out: Path, row: dict, trackers: list, bar) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}",
                    margin=f"{row['rewards/margins']:.3f}", refresh=False)
    if not sys.stderr.isatty():
        bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    for tracker in trackers:
        tracker.log(row)


def _write_metrics(out: Path, rows: list[dict]) -> None:
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
