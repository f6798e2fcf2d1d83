"""The benchmark scripts' plumbing (their measurements are not asserted: benchmarks measure and print)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv", [
    [],
    ["--steps", "9", "--warmup", "3", "--batch", "16", "--layout", "shared", "--attn", "sdpa_causal",
     "--precision", "fp32", "--checkpointing", "--offload", "both", "--no-group", "--short-prompt", "5",
     "--long-prompt", "700", "--completion", "33"],
])
def test_vs_trl_worker_sees_every_option_it_was_given(argv):
    vs_trl = _script("vs_trl")
    p = vs_trl.parser()
    given = p.parse_args(argv)
    worker = p.parse_args(["--worker", "ours", *vs_trl.worker_args(p, given)])
    for dest, value in vars(given).items():
        if dest not in vs_trl.CONTROLLER_ONLY:
            assert getattr(worker, dest) == value, dest
