"""The FlexAttention block mask of a prefix-shared batch, built without an (R, T, T) tensor.

torch's `create_block_mask` evaluates the mask function on every (row, query, key) triple at once: ~11 bytes per
triple at its peak (R·T² int64 sums), e.g. 5.9 GB for 8 rows of 8,192 tokens, before the forward starts. Here the
same tables (which 128×128 blocks are partly or fully visible) come from the dense mask a band of query blocks at a
time, so the transient memory stays near BAND_ELEMENTS bytes whatever the length; the kernel then evaluates the
same mask function inside the partial blocks. tests/test_layouts.py checks the tables equal torch's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BLOCK = 128               # FlexAttention's default sparse block size
BAND_ELEMENTS = 1 << 24   # (row, query, key) triples evaluated at a time: 16 MiB of bools


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, n) bool → (count of True, indices with the True ones first in ascending order), int32, as FlexAttention
    stores its block tables."""
    count = dense.sum(-1, dtype=torch.int32)
    order = torch.argsort(dense.to(torch.int32), dim=-1, descending=True, stable=True)  # as torch sorts them
    return count, order.to(torch.int32).contiguous()


def block_tables(allowed_band: Callable[[int, int], torch.Tensor], rows: int, T: int, device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) (R, nQ, nK) bool from `allowed_band(q0, q1)` → (R, q1 - q0, T) bool visibility."""
    n = -(-T // BLOCK)
    pad = n * BLOCK - T
    band = max(1, BAND_ELEMENTS // max(1, rows * BLOCK * n * BLOCK))  # query blocks per band
    partial = torch.zeros(rows, n, n, dtype=torch.bool, device=device)
    full = torch.zeros_like(partial)
    for i in range(0, n, band):
        q0, q1 = i * BLOCK, min(T, (i + band) * BLOCK)
        a = allowed_band(q0, q1)
        nb = -(-(q1 - q0) // BLOCK)
        a = torch.nn.functional.pad(a, (0, pad, 0, nb * BLOCK - (q1 - q0)))  # outside the sequence: not visible
        a = a.view(rows, nb, BLOCK, n, BLOCK)
        some, every = a.any(4).any(2), a.all(4).all(2)
        partial[:, i: i + nb] = some & ~every
        full[:, i: i + nb] = every
    return partial, full


def from_tables(partial: torch.Tensor, full: torch.Tensor, mask_mod, T: int):
    from torch.nn.attention.flex_attention import BlockMask

    kv_num, kv_idx = _ordered(partial[:, None])
    full_num, full_idx = _ordered(full[:, None])
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(T, T))
