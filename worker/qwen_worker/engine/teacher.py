"""Teacher-forced logits through the engine's own passes, for comparing the engine with transformers
(the CPU tests in float32, bench/gpu.py in bfloat16 on a GPU) and one precision with another."""
from __future__ import annotations

from typing import Sequence

import torch

from .model_runner import PrefillChunk
from .sequence import GenerationRow


def teacher_forced_logits(engine, rows: Sequence[Sequence[int]], prompt_lengths: Sequence[int]) -> list[torch.Tensor]:
    """Each row's float32 logits at every position from its prompt's last token to its second-to-last
    token: one prefill pass of the prompts, then decode steps feeding the rest, all rows in the same
    steps (slots 0..len(rows)-1, which must be free; their blocks come from the engine's pool)."""
    runner, blocks = engine.runner, engine.scheduler.blocks
    holders = [GenerationRow(list(row), 0) for row in rows]
    for slot, holder in enumerate(holders):
        if not blocks.grow(holder, len(holder.prompt_ids)):
            raise RuntimeError("the KV pool cannot hold the rows")
        runner.set_blocks(slot, holder.blocks)
    try:
        return _logits(runner, rows, prompt_lengths)
    finally:
        for slot, holder in enumerate(holders):
            blocks.release(holder)
            runner.set_blocks(slot, ())


def against_reference(reference, engine, prompt: Sequence[int], max_new_tokens: int) -> tuple[float, int, int]:
    """`engine`'s teacher-forced logits against engine `reference`'s, over the reference's greedy reply to
    `prompt`: (mean absolute error over the reference logits' standard deviation, positions whose top token
    is the reference's, positions)."""
    row = GenerationRow(list(prompt), max_new_tokens)
    reference.run([row])
    sequence = list(prompt) + row.tokens
    want = teacher_forced_logits(reference, [sequence], [len(prompt)])[0]
    got = teacher_forced_logits(engine, [sequence], [len(prompt)])[0]
    return float((got - want).abs().mean() / want.std()), int((got.argmax(-1) == want.argmax(-1)).sum()), len(want)


def _logits(runner, rows: Sequence[Sequence[int]], prompt_lengths: Sequence[int]) -> list[torch.Tensor]:
    hidden = runner.prefill([PrefillChunk(slot, row[:n], 0) for slot, (row, n) in enumerate(zip(rows, prompt_lengths))])
    first = runner.token_logits(hidden, range(len(rows)))
    out = [[first[slot].float()] for slot in range(len(rows))]
    for step in range(max(len(r) - n for r, n in zip(rows, prompt_lengths)) - 1):
        feeding = {slot: (row[n + step], n + step) for slot, (row, n) in enumerate(zip(rows, prompt_lengths))
                   if n + step + 1 < len(row)}
        logits, _ = runner.decode(feeding, max(feeding) + 1)
        for slot in feeding:
            out[slot].append(logits[slot].float())
    return [torch.stack(o) for o in out]


def reference_logits(model, row: Sequence[int], prompt_length: int) -> torch.Tensor:
    """transformers' float32 logits of `row` at the same positions, one full forward pass."""
    with torch.inference_mode():
        logits = model(torch.tensor([list(row)], device=model.device)).logits
    return logits[0, prompt_length - 1:len(row) - 1].float()
