"""The engine against transformers on any device: greedy tokens of a concurrent batch equal
`model.generate` one prompt at a time, and sentiment scores equal a full forward pass.

    python -m bench.engine_check --model models/qwen2.5-0.5b-shape
"""
from __future__ import annotations

import argparse

import torch

from qwen_worker.config import WorkerConfig
from qwen_worker.engine import GenerationRow
from qwen_worker.model import ModelService
from qwen_worker.prompts import LABELS, Message

from .texts import review_texts


def reference_tokens(service: ModelService, prompt: list[int], max_new: int) -> list[int]:
    out = service.model.generate(torch.tensor([prompt], device=service.device), max_new_tokens=max_new,
                                 do_sample=False, eos_token_id=sorted(service.eos_token_ids), pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    for i, token in enumerate(tokens):
        if token in service.eos_token_ids:
            return tokens[:i]
    return tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args(argv)
    service = ModelService(WorkerConfig.from_env(None, model=args.model, max_batch_size=32))
    service.load()
    texts = review_texts(args.rows)
    prompts = [service.prompter.chat_ids([Message("user", t * (1 + i % 3))]) for i, t in enumerate(texts)]
    rows = [GenerationRow(p, args.tokens - (i % 4) * 3) for i, p in enumerate(prompts)]
    for row in rows:
        service.engine.add(row, lambda row, error: None)
    while service.engine.has_work():
        service.engine.step()
    equal_prefix = []
    for row in rows:
        ref = reference_tokens(service, row.prompt_ids, row.max_new_tokens)
        same = next((i for i, (a, b) in enumerate(zip(row.tokens, ref)) if a != b), min(len(row.tokens), len(ref)))
        equal_prefix.append(same / max(len(ref), 1))
    exact = sum(1 for share in equal_prefix if share >= 1)
    print(f"greedy rows equal to transformers token for token: {exact}/{len(rows)}; "
          f"mean share of tokens equal before the first difference: {sum(equal_prefix) / len(rows):.3f}")
    sentiment = [service.prompter.sentiment_ids(t, "zh") for t in texts]
    ours = service.score_sentiment(sentiment)
    worst = 0.0
    labels = list(service.prompter.label_token_ids)
    with torch.inference_mode():
        for prompt, scores in zip(sentiment, ours):
            logits = service.model(input_ids=torch.tensor([prompt], device=service.device)).logits[0, -1, labels]
            full = logits.float().softmax(-1).tolist()
            worst = max(worst, max(abs(scores[label] - p) for label, p in zip(LABELS, full)))
    print(f"sentiment: largest probability difference from a full forward pass: {worst:.2e} ({service.dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
