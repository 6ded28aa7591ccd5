"""Decode's inputs in fixed device buffers that the captured graphs read (tokens, positions, write_at,
lengths: one column per slot), written from one pinned host buffer in place each step (no tensors built
from lists) and copied with one non-blocking transfer."""
from __future__ import annotations

import torch

from .flight import CopyFence

PAD_TOKEN = 0


class DecodeInputs:
    def __init__(self, slots: int, scratch: int, device: torch.device):
        # A slot that decodes nothing: token 0 at position 0, its key written to scratch, one key attended.
        self.idle_row = (PAD_TOKEN, 0, scratch, 1)
        self.device_rows = torch.zeros((4, slots), dtype=torch.long, device=device)
        self._staging = torch.zeros((4, slots), dtype=torch.long, pin_memory=device.type == "cuda")
        self._staging_np = self._staging.numpy()
        self._idle_column = torch.tensor(self.idle_row)[:, None].numpy()
        # Idle unless steps overlap; otherwise reusing the buffer is safe: each step ends in a host sync.
        self.fence = CopyFence()

    def write(self, n: int, rows: dict[int, tuple[int, int]], locations) -> None:
        """Slots [0, n) idle but for `rows` (slot -> (input token, position)), whose keys go to `locations`
        (a function of their slots and positions); then the copy to the device."""
        self.fence.wait()
        staging = self._staging_np
        staging[:, :n] = self._idle_column
        slots = list(rows)
        tokens, positions = zip(*rows.values())
        staging[0, slots] = tokens
        staging[1, slots] = positions
        staging[2, slots] = locations(slots, positions)
        staging[3, slots] = [p + 1 for p in positions]
        self.device_rows[:, :n].copy_(self._staging[:, :n], non_blocking=True)
        self.fence.copied()

    def feed(self, n: int, fed: torch.Tensor) -> None:
        """Input tokens FED (-1) taken on the device from `fed`, the previous step's tokens by slot."""
        tokens = self.device_rows[0, :min(n, fed.shape[0])]
        tokens.copy_(torch.where(tokens < 0, fed[:tokens.shape[0]], tokens))

    def idle_all(self) -> None:
        self.device_rows[:] = torch.tensor(self.idle_row, device=self.device_rows.device)[:, None]
