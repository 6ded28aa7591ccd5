"""`make repetition`: does a default repetition penalty keep the served model's chat replies from
degenerating into one phrase repeated until max_tokens? Generates replies to Chinese and English chat
prompts (waimai reviews as the user's message, as the page's analyze does, and a few questions) with
each penalty, greedy and sampled at the product defaults, and measures how much of each reply repeats.
Writes docs/repetition.md and docs/repetition.json.

    make repetition                      # the offline stand-in
    python -m bench.repetition --model models/qwen2.5-0.5b-shape --penalties 1,1.1
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qwen_worker.config import WorkerConfig
from qwen_worker.engine import GenerationRow
from qwen_worker.model import ModelService
from qwen_worker.prompts import Message
from qwen_worker.sampling import SamplingParams
from qaio_testing import REPO

from .texts import review_texts

QUESTIONS = ["你好，介绍一下你自己", "推荐几道家常菜", "今天心情不好怎么办", "讲一个关于猫的故事",
             "Tell me about your favourite book.", "How do I make a cup of tea?"]


def repeated_share(text: str, n: int = 4) -> float:
    """Share of the reply's character n-grams that occurred earlier in it (0: none repeats)."""
    grams = [text[i:i + n] for i in range(len(text) - n + 1)]
    seen, repeats = set(), 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams) if grams else 0.0


def run(service: ModelService, prompts: list[list[int]], tokens: int, penalty: float, temperature: float,
        top_p: float, seed: int) -> dict:
    rows = [GenerationRow(p, tokens, SamplingParams(temperature, top_p, seed=seed + i, repetition_penalty=penalty))
            for i, p in enumerate(prompts)]
    started = time.perf_counter()
    for start in range(0, len(rows), service.engine.runner.slots):
        service.engine.run(rows[start:start + service.engine.runner.slots])
    seconds = time.perf_counter() - started
    texts = [service.decode(r.tokens) for r in rows]
    shares = [repeated_share(t) for t in texts]
    return {"penalty": penalty, "temperature": temperature, "replies": len(rows),
            "mean_repeated_share": sum(shares) / len(shares),
            "degenerate_share": sum(s > 0.5 for s in shares) / len(shares),  # half the reply is repeats
            "hit_max_tokens_share": sum(r.finish_reason == "length" for r in rows) / len(rows),
            "tokens_per_s": sum(len(r.tokens) for r in rows) / seconds,
            "example": texts[0][:160], "example_zh": texts[len(QUESTIONS)][:160] if len(texts) > len(QUESTIONS) else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--penalties", default="1,1.05,1.1,1.2")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    config = WorkerConfig.from_env({}, model=args.model, max_batch_size=8, max_tokens_limit=args.tokens,
                                   default_max_tokens=args.tokens)
    service = ModelService(config)
    service.load()
    users = QUESTIONS + review_texts(max(args.prompts - len(QUESTIONS), 0))
    prompts = [service.prompter.chat_ids([Message("user", u)]) for u in users[:args.prompts]]
    results = []
    for temperature, top_p in ((0.0, 1.0), (config.default_temperature, config.default_top_p)):
        for penalty in (float(p) for p in args.penalties.split(",")):
            results.append(run(service, prompts, args.tokens, penalty, temperature, top_p, seed=0))
            print(json.dumps({k: v for k, v in results[-1].items() if not k.startswith("example")}), flush=True)
    report = {"model": service.name, "prompts": len(prompts), "max_tokens": args.tokens,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "repetition.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["# Repetition penalty: measured", "",
             f"Written by `make repetition` on {report['date']}: model **{report['model']}**, {len(prompts)} chat "
             f"prompts ({len(QUESTIONS)} questions, the rest waimai reviews as the user's message), max_tokens "
             f"{args.tokens}, on this machine's CPU, in-process. A reply's *repeated share* is the share of its "
             "4-character n-grams that already occurred in it; *degenerate*: more than half of it repeats. "
             "tokens/s is this shared machine's, in runs one after another: noise, not the penalty's cost.", "",
             "| temperature | repetition_penalty | mean repeated share | degenerate replies | replies cut at max_tokens | tokens/s |",
             "| --- | --- | --- | --- | --- | --- |",
             *[f"| {r['temperature']} | {r['penalty']} | {r['mean_repeated_share']:.2f} | {r['degenerate_share']:.0%} | "
               f"{r['hit_max_tokens_share']:.0%} | {r['tokens_per_s']:.0f} |" for r in results], "",
             "The reply to the first question and to the first review of each run (160 characters):", "",
             *[f"- t={r['temperature']}, penalty {r['penalty']}: {r['example']!r} / {r['example_zh']!r}"
               for r in results], ""]
    (args.out / "repetition.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out / 'repetition.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
