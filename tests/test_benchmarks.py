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
     "--long-prompt", "700", "--completion", "33", "--compile", "--trainers", "ours"],
])
def test_vs_trl_worker_sees_every_option_it_was_given(argv):
    vs_trl = _script("vs_trl")
    p = vs_trl.parser()
    given = p.parse_args(argv)
    worker = p.parse_args(["--worker", "ours", *vs_trl.worker_args(p, given)])
    for dest, value in vars(given).items():
        if dest not in vs_trl.CONTROLLER_ONLY:
            assert getattr(worker, dest) == value, dest


def _targets():
    spec = importlib.util.spec_from_file_location("bench_targets", ROOT / "benchmarks" / "gpu" / "targets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _side(pairs_per_s: float, peak_gib: float) -> dict:
    return {"pairs_per_s": pairs_per_s, "tokens_per_s": 100 * pairs_per_s, "peak_bytes": int(peak_gib * 2**30),
            "resident_bytes": 0, "losses": [0.6931, 0.69, 0.68]}


def test_targets_judge_a_stage_only_when_both_trainers_ran(tmp_path, capsys, monkeypatch):
    """The kit writes each stage's JSON after every worker, so a stage its time limit stops leaves one side only:
    that is reported as incomplete, not judged (and does not crash the summary of the other stages)."""
    import json

    meta = {"machine": "NVIDIA H200 (test)", "cuda": True, "n_params": 8_000_000_000, "precision": "auto",
            "attn": "flex_attention"}
    (tmp_path / "long.json").write_text(json.dumps({"meta": meta, "results": {"long": {
        "ours": [_side(4.4, 7.0)], "trl": [_side(2.0, 12.0)]}}}))
    (tmp_path / "short.json").write_text(json.dumps({"meta": meta, "results": {"short": {"ours": [_side(4, 7)]}}}))
    # a variant stage run with --trainers ours: judged against the long stage's TRL run
    (tmp_path / "long-offload.json").write_text(json.dumps({"meta": {**meta, "offload": "both"}, "results": {
        "long": {"ours": [_side(4.0, 6.9)]}}}))
    (tmp_path / "offload.json").write_text(json.dumps([{
        "attn": "flex_attention", "checkpointing": "on", "offload": "both", "device": "cuda", "peak_bytes": 6 * 2**30,
        "predicted_bytes": int(6.3 * 2**30), "prompt_tokens": 1024, "completion_tokens": 1024}]))
    monkeypatch.setattr("sys.argv", ["targets.py", str(tmp_path)])
    _targets().main()
    out = capsys.readouterr().out
    assert "| long prompts (flex_attention): pairs/s ≥ 2.0× TRL | 2.20× | ✓ |" in out
    assert "| long prompts (flex_attention): peak ≤ 0.6× TRL | 0.58 (7.00 vs 12.00 GiB) | ✓ |" in out
    assert "short prompts (flex_attention): lora-dpo vs TRL | incomplete (only lora-dpo ran) | — |" in out
    assert "| long prompts, lora-dpo offloading to CPU memory (flex_attention): peak ≤ 0.6× TRL | 0.57 (6.90 vs " \
           "12.00 GiB) | ✓ |" in out
    assert "2×2048-token pairs (flex_attention, checkpointing on, offloaded: both): peak ≤ 12 GiB | 6.00 GiB | ✓" in out


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM"),
    ("nvjet_hsh_192x192_64x4_1x2_h_bz_coopA_NNT", "GEMM"),
    ("aten::mm", "GEMM"),
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*)", "4-bit weights"),
    ("bitsandbytes::gemm_4bit", "4-bit weights"),
    ("triton_tem_fused_flex_attention_0", "attention"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t>>", "attention"),
    ("Memcpy DtoH (Device -> Pinned)", "copies"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise"),
])
def test_profile_sorts_kernels_into_kinds(name, kind):
    """profile_step.py's time-by-kind summary (what the GPU kit's profile stage reports): cuBLAS/CUTLASS GEMMs, the
    4-bit dequantize, attention kernels (flex's Triton template, flash), copies and the rest apart."""
    assert _script("profile_step").kind_of(name).startswith(kind)


def test_profile_steps_recompute_as_training_does(tiny_model_dir, monkeypatch, capsys):
    """profile_step.py's checkpointed steps recompute every layer, as the training loop's do (its steps once ran
    without: the loaded layers stayed in eval mode, where transformers checkpoints nothing), and its options run:
    the loop's work around a step, new lengths every step then the same again."""
    import sys

    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--model", str(tiny_model_dir), "--shapes", "4x4",
                                      "--steps", "2", "--warmup", "1", "--rows", "0",
                                      "--settings", "packed:sdpa,packed:sdpa:vary:loop"])
    from lora_dpo.preflight import flushing_denormals

    with flushing_denormals():  # the script flushes subnormal floats process-wide, as training does: restored after
        _script("profile_step").main()
    out = capsys.readouterr().out
    assert "gradient checkpointing: 2 of 2 decoder layers recompute in backward" in out
    assert "| 4+2×4 | packed:sdpa | " in out
    assert "packed:sdpa:vary:loop (new lengths)" in out and "packed:sdpa:vary:loop (lengths seen)" in out
    assert out.count("operator calls: ") == 2
