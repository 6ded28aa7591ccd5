"""Presence, frequency and repetition penalties, applied sparsely: each penalized row touches only the
logits of the tokens it has seen (gathered, penalized, scattered back), never its whole vocabulary row.

State per KV slot, on the device and kept incrementally (nothing is rebuilt per step, nothing waits for
the device): the distinct token ids the row has seen, prompt included, in a fixed [slots, max_tokens]
table; how often each was generated; how many entries are valid; and where each vocabulary id sits in the
slot's table (-1: not seen), so that counting a step's drawn tokens costs one lookup per row, not a scan
of its table. Past the valid entries a slot's table repeats its first id with a count of 0, so that a
step can read a rectangle of the table whose width the host knows without a sync (an upper bound:
distinct prompt ids + tokens generated), and the padding writes the same value to the same logit as the
first entry does.
"""
from __future__ import annotations

import numpy as np
import torch

from .sequence import GenerationRow

NEUTRAL = (1.0, 0.0, 0.0)  # repetition, presence and frequency penalties that change no logit


class PenalizedRows:
    """A step's penalized rows: their positions in its rows / logits and their slots (int64 host arrays),
    and on the device, made when first asked (a step whose tokens the runner picked, or one counted on
    the host's views, needs neither)."""

    __slots__ = ("host_index", "host_slots", "_state", "_index", "_slots")

    def __init__(self, state: "PenaltyState", host_index: np.ndarray, host_slots: np.ndarray):
        self.host_index, self.host_slots, self._state = host_index, host_slots, state
        self._index = self._slots = None

    @property
    def index(self) -> torch.Tensor:
        if self._index is None:
            self._index = self._state.to_device(self.host_index)
        return self._index

    @property
    def slots(self) -> torch.Tensor:
        if self._slots is None:
            self._slots = self._state.to_device(self.host_slots)
        return self._slots

    @property
    def width(self) -> int:
        """The widest table among them: how many entries a step reads per row."""
        return int(self._state.bound[self.host_slots].max())


class AllRows:
    """Slots [0, n) as a step's rows (row i in slot i) at the tables' full width: what a pass over fixed
    shapes penalizes, whichever of them ask for a penalty (the others hold neutral ones)."""

    __slots__ = ("index", "slots", "width")

    def __init__(self, n: int, width: int, device: torch.device):
        self.index = self.slots = torch.arange(n, device=device)
        self.width = width


