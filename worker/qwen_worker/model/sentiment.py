"""Sentiment scoring through the engine: each prompt a scoring row (engine/sequence.py), prefilled like
any prompt, its instruction prefix served by the KV blocks' prefix cache."""
from __future__ import annotations

from typing import Sequence

from ..engine import GenerationRow
from ..prompts import LABELS


def label_scores(probabilities: Sequence[float]) -> dict[str, float]:
    """A scoring row's label probabilities by label name."""
    return dict(zip(LABELS, probabilities))


def score_prompts(engine, prompts: Sequence[Sequence[int]]) -> list[dict[str, float]]:
    """Label probabilities after each prompt, stepping the engine until all are scored (the caller owns
    the engine: warm-up, calibration at load, tests and benchmarks)."""
    rows = [GenerationRow.scoring(list(prompt)) for prompt in prompts]
    engine.run(rows)
    return [label_scores(row.label_probs) for row in rows]
