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

    def __init__(self, cycle: Sequence[int], *, vocab_size: int, slots: int, max_tokens: int, block_tokens: int):
        if not cycle:
            raise ValueError("the null model needs a non-empty token cycle")
        self.cycle = np.asarray(cycle, dtype=np.int64)
        self.vocab_size = vocab_size
        self.slots = slots
        self.max_tokens = max_tokens
        self.block_tokens = block_tokens
        self.graphs: dict = {}
        self.label_cycle = torch.tensor(LABEL_CYCLE, dtype=torch.float32)

    def capture_graphs(self) -> None:
        pass

    def disable_compile(self) -> None:
        pass

    def set_blocks(self, slot: int, blocks: Sequence[int]) -> None:
        pass  # no memory behind the blocks: the scheduler's bookkeeping of them is what runs

    def _at(self, positions) -> np.ndarray:
        return self.cycle[np.asarray(positions, dtype=np.int64) % len(self.cycle)]

    def decode(self, rows: dict[int, tuple[int, int]], width: int) -> tuple[None, torch.Tensor]:
        """Each row's next token (the one after its input's position); padding slots get the cycle's first."""
        tokens = np.full(width, self.cycle[0], dtype=np.int64)
        slots = np.fromiter(rows, dtype=np.int64, count=len(rows))
        positions = np.fromiter((position for _, position in rows.values()), dtype=np.int64, count=len(rows))
        tokens[slots] = self._at(positions + 1)
        return None, torch.from_numpy(tokens)

    def prefill(self, chunks: Sequence[PrefillChunk]) -> torch.Tensor:
        """The token after each chunk's last position."""
        return torch.from_numpy(self._at([chunk.start + len(chunk.tokens) for chunk in chunks]))

    def score(self, prefix, texts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Label logits [len(texts), 3] picked by each text's length and last token."""
        index = torch.tensor([(len(text) + text[-1]) % len(LABEL_CYCLE) for text in texts])
        return self.label_cycle[index]