class PenaltyState:
    """Seen token ids and generation counts per KV slot of `max_tokens` positions (a row's distinct ids
    never outnumber its tokens), each slot's penalties, and the entry of each of the `vocab` ids. Allocated
    on the first penalized row: 12 bytes per slot position and 2 per slot and vocabulary id (256 slots x
    5,121 positions and 151,936 ids: 16 + 78 MB; 16 slots, a CPU's default: 6 MB), where dense counts took
    5 bytes per slot and vocabulary id (195 MB) and a step's work grew with the rows' whole vocabulary."""

    def __init__(self, slots: int, max_tokens: int, vocab: int, device: torch.device, host_tables: bool | None = None):
        self.ids = torch.zeros((slots, max_tokens), dtype=torch.long, device=device)
        entry_type = torch.int16 if max_tokens <= torch.iinfo(torch.int16).max else torch.int32
        self.entry = torch.full((slots, vocab), -1, dtype=entry_type, device=device)
        self.counts = torch.zeros((slots, max_tokens), dtype=torch.float32, device=device)
        self.valid = torch.zeros(slots, dtype=torch.long, device=device)
        # repetition, presence, frequency; neutral (1, 0, 0) in a slot whose row asks for none, so that a pass
        # over every slot (PickGraphs) changes nothing there
        self.params = torch.tensor(NEUTRAL, dtype=torch.float32).repeat(slots, 1).to(device)
        # On the host, per slot: an upper bound of `valid` (it grows by one per counted token).
        self.bound = np.zeros(slots, dtype=np.int64)
        self.device = device
        # On a CPU, counting goes through numpy views of the same tables: a few numpy indexing operations
        # where torch's take ~40 us a step, most of a thin step's host time (the views share the memory).
        host_tables = device.type == "cpu" if host_tables is None else host_tables
        self._host = (self.ids.numpy(), self.entry.numpy(), self.counts.numpy(), self.valid.numpy(),
                      self.params.numpy()) if host_tables else None

    def reset(self, row: GenerationRow) -> None:
        """A row entered its slot: its prompt's distinct ids seen, nothing generated yet. Only what the slot's
        previous row wrote is cleared (its entries, up to its bound), not the slot's whole vocabulary row:
        a [vocab] fill per admitted row was most of a short request's engine time."""
        seen = np.array(sorted(set(row.prompt_ids)), dtype=np.int64)  # np.unique costs more at a prompt's size
        n, slot = len(seen), row.slot
        used = int(self.bound[slot])
        sampling = row.sampling
        params = (sampling.repetition_penalty, sampling.presence_penalty, sampling.frequency_penalty)
        if self._host is not None:
            ids, entry, counts, valid, _ = self._host
            entry[slot, ids[slot, :used]] = -1  # past the previous row's valid entries: its first id, also its own
            counts[slot, :used] = 0.0
            ids[slot, :n] = seen
            ids[slot, n:] = seen[0]
            entry[slot, seen] = np.arange(n)
            valid[slot] = n
        else:
            distinct = torch.from_numpy(seen).to(self.device, non_blocking=True)  # copied to the device once
            self.entry[slot, self.ids[slot, :used]] = -1
            self.counts[slot, :used] = 0.0
            self.ids[slot, n:] = int(seen[0])
            self.ids[slot, :n] = distinct
            self.entry[slot, distinct] = torch.arange(n, dtype=self.entry.dtype, device=self.device)
            self.valid[slot] = n
        self._set_params(slot, params)
        self.bound[slot] = n

    def neutral(self, slot: int) -> None:
        """The slot's row asks for no penalty: a pass over every slot leaves its logits as they are."""
        self._set_params(slot, NEUTRAL)

    def _set_params(self, slot: int, params: tuple[float, float, float]) -> None:
        if self._host is not None:
            self._host[4][slot] = params
        else:
            self.params[slot] = torch.tensor(params)

    def select(self, at: np.ndarray, host_slots: np.ndarray) -> PenalizedRows:
        """A step's penalized rows: their positions `at` among its rows, and their slots (both int64)."""
        return PenalizedRows(self, at, host_slots)

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        return tensor if self.device.type == "cpu" else tensor.to(self.device, non_blocking=True)

    def apply(self, logits: torch.Tensor, rows: PenalizedRows) -> torch.Tensor:
        """Float32 logits with the penalized rows' penalties applied, the others' unchanged. Float32 logits
        are changed in place (the step's own, read by nobody after the draw); others are copied first."""
        logits = logits if logits.dtype == torch.float32 else logits.float()
        slots, width = rows.slots, rows.width
        params = self.params[slots]
        repetition, presence, frequency = (params[:, i:i + 1] for i in range(3))
        ids = self.ids[slots, :width]
        counts = self.counts[slots, :width]
        at = rows.index[:, None]
        seen = logits[at, ids]
        # As in CTRL and transformers: a seen token's logit is divided by the penalty when positive,
        # multiplied when negative, so that it always becomes less likely.
        penalized = torch.where(seen > 0, seen / repetition, seen * repetition)
        penalized = penalized - presence * (counts > 0) - frequency * counts
        # Padding entries (past a slot's valid ones) hold the slot's first id: write that id's value there too.
        padding = torch.arange(width, device=self.device) >= self.valid[slots, None]
        logits[at, ids] = torch.where(padding, penalized[:, :1], penalized)
        return logits

    def count(self, rows: PenalizedRows, tokens: torch.Tensor) -> None:
        """The step's drawn tokens (on the device, aligned with the step's rows) join the penalized rows'
        counts: a token seen before counts once more where it is; a new one takes the slot's next entry."""
        if self._host is not None:
            return self._count_on_host(rows, tokens.numpy())
        slots = rows.slots
        drawn = tokens.index_select(0, rows.index)
        seen_at = self.entry[slots, drawn].long()
        known = seen_at >= 0
        valid = self.valid[slots]
        at = torch.where(known, seen_at, valid)
        self.ids[slots, at] = drawn
        self.entry[slots, drawn] = at.to(self.entry.dtype)
        self.counts.index_put_((slots, at), torch.ones_like(drawn, dtype=torch.float32), accumulate=True)
        self.valid[slots] = valid + (~known).long()
        self.bound[rows.host_slots] += 1

    def count_masked(self, rows: "AllRows", tokens: torch.Tensor, counted: torch.Tensor) -> None:
        """count() for every slot of `rows` (tokens aligned with them), where only the slots whose
        `counted` is true change: fixed shapes and no host values, for a captured pass. The host's
        `bound` is the caller's to advance."""
        slots, drawn = rows.slots, tokens
        seen_at = self.entry[slots, drawn].long()
        known = seen_at >= 0
        valid = self.valid[slots]
        # A slot not counted may have a full table: its index is kept in range, and what it writes is what is there.
        at = torch.where(known, seen_at, valid).clamp_(max=self.ids.shape[1] - 1)
        self.ids[slots, at] = torch.where(counted, drawn, self.ids[slots, at])
        self.entry[slots, drawn] = torch.where(counted, at, seen_at).to(self.entry.dtype)
        self.counts[slots, at] = self.counts[slots, at] + counted.float()  # each slot once: no index repeats
        self.valid[slots] = valid + (counted & ~known).long()

    def _count_on_host(self, rows: PenalizedRows, tokens: np.ndarray) -> None:
        """count() on the CPU's numpy views (each slot appears once in a step: no index repeats)."""
        ids, entry, counts, valid, _ = self._host
        slots = rows.host_slots
        drawn = tokens[rows.host_index]
        seen_at = entry[slots, drawn]
        known = seen_at >= 0
        at = np.where(known, seen_at, valid[slots])
        ids[slots, at] = drawn
        entry[slots, drawn] = at
        counts[slots, at] += 1.0
        valid[slots] += ~known
        self.bound[slots] += 1
