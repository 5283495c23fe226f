"""What a batch carries from one pass to the next besides the weights: the KV cache and each
row's adapter state.

- KVCache: every layer's keys and values in preallocated buffers, written one pass at a time.
  Sequences are left-padded to a common length so that every row writes the same slot at each
  step; `valid` marks the slots that hold real tokens.
- AdapterRows: which adapter each row uses, and PARA's vectors made from each row's prompt.
  A cache carries them, so decoding steps reuse what the prefill made.
- RowSlots: the adapter slot of each row of the pass in progress, where adapters attached to
  the model from outside (para/baselines.py) read it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from para.config import ModelConfig


class PromptVectors(NamedTuple):
    """PARA's three vectors for a batch, each (B, 1, width): they broadcast over positions."""
    q: torch.Tensor    # scales the Q projection's output, width num_heads * head_dim
    v: torch.Tensor    # scales the V projection's output, width num_kv_heads * head_dim
    up: torch.Tensor   # scales the Up projection's output, width intermediate_size

    def index_select(self, index: torch.Tensor) -> PromptVectors:
        return PromptVectors(*(t.index_select(0, index) for t in self))


class AdapterRows:
    """The per-row adapter state of a batch: which adapter each row uses (`which`, an index
    into the installed bank; None: slot 0 for every row) and, per layer, PARA's vectors pooled
    from each row's prompt."""

    def __init__(self, num_layers: int, which: torch.Tensor | None = None):
        self.which = which
        self.vectors: list[PromptVectors | None] = [None] * num_layers

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows at `index`."""
        self.which = None if self.which is None else self.which.index_select(0, index)
        self.vectors = [None if v is None else v.index_select(index) for v in self.vectors]

    def first(self, n: int) -> AdapterRows:
        """The first n rows."""
        rows = AdapterRows(len(self.vectors), None if self.which is None else self.which[:n])
        rows.vectors = [None if v is None else PromptVectors(*(t[:n] for t in v)) for v in self.vectors]
        return rows

    @staticmethod
    def join(parts: list[AdapterRows], pad: int = 0) -> AdapterRows:
        """The parts' rows in order, then `pad` empty rows (slot 0, vectors of ones); every part
        must name each row's adapter."""
        if any(part.which is None for part in parts):
            raise ValueError("joining batches needs each row's adapter (which) on both sides")
        which = [part.which for part in parts]
        joined = AdapterRows(len(parts[0].vectors), torch.cat(which + [which[0].new_zeros(pad)]))
        for layer, vectors in enumerate(zip(*(part.vectors for part in parts))):
            if vectors[0] is not None:   # each of q, v, up: the parts' rows, then `pad` rows of ones
                joined.vectors[layer] = PromptVectors(*(torch.cat([*rows, rows[0].new_ones(pad, *rows[0].shape[1:])])
                                                        for rows in zip(*vectors)))
        return joined


class RowSlots:
    """Which adapter slot each row of the pass in progress uses. Transformer.hidden points
    `rows` at the pass's AdapterRows at its start; adapters attached from outside
    (para/baselines.py), which see only a projection's input, read `which` here. (Pointing, not
    copying `which`: a compiled step then depends on it only where an adapter reads it.)"""

    def __init__(self):
        self.rows: AdapterRows | None = None

    @property
    def which(self) -> torch.Tensor | None:
        """Each row's slot (B,), or None: slot 0 for every row."""
        return None if self.rows is None else self.rows.which


class Span(NamedTuple):
    """Where a pass's T new tokens sit: what attention needs to know about them."""
    positions: torch.Tensor   # (B, T) rotary positions, counted from each row's first real token
    slots: torch.Tensor       # (T,) the slots they occupy (a slot is a key position)
    valid: torch.Tensor       # (B, L) which of the L slots they may attend hold real tokens
    causal: bool              # plain causal attention from slot 0 is right: no mask needed


