"""How one step runs on the device: fixed shapes, CUDA graphs for decode, bucketed eager passes otherwise.

Decode runs slots [0, n) with n padded to a batch bucket and attention over the first `attend`
positions of each row's blocks, padded to a length bucket; on a GPU each (n, attend) pair is a CUDA graph
captured at start-up that reads its inputs from fixed buffers. Prefill (of generations and of sentiment
texts alike) runs eagerly, padded on a GPU to width and batch buckets, so it too reuses a handful of
shapes; on a CPU chunks of similar lengths share a pass. Its passes return hidden states: the caller
applies the output head to rows that sample and the label head to rows that score.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Sequence

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .block_tables import BlockTables
from .buckets import bucket, doubling, length_groups
from .decode_inputs import PAD_TOKEN, DecodeInputs
from .flight import CopyFence
from .forward import DecoderStack
from .inference import inference
from .kv_cache import PagedKVCache

log = logging.getLogger(__name__)

MIN_ATTEND = 128  # the shortest attention-length bucket
MIN_WIDTH = 16  # the narrowest prefill width bucket


def _round_up(n: int, sizes: Sequence[int], step: int = 256) -> int:
    """The bucket for n; past the largest bucket, n rounded up to a multiple of `step`."""
    return bucket(n, sizes) if n <= sizes[-1] else -(-n // step) * step


@dataclasses.dataclass
class PrefillChunk:
    slot: int
    tokens: Sequence[int]  # the chunk's prompt tokens
    start: int  # position of its first token in the sequence


class ModelRunner:
    """One model's forward passes for `slots` generating rows and `score_slots` scoring rows (which
    prefill only) of up to `max_tokens` tokens over a pool of KV blocks."""

    picks_tokens = False  # its passes return logits; the engine chooses the tokens

    def __init__(self, model, *, slots: int, max_tokens: int, prefill_chunk: int, use_graphs: bool,
                 label_head: torch.Tensor, kv_blocks: int, block_tokens: int = 16, compile: bool = False,
                 kernels: str = "torch", sdpa_backend: str = "auto", score_slots: int = 0):
        self.stack = DecoderStack(model, max_tokens)
        self.device, self.dtype = self.stack.device, self.stack.dtype
        if self.device.type == "cuda":
            self.stack.fuse()  # on a CPU the packed oneDNN linears are the fast path; no second weight copy
        s = self.stack
        self.kv = PagedKVCache(s.num_layers, kv_blocks, s.kv_heads, block_tokens, s.head_dim, self.dtype, self.device,
                               slots + score_slots, max_tokens)
        self.block_tokens = block_tokens
        self.block_bytes = self.kv.block_bytes
        self.vocab_size = s.vocab_size
        self.tables = BlockTables(self.kv, self.device)
        self.slots = slots
        self.score_slots = score_slots
        self.max_tokens = max_tokens
        self.prefill_chunk = prefill_chunk
        self.batch_sizes = doubling(1, slots)
        self.attend_lengths = doubling(min(MIN_ATTEND, max_tokens), max_tokens)
        self.widths = doubling(min(MIN_WIDTH, prefill_chunk), prefill_chunk)
        # The label logits in float32: in bf16 the three logits' differences, which are the answer, keep
        # about two significant digits.
        self.label_head = label_head.to(self.device, torch.float32)
        self.inputs = DecodeInputs(slots, self.kv.scratch, self.device)
        self.use_graphs = use_graphs and self.device.type == "cuda"
        # On a GPU shapes are padded to buckets (graphs, kernel choices and the allocator reuse them);
        # on a CPU every padded row or token is paid in arithmetic, so passes keep their real sizes.
        self.pad_shapes = self.device.type == "cuda"
        # torch.compile would fuse each layer's small kernels; the graphs then capture compiled code.
        # Off by default: it recompiles for every shape bucket (see QAIO_COMPILE).
        self.compiled = compile
        self._decode_pass = self.stack.decode
        self._prefill_pass = self.stack.prefill
        self.kernels = kernels
        # Decode graphs by (batch, attend) on the torch path; the kernels read lengths on the device,
        # so their graphs are by batch alone.
        self.decode_attend_lengths = self.attend_lengths
        if kernels == "triton":
            from .kernel_passes import KernelPasses  # imports Triton: only when asked for

            passes = KernelPasses(self.stack, self.kv)
            self._decode_pass, self._prefill_pass = passes.decode, passes.prefill
            self.decode_attend_lengths = (max_tokens,)
        # The attention backend of every pass (decode on the torch path, prefill, scoring), chosen once
        # rather than per shape by torch (cuDNN plans are built per shape and per thread, on the serving path).
        self.sdpa_backend = sdpa_backend
        if compile and kernels == "torch":
            self._decode_pass = torch.compile(self.stack.decode, dynamic=True)
            self._prefill_pass = torch.compile(self.stack.prefill, dynamic=True)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.graph_replays = 0
        self.capture_seconds = 0.0

    def disable_compile(self) -> None:
        """Back to eager passes (a compilation failed: serve slower rather than not at all)."""
        self.compiled = False
        if self.kernels == "torch":
            self._decode_pass, self._prefill_pass = self.stack.decode, self.stack.prefill
        self.graphs.clear()

    def _attention_backend(self):
        """The context prefill passes run in: QAIO_SDPA_BACKEND's choice, or torch's."""
        if self.sdpa_backend == "auto":
            return contextlib.nullcontext()
        backend = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[self.sdpa_backend]
        return sdpa_kernel([backend, SDPBackend.MATH])  # math: for shapes the chosen one refuses

    # ---- blocks --------------------------------------------------------------------------------
    def set_blocks(self, slot: int, blocks: Sequence[int]) -> None:
        """Row `slot` now holds `blocks` (its first positions' keys, in order)."""
        self.tables.set(slot, blocks)

    @inference
    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Every layer's keys and values of block `source` into block `destination`, for each pair."""
        index = torch.tensor(pairs, dtype=torch.long).T.to(self.device, non_blocking=True)
        for pool in (self.kv.keys, self.kv.values):
            pool[:, index[1]] = pool[:, index[0]]

    # ---- decode --------------------------------------------------------------------------------
    def decode_shape(self, width: int, longest: int) -> tuple[int, int]:
        """The (batch, attend) bucket for slots [0, width) whose longest row attends to `longest` keys."""
        return bucket(width, self.batch_sizes) if self.pad_shapes else width, bucket(longest, self.decode_attend_lengths)

    def _decode_logits(self, n: int, attend: int) -> torch.Tensor:
        tokens, positions, write_at, lengths = self.inputs.device_rows[:, :n]
        with self._attention_backend():  # captured with the graph: decode uses the backend the setting names
            return self._decode_pass(self.kv, tokens, positions, write_at, lengths, attend)

    def _decode_fixed(self, n: int, attend: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured step: logits and their argmax (a greedy step reads only the argmax)."""
        logits = self._decode_logits(n, attend)
        return logits, logits.argmax(dim=-1)

    @inference
    def capture_graphs(self) -> None:
        """Capture a decode graph for every (batch, attend) bucket, largest first so the smaller
        ones fit in the memory pool the first one reserved."""
        if not self.use_graphs:
            return
        started = time.monotonic()
        self.inputs.idle_all()
        pool = None
        side = torch.cuda.Stream(self.device)
        for n in reversed(self.batch_sizes):
            for attend in reversed(self.decode_attend_lengths):
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # warm-up outside the capture: lazy initialisation, autotuning
                    self._decode_fixed(n, attend)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits, greedy = self._decode_fixed(n, attend)
                pool = graph.pool()
                self.graphs[(n, attend)] = (graph, logits, greedy)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.monotonic() - started
        log.info("captured %d decode graphs in %.1f s", len(self.graphs), self.capture_seconds,
                 extra={"batch_sizes": list(self.batch_sizes), "attend_lengths": list(self.attend_lengths)})

    def fence_copies(self) -> None:
        """Steps overlap (QAIO_OVERLAP_STEPS): the pinned buffers wait for their last copy before a rewrite."""
        on_gpu = self.device.type == "cuda"
        self.tables.fence, self.inputs.fence = CopyFence(on_gpu), CopyFence(on_gpu)

    @inference
    def decode(self, rows: dict[int, tuple[int, int]], width: int,
               fed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode step for slots [0, width); rows maps slot -> (input token, position). An input token
        FED (-1) is taken on the device from `fed`, the previous step's tokens by slot.

        Returns logits [width, vocab] and, from a captured graph, their argmax [width] (None from an
        eager pass), still on the device; slots without a row compute padding that nobody reads.
        """
        longest = max(position + 1 for _, position in rows.values())
        n, attend = self.decode_shape(width, longest)
        self.inputs.write(n, rows, self.tables.locations)
        self.tables.upload()
        if fed is not None:
            self.inputs.feed(n, fed)
        graph = self.graphs.get((n, attend))
        if graph is not None:
            graph[0].replay()
            self.graph_replays += 1
            return graph[1][:width], graph[2][:width]
        # Eager: the argmax is left to the engine, which takes it after penalties when a row has any.
        return self._decode_logits(n, attend)[:width], None

    # ---- prefill -------------------------------------------------------------------------------
    @inference
    def prefill(self, chunks: Sequence[PrefillChunk]) -> torch.Tensor:
        """Writes each chunk's keys into its slot; returns the final norm's output [len(chunks), hidden] at
        each chunk's last token (for token_logits and label_logits).

        On a GPU chunks of a width bucket share a pass padded to it; on a CPU chunks of similar
        lengths share a pass padded to the longest of them (one long chunk must not pad short ones).
        """
        if self.pad_shapes:
            groups: dict[int, list[int]] = {}
            for i, chunk in enumerate(chunks):
                groups.setdefault(_round_up(len(chunk.tokens), self.widths), []).append(i)
            parts = list(groups.items())
        else:
            parts = [(0, members) for members in length_groups([len(chunk.tokens) for chunk in chunks])]
        if len(parts) == 1 and parts[0][1] == list(range(len(chunks))):
            return self._prefill_group(chunks, parts[0][0])
        hidden = torch.empty((len(chunks), self.stack.hidden_size), dtype=self.dtype, device=self.device)
        for width, members in parts:
            hidden[members] = self._prefill_group([chunks[i] for i in members], width)
        return hidden

    @inference
    def token_logits(self, hidden: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """The output head's logits [len(rows), vocab] at prefill's rows `rows` (on the device)."""
        return self.stack.lm_head(hidden[list(rows)])

    @inference
    def label_logits(self, hidden: torch.Tensor, rows: Sequence[int]) -> np.ndarray:
        """The label head's float32 logits [len(rows), labels] at prefill's rows `rows`, on the host."""
        return (hidden[list(rows)].float() @ self.label_head.T).cpu().numpy()

    def _prefill_group(self, chunks: Sequence[PrefillChunk], width: int) -> torch.Tensor:
        width = width or max(len(chunk.tokens) for chunk in chunks)
        batch = _round_up(len(chunks), self.batch_sizes, step=self.slots) if self.pad_shapes else len(chunks)
        tokens = torch.full((batch, width), PAD_TOKEN, dtype=torch.long)
        positions = torch.zeros((batch, width), dtype=torch.long)
        write_at = torch.full((batch, width), self.kv.scratch, dtype=torch.long)
        last = torch.zeros(batch, dtype=torch.long)
        slots = torch.zeros(batch, dtype=torch.long)
        longest = 1
        for b, chunk in enumerate(chunks):
            length = len(chunk.tokens)
            span = torch.arange(chunk.start, chunk.start + length)
            tokens[b, :length] = torch.as_tensor(chunk.tokens, dtype=torch.long)
            positions[b, :length] = span
            positions[b, length:] = chunk.start + length - 1  # padding repeats the last real position
            write_at[b, :length] = torch.from_numpy(self.tables.locations(chunk.slot, span.numpy()))
            last[b] = length - 1
            slots[b] = chunk.slot
            longest = max(longest, chunk.start + length)
        # A GPU reuses a few attention shapes; a CPU pays for every key attended, so it attends to the
        # blocks the longest row holds.
        attend = bucket(longest, self.attend_lengths) if self.pad_shapes else -(-longest // self.block_tokens) * self.block_tokens
        self.tables.upload()
        to = dict(device=self.device, non_blocking=True)
        with self._attention_backend():
            out = self._prefill_pass(self.kv, slots.to(**to), tokens.to(**to), positions.to(**to),
                                     write_at.to(**to), last.to(**to), attend)
        return out[:len(chunks)]
