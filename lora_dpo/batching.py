"""Pairs → a forward plan. Two layouts compute the same log-probs (tests/test_layouts.py):

- **concatenated** (`Batch`, TRL's layout): rows [chosen_0 … chosen_{B-1}, rejected_0 … rejected_{B-1}], each
  prompt + completion, right-padded; the prompt runs twice per pair.
- **shared** (`SharedBatch`): one segment per pair, [prompt | chosen | rejected]. The rejected part's positions
  restart where the prompt ends and a 4-D mask lets it see the prompt and itself, never the chosen part, so the
  prompt runs once. With `pack`, several pairs share a row (block-diagonal mask), so padding costs almost nothing.

Both expose the scored tokens as `Targets`: for each completion token, the row, the position whose hidden state
predicts it, its own position, and the output slot (k for pair k's chosen, B + k for its rejected).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lora_dpo import attention, blockmask
from lora_dpo.data import Pair

LAYOUTS = ("packed", "shared", "concatenated")
PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1


@dataclass
class Targets:
    rows: torch.Tensor   # (N,) long: row of each scored token
    pred: torch.Tensor   # (N,) long: position whose hidden state predicts the token
    label: torch.Tensor  # (N,) long: position of the token
    seq: torch.Tensor    # (N,) long: output slot in [0, 2B), chosen slots first


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU through pinned memory, asynchronously: a copy from pageable memory waits
    for everything the GPU has queued, so the next micro-batch could not be prepared while it still runs this
    one's backward (torch keeps the pinned buffer until the copy has read it)."""
    if device.type == "cuda" and t.device.type == "cpu":
        pinned = t.pin_memory()
        out = pinned.to(device, non_blocking=True)
        out.host_copy = pinned  # for work that needs it on the host (lora_dpo/offload.py: embeddings in CPU memory)
        return out
    return t.to(device)


def _to(obj, device: torch.device):
    return type(obj)(**{k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in vars(obj).items()
                        if not k.startswith("_")})  # not the memo of model_inputs


@dataclass
class Batch:
    input_ids: torch.Tensor        # (2B, T) long
    attention_mask: torch.Tensor   # (2B, T) long, 1 on real tokens
    completion_mask: torch.Tensor  # (2B, T) bool, True on completion tokens
    indices: list[int]             # source row of each pair, length B
    rows: torch.Tensor             # (N,) long: row of each scored token } found on the host when collated: on a
    pred: torch.Tensor             # (N,) long: position predicting it    } GPU, nonzero() waits for the GPU

    @property
    def num_pairs(self) -> int:
        return len(self.indices)

    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> Batch:
        return _to(self, device)

    def model_inputs(self, attn_implementation: str, dtype: torch.dtype) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def targets(self) -> Targets:
        return Targets(self.rows, self.pred, self.pred + 1, self.rows)

    def token_counts(self) -> torch.Tensor:
        """(2B,) scored tokens per sequence."""
        return self.completion_mask[:, 1:].sum(-1)