def whole_sequence(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Span:
    """The Span of a pass without a cache: the tokens are the whole sequence."""
    B, T = input_ids.shape
    valid = torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None \
        else attention_mask.to(device=input_ids.device, dtype=torch.bool)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    causal = attention_mask is None or bool(valid.all())
    return Span(positions, torch.arange(T, device=input_ids.device), valid, causal)


def new_buffers(config: ModelConfig, batch_size: int, max_len: int, device: torch.device,
                dtype: torch.dtype) -> list[torch.Tensor]:
    """A cache's buffers: one k and one v (B, kv_heads, max_len, head_dim) per layer (a compiled
    step writes each in place; a slice of one big buffer would be copied whole), then valid
    (B, max_len), lengths (B,) and filled (1,)."""
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    kv = [torch.empty(shape, device=device, dtype=dtype) for _ in range(2 * config.num_layers)]
    return [*kv, torch.empty(batch_size, max_len, device=device, dtype=torch.bool),
            torch.empty(batch_size, device=device, dtype=torch.long), torch.empty(1, device=device, dtype=torch.long)]


class KVCache:
    """Keys and values of every layer for a batch, preallocated up to `max_len` slots, with the
    batch's AdapterRows.

    `valid` (B, max_len) marks the slots that hold real tokens and `lengths` (B,) counts them:
    each sequence's next rotary position. `pos` (a Python int) is the number of slots filled,
    the same for every row; `filled` is the same number as a tensor. A decoding step (one
    token a row) names its slot by `filled`, and compiled (para/fast.py) attends the whole
    buffer under `valid`: it reads no Python number that changes, so it compiles once, not once
    per position. Longer passes (prefills) write and attend the slots up to theirs.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype, which: torch.Tensor | None = None,
                 allocate: Callable[[KVCache, int, int], list[torch.Tensor]] | None = None):
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        # allocate(cache, batch_size, max_len) -> new_buffers' list; para/fast.py's reuses buffers
        self.allocate = allocate or (lambda cache, batch, slots: new_buffers(config, batch, slots, cache.device, dtype))
        self.rows = AdapterRows(config.num_layers, which)
        self.use_buffers(batch_size, max_len)
        self.pos = 0                # slots filled so far
        self.width = 0              # slots the newest tokens attend
        self.has_padding = False    # any invalid slot so far: then attention needs a mask

    def use_buffers(self, batch_size: int, max_len: int) -> None:
        buffers = self.allocate(self, batch_size, max_len)
        for buffer in buffers:
            buffer.zero_()
        n = self.config.num_layers
        self.k, self.v, (self.valid, self.lengths, self.filled) = buffers[:n], buffers[n:2 * n], buffers[2 * n:]

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def check_room(self, T: int) -> int:
        """The first of the next T slots; a ValueError if they do not fit."""
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.pos + T} needed")
        return self.pos

    def append(self, T: int, attention_mask: torch.Tensor | None) -> Span:
        """Take the next T slots for new tokens (attention_mask (B, T) is False on padding)."""
        if T == 1 and attention_mask is None:   # a decoding step: its slot named by a tensor
            compiled = torch.compiler.is_compiling()
            if not compiled:   # compiled, the caller checks and counts (para/fast.py)
                self.check_room(1)
                self.pos += 1
            positions = self.lengths[:, None].clone()
            self.valid.index_fill_(1, self.filled, True)
            self.lengths += 1
            self.filled += 1
            # Compiled, a step attends the whole buffer under `valid`, so that its shapes never
            # change. Eager, it attends only the slots written, with no mask where no row has
            # padding: the whole buffer under a mask measured 10-24% slower a step at batch 8.
            self.width = self.max_len if compiled else self.pos
            causal = not compiled and not self.has_padding
            return Span(positions, self.filled - 1, self.valid[:, :self.width], causal)
        start = self.check_room(T)
        if attention_mask is None:
            attention_mask = torch.ones(len(self.lengths), T, dtype=torch.bool, device=self.device)
        else:
            attention_mask = attention_mask.to(device=self.device, dtype=torch.bool)
            self.has_padding |= not bool(attention_mask.all())
        positions = (self.lengths[:, None] + attention_mask.long().cumsum(1) - 1).clamp(min=0)
        self.valid[:, start:start + T] = attention_mask
        self.lengths += attention_mask.sum(1)
        self.filled += T
        self.pos = self.width = start + T
        slots = torch.arange(start, start + T, device=self.device)
        return Span(positions, slots, self.valid[:, :self.width], causal=start == 0 and not self.has_padding)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the newest slots' k, v (B, kv_heads, T, head_dim); return the keys and values
        they attend, the first `width` slots."""
        if k.shape[2] == 1:   # the slot named by a tensor (see the class's docstring)
            self.k[layer].index_copy_(2, self.filled - 1, k.to(self.dtype))
            self.v[layer].index_copy_(2, self.filled - 1, v.to(self.dtype))
        else:
            self.k[layer][:, :, self.width - k.shape[2]:self.width] = k
            self.v[layer][:, :, self.width - k.shape[2]:self.width] = v
        return self.k[layer][:, :, :self.width], self.v[layer][:, :, :self.width]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the sequences at `index` (beam search): rows are gathered, never recomputed."""
        if len(index) == len(self.lengths):  # same batch size: move only the slots written so far
            written = slice(0, self.pos)
            for buffer in (*self.k, *self.v):
                buffer[:, :, written] = buffer[:, :, written].index_select(0, index)
            self.valid.copy_(self.valid.index_select(0, index))   # in place: a CUDA graph reads these addresses
            self.lengths.copy_(self.lengths.index_select(0, index))
        else:                              # a new batch size (each prompt becoming its beams)
            old = (*self.k, *self.v, self.valid, self.lengths)
            self.use_buffers(len(index), self.max_len)
            for mine, theirs in zip((*self.k, *self.v, self.valid, self.lengths), old):
                torch.index_select(theirs, 0, index, out=mine)
            self.filled.fill_(self.pos)
        self.rows.reorder(index)

    def join(self, other: KVCache | None, max_len: int, rows: int | None = None, mine: int | None = None,
             allocate: Callable[[KVCache, int, int], list[torch.Tensor]] | None = None) -> KVCache:
        """A new cache with this cache's first `mine` rows (default: all), then `other`'s
        (continuous batching: newcomers join a running batch). Rows are right-aligned, so every
        row writes the same slot next; slots that no row uses any more (padding of rows that
        left) are dropped. `rows` pads the batch with empty rows (a compiled step decodes a few
        batch sizes only); `allocate` as in __init__."""
        parts = [(self, len(self.lengths) if mine is None else mine)] + ([(other, len(other.lengths))] if other else [])
        first_used = [int(c.valid[:n, :c.pos].any(0).nonzero()[0]) for c, n in parts]
        pos = max(c.pos - first for (c, _), first in zip(parts, first_used))
        if max_len < pos:
            raise ValueError(f"a joined cache needs at least {pos} slots")
        used = sum(n for _, n in parts)
        joined = KVCache(self.config, rows or used, max_len, self.device, self.dtype, allocate=allocate)
        start = 0
        for (cache, n), first in zip(parts, first_used):
            end = start + n
            width = cache.pos - first                       # slots still in use, moved to end at `pos`
            for into, buffer in zip((*joined.k, *joined.v), (*cache.k, *cache.v)):   # (B, H_kv, S, D)
                into[start:end, :, pos - width:pos] = buffer[:n, :, first:cache.pos]
            joined.valid[start:end, pos - width:pos] = cache.valid[:n, first:cache.pos]
            joined.lengths[start:end] = cache.lengths[:n]
            start = end
        joined.filled.fill_(pos)
        joined.pos = pos
        joined.has_padding = True
        joined.rows = AdapterRows.join([c.rows.first(n) for c, n in parts], pad=len(joined.lengths) - used)
        return joined
