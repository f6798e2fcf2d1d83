"""Who sets a training step's pace on a GPU: the GPU, or the host feeding it.

On CUDA the host queues a step's work (Python, dispatch, kernel launches) and the GPU runs it behind; the host waits
for the GPU where the step's results and its gradient norm are read back (lora_dpo/train.py). The share of the step
the host spends in those waits says which side is the bottleneck: a large share, the GPU is busy and the host waits
for it; near zero, the GPU had finished before the host asked, so it sat idle while the host queued. Small steps on
a fast GPU (short pairs, few pairs per micro-batch, small models) end up there. Logged as `host_wait_share` on CUDA
runs (a CPU computes as it queues: there is nothing to wait for) and said once, with what uses the GPU better, when
a logging window's share is under WAITING. The loop's first WARMUP steps (a resumed run's too) are left out: they
compile kernels and grow the allocator.
"""

from __future__ import annotations

import contextlib
import time

WARMUP = 2  # steps left out of the measure
WAITING = 0.1  # under this share of a step spent waiting for the GPU, the GPU waited for the host


class Pace:
    """Host time per step and the part of it spent waiting for the GPU, over a logging window."""

    def __init__(self, device, enabled: bool | None = None, compiled: bool = False, all_recompute: bool = False
                 ) -> None:
        self.enabled = device.type == "cuda" if enabled is None else enabled
        self.compiled = compiled  # train.compile is on: the note does not suggest it
        self.all_recompute = all_recompute  # every layer recomputes by the recipe's choice, not auto's: it may say so
        self.wait = self.total = 0.0
        self.first = self.last = None  # the window's measured steps
        self.span = (None, None)  # those of the last window taken
        self.said = False
        self._step = self._t0 = self._begin = None

    def start(self, step: int) -> None:
        self._begin = step if self._begin is None else self._begin
        self._step, self._t0 = step, time.perf_counter()

    def _measured(self) -> bool:
        return self._step is not None and self._step >= self._begin + WARMUP

    @contextlib.contextmanager
    def reading(self):
        """Around a read of the step's results: the host's wait for the GPU."""
        t = time.perf_counter()
        try:
            yield
        finally:
            if self._measured():
                self.wait += time.perf_counter() - t

    def end(self) -> None:
        if self._measured():
            self.total += time.perf_counter() - self._t0
            self.first = self.first or self._step
            self.last = self._step

    def take(self) -> dict:
        """The window's `host_wait_share` (nothing on a CPU or for a window of warm-up steps only); starts anew."""
        out = {}
        if self.enabled and self.total > 0:
            out = {"host_wait_share": min(self.wait / self.total, 1.0)}
            self.span = (self.first, self.last)
        self.wait = self.total = 0.0
        self.first = self.last = None
        return out

    def note(self, row: dict) -> str | None:
        """Once per run, when a logged window's GPU waited for the host: what keeps it busier."""
        share = row.get("host_wait_share")
        if self.said or share is None or share >= WAITING:
            return None
        self.said = True
        first, last = self.span
        steps = f"step {first}" if first == last else f"steps {first}-{last}"
        ways = ["more pairs per micro-batch (train.per_device_train_batch_size; `lora-dpo estimate` names the most "
                "that fit)"]
        if self.all_recompute:  # each recomputed layer is a second forward's worth of Python and launches
            ways.append("fewer recomputing layers (train.gradient_checkpointing_layers: auto keeps the activations of "
                        "as many as fit; recomputing every layer adds ~30 % to a step's operator calls)")
        if not self.compiled:
            ways.append("train.compile: true (fused kernels launched from generated code: +36 % pairs/s on an H200's "
                        "short-prompt steps, for ~25 s of compiling in the first steps)")
        return (f"note: the GPU waited for the host in {steps}: the host spent {share:.0%} of each step waiting for "
                f"the GPU, so the GPU finished first and sat idle while Python queued the next work. Keeping it "
                f"busier: {'; '.join(ways)}")