@dataclass
class SharedBatch:
    input_ids: torch.Tensor     # (R, T) long
    position_ids: torch.Tensor  # (R, T) long; the rejected part restarts at the prompt length
    slot: torch.Tensor          # (R, T) long: pair slot of each token in [0, B), PAD on padding
    part: torch.Tensor          # (R, T) long: PROMPT, CHOSEN, REJECTED or PAD
    rows: torch.Tensor          # Targets, see the module docstring
    pred: torch.Tensor
    label: torch.Tensor
    seq: torch.Tensor
    indices: list[int]
    seq_len: int                # the longest prompt + completion (a pair's chosen or rejected sequence)

    @property
    def num_pairs(self) -> int:
        return len(self.indices)

    def num_tokens(self) -> int:
        return int((self.slot != PAD).sum())

    def to(self, device: torch.device) -> SharedBatch:
        return _to(self, device)

    def targets(self) -> Targets:
        return Targets(self.rows, self.pred, self.label, self.seq)

    def token_counts(self) -> torch.Tensor:
        return torch.bincount(self.seq, minlength=2 * self.num_pairs)

    def allowed(self, q0: int = 0, q1: int | None = None) -> torch.Tensor:
        """(R, q1 - q0, T) bool: query i (of q0 … q1 - 1) may attend to key j. Same pair, causal, and the chosen and
        rejected parts never see each other. Padding attends to itself only, so no softmax row is empty."""
        s, p = self.slot, self.part
        T = s.shape[1]
        q = torch.arange(q0, T if q1 is None else q1, device=s.device)
        kv = torch.arange(T, device=s.device)
        sq, pq = s[:, q], p[:, q]
        causal = kv[None, :] <= q[:, None]
        same = (sq[:, :, None] == s[:, None, :]) & (s[:, None, :] != PAD)
        visible = (p[:, None, :] == PROMPT) | (pq[:, :, None] == p[:, None, :])
        return (same & visible & causal) | ((kv[None, :] == q[:, None]) & (sq == PAD)[:, :, None])

    def model_inputs(self, attn_implementation: str, dtype: torch.dtype) -> dict:
        """The decoder's inputs. The mask is built once per batch: the policy and reference passes share it (a
        block mask costs a pass over all (query, key) pairs; a dense one holds R·T² bytes)."""
        memo = getattr(self, "_inputs", None)
        if memo is None or memo[0] != (attn_implementation, dtype):
            memo = self._inputs = ((attn_implementation, dtype), self._model_inputs(attn_implementation, dtype))
        return memo[1]

    def _model_inputs(self, attn_implementation: str, dtype: torch.dtype) -> dict:
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if attn_implementation == attention.SDPA_CAUSAL:  # no mask: a gather plan (lora_dpo/attention.py)
            R = self.input_ids.shape[0]
            inputs["attention_mask"] = torch.ones(R, 1, 0, 0, dtype=torch.bool, device=self.slot.device)  # unused;
            # a 4-D mask keeps transformers from building one of its own from the restarting positions
            inputs[attention.PLAN_KWARG] = attention.split_plan(self.slot, self.part, self.position_ids,
                                                                self.num_pairs, self.seq_len)
        elif attn_implementation == "flex_attention":
            inputs["attention_mask"] = self._block_mask()
        elif attn_implementation == "eager":  # eager adds the mask to the scores
            allowed = self.dense_mask()  # (R, 1, T, T)
            inputs["attention_mask"] = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        else:  # sdpa takes a boolean mask, True = attend
            inputs["attention_mask"] = self.dense_mask()
        return inputs

    def dense_mask(self) -> torch.Tensor:
        """(R, 1, T, T) bool, `allowed` filled a band of queries at a time: R·T² bytes, without the several
        R·T²-sized temporaries that evaluating it at once takes."""
        R, T = self.slot.shape
        out = torch.empty(R, 1, T, T, dtype=torch.bool, device=self.slot.device)
        band = max(1, blockmask.BAND_ELEMENTS // max(1, R * T))
        for q0 in range(0, T, band):
            out[:, 0, q0: q0 + band] = self.allowed(q0, min(T, q0 + band))
        return out

    def mask_mod(self):
        """FlexAttention's form of `allowed`: one (row, head, query, key) at a time, inside the kernel."""
        s, p = self.slot, self.part

        def mask_mod(b, h, q, kv):
            same = (s[b, q] == s[b, kv]) & (s[b, kv] != PAD)
            visible = (p[b, kv] == PROMPT) | (p[b, q] == p[b, kv])
            return (same & visible & (kv <= q)) | ((q == kv) & (s[b, q] == PAD))

        return mask_mod

    def _block_mask(self):
        R, T = self.slot.shape
        partial, full = blockmask.block_tables(self.allowed, R, T, self.slot.device)
        return blockmask.from_tables(partial, full, self.mask_mod(), T)


def collate(pairs: list[Pair], pad_token_id: int) -> Batch:
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    prompt_lens = [len(p.prompt_ids) for p in pairs] * 2
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    comp = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, prompt_lens)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        comp[i, n: len(s)] = True
    rows, pred = comp[:, 1:].nonzero(as_tuple=True)  # position t predicts token t + 1
    return Batch(ids, attn, comp, [p.index for p in pairs], rows, pred)


def pair_len(p: Pair) -> int:
    """Tokens of a pair in the prefix-shared row: prompt + chosen + rejected."""
    return len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: pair indices grouped into rows of at most `capacity` tokens (a longer pair gets a row
    of its own). Deterministic: ties keep the input order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        r = next((r for r, free in enumerate(room) if free >= lengths[k]), None)
        if r is None:
            rows.append([k])
            room.append(capacity - lengths[k])
        else:
            rows[r].append(k)
            room[r] -= lengths[k]
    return rows


