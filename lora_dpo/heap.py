"""Python's cyclic garbage collector, kept out of the training steps.

Once torch, transformers, peft and bitsandbytes are imported and a model is loaded, the interpreter tracks half a
million to a million container objects (those libraries' functions, dicts, tuples, modules). Each collection of
the oldest generation walks all of them, 0.1-0.6 s on one core (benchmarks/RESULTS.md), and whenever the objects
the steps create trigger one, it lands in whatever step is running, which then takes that much longer while the
GPU waits. (On an H200 one 4-pair step in each run took 1.1-1.2 s against 0.6-0.8 s for the rest: the suspect,
which the benchmark now records.) Freezing what is alive when the loop starts (`gc.freeze`) puts it out of the
collector's walks; the loop's own garbage is still collected, and reference counting frees everything else as
before. Nothing is frozen for good: the objects go back when the block ends.
"""

from __future__ import annotations

import contextlib
import gc

_depth = 0  # frozen() blocks open now: only the outermost freezes and unfreezes


@contextlib.contextmanager
def frozen():
    """Collects once, then keeps every object alive now out of the collector's walks until the block ends."""
    global _depth
    if _depth == 0:
        gc.collect()  # what is garbage already is freed, not frozen
        gc.freeze()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.unfreeze()
