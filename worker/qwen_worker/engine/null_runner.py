"""A runner whose passes do no arithmetic (QAIO_NULL_MODEL): it answers every pass at once with tokens from a
fixed cycle and label scores from another, so that what a benchmark measures is the host path around the
model (HTTP, the protocol, the scheduler, the blocks, streaming, detokenising), never the model."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .model_runner import PrefillChunk

# Label scores (negative, neutral, positive logits) a sentiment text gets, by its length and last token.
LABEL_CYCLE = ((2.0, 0.0, -1.0), (-1.0, 0.5, 2.5), (0.0, 1.5, 0.5), (-2.0, -0.5, 1.0), (1.0, 0.0, 0.2))


class NullRunner:
    """ModelRunner's interface over no weights and no KV memory: a row's token at position p is
    cycle[p % len(cycle)], so replies are varied, real text, and equal for equal prompt lengths."""

    picks_tokens = True  # passes return the chosen token ids, not logits
    device = torch.device("cpu")
    dtype = torch.float32
    block_bytes = 0
    compiled = False
    capture_seconds = 0.0
    graph_replays = 0

    def __init__(self, cycle: Sequence[int], *, vocab_size: int, slots: int, max_tokens: int, block_tokens: int,
                 score_slots: int = 0):
        if not cycle:
            raise ValueError("the null model needs a non-empty token cycle")
        self.cycle = np.asarray(cycle, dtype=np.int64)
        self.vocab_size = vocab_size
        self.slots = slots
        self.score_slots = score_slots
        self.max_tokens = max_tokens
        self.block_tokens = block_tokens
        self.graphs: dict = {}
        self.label_cycle = np.array(LABEL_CYCLE, dtype=np.float32)

    def capture_graphs(self) -> None:
        pass

    def disable_compile(self) -> None:
        pass

    def set_blocks(self, slot: int, blocks: Sequence[int]) -> None:
        pass  # no memory behind the blocks: the scheduler's bookkeeping of them is what runs

    def copy_blocks(self, pairs) -> None:
        pass

    def _at(self, positions) -> np.ndarray:
        return self.cycle[np.asarray(positions, dtype=np.int64) % len(self.cycle)]

    def fence_copies(self) -> None:
        pass  # no copies to the device

    def decode(self, rows: dict[int, tuple[int, int]], width: int, fed=None) -> tuple[None, torch.Tensor]:
        """Each row's next token (the one after its input's position, whatever the input: a FED input is
        as good as any); padding slots get the cycle's first."""
        tokens = np.full(width, self.cycle[0], dtype=np.int64)
        slots = np.fromiter(rows, dtype=np.int64, count=len(rows))
        positions = np.fromiter((position for _, position in rows.values()), dtype=np.int64, count=len(rows))
        tokens[slots] = self._at(positions + 1)
        return None, torch.from_numpy(tokens)

    def prefill(self, chunks: Sequence[PrefillChunk]) -> np.ndarray:
        """Each chunk's end position and last token: what token_logits and label_logits answer from."""
        return np.array([(chunk.start + len(chunk.tokens), chunk.tokens[-1]) for chunk in chunks], dtype=np.int64)

    def token_logits(self, ends: np.ndarray, rows: Sequence[int]) -> torch.Tensor:
        """The token after each row's last position (token ids: this runner picks them)."""
        return torch.from_numpy(self._at(ends[list(rows), 0]))

    def label_logits(self, ends: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """Label logits [len(rows), 3] picked by each prompt's length and last token."""
        picked = ends[list(rows)]
        return self.label_cycle[(picked[:, 0] + picked[:, 1]) % len(LABEL_CYCLE)]