def collate_shared(pairs: list[Pair], pad_token_id: int, pack: bool = True) -> SharedBatch:
    """One [prompt | chosen | rejected] segment per pair; with `pack`, pairs share rows up to the longest pair's
    length, so padding stays below one pair per batch."""
    B = len(pairs)
    lengths = [pair_len(p) for p in pairs]
    groups = pack_rows(lengths, max(lengths)) if pack else [[k] for k in range(B)]
    T = max(sum(lengths[k] for k in g) for g in groups)
    R = len(groups)
    ids = torch.full((R, T), pad_token_id, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)
    slot = torch.full((R, T), PAD, dtype=torch.long)
    part = torch.full((R, T), PAD, dtype=torch.long)
    rows, pred, label, seq = [], [], [], []  # tensors per completion, concatenated
    for r, group in enumerate(groups):
        o = 0
        for k in sorted(group):
            p = pairs[k]
            P, C, Rj = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
            n = P + C + Rj
            ids[r, o: o + n] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
            pos[r, o: o + n] = torch.cat([torch.arange(P + C), torch.arange(P, P + Rj)])
            slot[r, o: o + n] = k
            part[r, o: o + n] = torch.tensor([PROMPT] * P + [CHOSEN] * C + [REJECTED] * Rj)
            # each completion token is predicted by the token before it in its own sequence; the first one of
            # either completion by the last prompt token (none when the prompt is empty, as in TRL's layout)
            for start, length, out in ((o + P, C, k), (o + P + C, Rj, B + k)):
                lab = torch.arange(start, start + length)
                before = lab - 1
                before[:1] = o + P - 1
                skip = 1 if P == 0 else 0
                label.append(lab[skip:])
                pred.append(before[skip:])
                rows.append(torch.full((length - skip,), r) if length > skip else lab[:0])
                seq.append(torch.full((length - skip,), out) if length > skip else lab[:0])
            o += n
    t = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return SharedBatch(ids, pos, slot, part, t(rows), t(pred), t(label), t(seq), [p.index for p in pairs],
                       max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs))


def build(pairs: list[Pair], pad_token_id: int, layout: str = "packed") -> Batch | SharedBatch:
    """The batch for `layout` (one of LAYOUTS)."""
    if layout == "concatenated":
        return collate(pairs, pad_token_id)
    return collate_shared(pairs, pad_token_id, pack=layout == "packed")


def resolve_layout(layout: str, config, pairs: list[Pair]) -> tuple[str, str | None]:
    """The layout to use with this model, and a note when it differs from the one asked for.

    A custom 4-D mask replaces the model's own masks, sliding windows included, so a model whose sliding window is
    shorter than the longest [prompt | chosen | rejected] segment gets the concatenated layout instead."""
    window = getattr(config, "sliding_window", None)
    active = window and getattr(config, "use_sliding_window", True) is not False
    longest = max((pair_len(p) for p in pairs), default=0)
    if layout != "concatenated" and active and longest > window:
        return "concatenated", (f"train.layout: {layout} → concatenated: the model attends through a {window}-token "
                                f"sliding window and the longest pair spans {longest} tokens")
    return layout, None


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of pair indices for one epoch; a function of (seed, epoch) only, so resume is exact."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


GROUP_WINDOW = 64  # micro-batches per length-sorting window


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = False) -> list[list[int]]:
    """The micro-batches (pair indices) of one epoch; a function of (lengths, seed, epoch) only, so resume is exact.

    The last partial batch is dropped from this epoch only (the next epoch reshuffles), so every optimizer step sees
    the same number of pairs. With `group_by_length`, the shuffled order is cut into windows of GROUP_WINDOW
    batches, each window sorted by pair length and cut into batches, the batches shuffled again, and the epoch's
    longest batch moved first: batches hold pairs of similar length (little padding), their order stays random,
    and a batch too large for memory fails at the first step rather than hours in."""
    per_epoch = max(1, len(lengths) // batch_size)
    order = epoch_order(len(lengths), seed, epoch)[: per_epoch * batch_size]
    if not group_by_length:
        return [order[i * batch_size: (i + 1) * batch_size] for i in range(per_epoch)]
    rng = random.Random(seed * 1_000_003 + epoch + 7_919)
    batches: list[list[int]] = []
    span = GROUP_WINDOW * batch_size
    for w in range(0, len(order), span):
        window = sorted(order[w: w + span], key=lambda i: -lengths[i])
        chunk = [window[i: i + batch_size] for i in range(0, len(window), batch_size)]
        rng.shuffle(chunk)
        batches += chunk
    longest = max(range(len(batches)), key=lambda b: sum(lengths[i] for i in batches[b]))
    batches.insert(0, batches.pop(longest))
    return batches


def epoch_shape(n_pairs: int, batch_size: int, accumulation: int, group_by_length: bool) -> tuple[int, int]:
    """(micro-batches per epoch, pairs each epoch leaves out), as micro_batch_indices cuts its epochs: an epoch ends
    at its last whole batch (or, grouped, its last whole optimizer step); the pairs left over are a different
    random few each epoch, since the next one reshuffles."""
    step, acc = batch_size * accumulation, accumulation
    if n_pairs < step:
        step, acc = batch_size, 1
    per_epoch = max(1, n_pairs // step)
    return per_epoch * acc, max(0, n_pairs - per_epoch * step)


def micro_batch_indices(lengths: list[int], batch_size: int, seed: int, start: int = 0,
                        group_by_length: bool = False, accumulation: int = 1) -> Iterator[list[int]]:
    """Endless stream of micro-batches (pair indices) over shuffled epochs (see epoch_batches), skipping the first
    `start` micro-batches (resume). Epochs are cut into whole optimizer steps (batch_size × accumulation pairs, each
    step then cut into its micro-batches): grouping keeps gradient accumulation equal to the larger batch, and no
    step straddles two epochs."""
    step = batch_size * accumulation
    if len(lengths) < step:  # fewer pairs than one optimizer step: epochs of micro-batches, nothing to group
        step, accumulation, group_by_length = batch_size, 1, False
    per_epoch = max(1, len(lengths) // step)
    k, cached = start, (-1, [])
    while True:
        (epoch, pos), sub = divmod(k // accumulation, per_epoch), k % accumulation
        if cached[0] != epoch:
            cached = (epoch, epoch_batches(lengths, step, seed, epoch, group_by_length))
        yield cached[1][pos][sub * batch_size: (sub + 1) * batch_size]
        k += 1


def micro_batches(pairs: list[Pair], batch_size: int, seed: int, start: int = 0, group_by_length: bool = False,
                  accumulation: int = 1) -> Iterator[list[Pair]]:
    """micro_batch_indices, as pairs."""
    for b in micro_batch_indices([pair_len(p) for p in pairs], batch_size, seed, start, group_by_length,
                                 accumulation):
        yield [pairs[i] for i in b]


def row_tokens(pairs: list[Pair], batches: list[list[int]], layout: str) -> tuple[int, int]:
    """(distinct tokens, tokens the forward runs on) for these batches in `layout`: the difference is padding, and in
    the concatenated layout also the second copy of every prompt."""
    distinct = sum(pair_len(pairs[i]) for b in batches for i in b)
    total = 0
    for b in batches:
        if layout == "concatenated":
            total += 2 * len(b) * max(len(pairs[i].prompt_ids) + max(len(pairs[i].chosen_ids),
                                                                    len(pairs[i].rejected_ids)) for i in b)
            continue
        ls = [pair_len(pairs[i]) for i in b]
        groups = pack_rows(ls, max(ls)) if layout == "packed" else [[k] for k in range(len(ls))]
        total += len(groups) * max(sum(ls[k] for k in g) for g in groups)
    return distinct, total


def describe(pairs: list[Pair], batch_size: int, accumulation: int, seed: int, layout: str,
             group_by_length: bool) -> str:
    """One line on the work of the first epoch: padding in this layout and order, and what TRL's layout would cost."""
    stream = micro_batch_indices([pair_len(p) for p in pairs], batch_size, seed, group_by_length=group_by_length,
                                 accumulation=accumulation)
    micro, _ = epoch_shape(len(pairs), batch_size, accumulation, group_by_length)
    batches = [next(stream) for _ in range(micro)]
    distinct, total = row_tokens(pairs, batches, layout)
    size = (f"{batch_size} pairs" if len(pairs) >= batch_size
            else f"{len(pairs)} pair{'s' * (len(pairs) != 1)} (all there are)")
    line = (f"batches of {size}, {'grouped by length' if group_by_length else 'shuffled'}, layout "
            f"{layout}: {distinct:,} tokens per epoch; ")
    if layout == "concatenated":
        return line + f"the rows hold {total / max(distinct, 1):.2f}× that (each prompt twice, plus padding)"
    _, concat = row_tokens(pairs, batches, "concatenated")
    return line + (f"padding is {1 - distinct / max(total, 1):.1%} of the rows (the concatenated layout would run "
                   f"{concat / max(total, 1):.2f}× the tokens)")


def eval_batches(pairs: list[Pair], batch_size: int) -> Iterator[list[Pair]]:
    for i in range(0, len(pairs), batch_size):
        yield pairs[i: i + batch_size]
