"""`make eval`: sentiment quality of the model a worker or the stack serves, on a balanced, repeatable
sample of waimai_10k.csv: accuracy, macro-F1, the confusion matrix (a `neutral` answer counted on its
own: every review is labelled positive or negative) and calibration of `confidence` (expected
calibration error and a reliability chart). Writes docs/eval.md, docs/eval.json and docs/eval.png.

    make eval                                   # the stack at QAIO_EVAL_URL (http://127.0.0.1:8080)
    QAIO_EVAL_URL=http://127.0.0.1:8001 make eval   # one worker
    QAIO_EVAL_SIZE=1000 make eval               # a larger sample

When nothing answers at the URL, it starts one worker itself on the offline stand-in model.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from qwen_worker.prompts import LABELS, SENTIMENT_EXAMPLES, SENTIMENT_INSTRUCTION
from qwen_worker.testing import REPO, GunicornServer, http_status

from .texts import data_path

TRUE_LABELS = ("positive", "negative")
BINS = 10


def balanced_sample(size: int, seed: int = 0, path: Path | None = None) -> list[tuple[str, str]]:
    """(review, true label): size // 2 of each label, the same reviews for the same size and seed."""
    with open(path or data_path(), encoding="utf-8") as fh:
        rows = [(row["review"], "positive" if row["label"] == "1" else "negative") for row in csv.DictReader(fh)]
    rng = random.Random(seed)
    picked = []
    for label in TRUE_LABELS:
        of_label = [row for row in rows if row[1] == label]
        picked.append(rng.sample(of_label, size // 2))
    return [row for pair in zip(*picked) for row in pair]  # interleaved: any prefix stays balanced


def classify(url: str, texts: list[str], concurrency: int = 8) -> list[dict]:
    """The worker's `sentiment` answer for each text (waits out 429 and 503 with their Retry-After)."""
    def one(text: str) -> dict:
        with requests.Session() as session:
            for _ in range(60):
                response = session.post(url + "/v1/sentiment", json={"text": text}, timeout=120)
                if response.status_code in (429, 503):
                    time.sleep(float(response.headers.get("Retry-After", "1") or 1))
                    continue
                response.raise_for_status()
                return response.json()
        raise RuntimeError(f"{url} kept refusing: {response.status_code}")

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, texts))


def score(truth: list[str], predicted: list[str], confidence: list[float]) -> dict:
    """Accuracy, macro-F1 over the two true labels, confusion matrix, ECE and reliability bins."""
    confusion = {t: {p: 0 for p in LABELS} for t in TRUE_LABELS}
    for t, p in zip(truth, predicted):
        confusion[t][p] += 1
    correct = [t == p for t, p in zip(truth, predicted)]
    f1s = []
    for label in TRUE_LABELS:
        tp = confusion[label][label]
        predicted_as = sum(confusion[t][label] for t in TRUE_LABELS)
        actual = sum(confusion[label].values())
        precision = tp / predicted_as if predicted_as else 0.0
        recall = tp / actual if actual else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    bins = []
    ece = 0.0
    for b in range(BINS):
        low, high = b / BINS, (b + 1) / BINS
        members = [i for i, c in enumerate(confidence) if low < c <= high or (b == 0 and c == 0)]
        if not members:
            bins.append({"low": low, "high": high, "count": 0, "confidence": None, "accuracy": None})
            continue
        mean_conf = sum(confidence[i] for i in members) / len(members)
        accuracy = sum(correct[i] for i in members) / len(members)
        ece += len(members) / len(truth) * abs(accuracy - mean_conf)
        bins.append({"low": low, "high": high, "count": len(members), "confidence": mean_conf, "accuracy": accuracy})
    decided = [i for i, p in enumerate(predicted) if p != "neutral"]
    return {"n": len(truth), "accuracy": sum(correct) / len(truth), "macro_f1": sum(f1s) / len(f1s),
            "accuracy_without_neutral": (sum(correct[i] for i in decided) / len(decided)) if decided else None,
            "neutral_share": 1 - len(decided) / len(truth), "confusion": confusion, "ece": ece,
            "mean_confidence": sum(confidence) / len(confidence), "reliability": bins}


def evaluate(url: str, size: int, seed: int = 0) -> dict:
    sample = balanced_sample(size, seed)
    answers = classify(url, [text for text, _ in sample])
    result = score([label for _, label in sample], [a["sentiment"]["label"] for a in answers],
                   [a["sentiment"]["confidence"] for a in answers])
    first = answers[0]
    return {**result, "model": first["model"], "demo_model": first.get("demo_model"),
            "stand_in_model": first.get("stand_in_model"), "url": url, "seed": seed,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "data": data_path().name}


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    c = result["confusion"]
    flags = " (random-weight demo model)" if result.get("demo_model") else \
        " (the offline stand-in, not Qwen)" if result.get("stand_in_model") else ""
    examples = ", ".join(f"{len(v)} {k}" for k, v in SENTIMENT_EXAMPLES.items())
    lines = [
        "# Sentiment quality",
        "",
        f"Written by `make eval` on {result['date']}: model **{result['model']}**{flags}, served at "
        f"{result['url']}; {result['n']} reviews of {result['data']}, balanced (half positive, half "
        f"negative), sample seed {result['seed']}.",
        "",
        f"Prompt: the system instruction \"{SENTIMENT_INSTRUCTION}\", few-shot examples per language "
        f"({examples}), then the review; the answer is the softmax over the logits of the three label "
        "tokens at the next position, and `confidence` is the largest of the three.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| accuracy (a `neutral` answer counts as wrong) | **{result['accuracy']:.1%}** (chance: 50 %) |",
        f"| macro-F1 (positive, negative) | {result['macro_f1']:.3f} |",
        f"| accuracy on the reviews not answered `neutral` | "
        f"{result['accuracy_without_neutral']:.1%} |" if result["accuracy_without_neutral"] is not None else
        "| accuracy on the reviews not answered `neutral` | – |",
        f"| answered `neutral` | {result['neutral_share']:.1%} |",
        f"| expected calibration error ({BINS} bins) | {result['ece']:.3f} |",
        f"| mean confidence | {result['mean_confidence']:.3f} |",
        "",
        "Confusion matrix (rows: the review's label; columns: the model's answer):",
        "",
        "| | positive | negative | neutral |",
        "| --- | --- | --- | --- |",
        *[f"| {t} | {c[t]['positive']} | {c[t]['negative']} | {c[t]['neutral']} |" for t in TRUE_LABELS],
        "",
        "Calibration: a `confidence` of 0.8 should be right 80 % of the time. Per bin (mean confidence → "
        "accuracy, count): " + "; ".join(
            f"{b['confidence']:.2f} → {b['accuracy']:.2f} ({b['count']})" for b in result["reliability"] if b["count"]),
        "",
        "![reliability chart](eval.png)",
        "",
    ]
    (out / "eval.md").write_text("\n".join(lines), encoding="utf-8")
    _chart(result, out / "eval.png")


def _chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    bins = [b for b in result["reliability"] if b["count"]]
    ax.plot([0, 1], [0, 1], ":", color="#999", label="perfect calibration")
    ax.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["accuracy"] for b in bins], width=1 / BINS * 0.9,
           alpha=0.6, color="#3a7", label="accuracy in the bin")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color="#37a",
            label="mean confidence → accuracy")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"{result['model']}: ECE {result['ece']:.3f}, n={result['n']}")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("QAIO_EVAL_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--size", type=int, default=int(os.environ.get("QAIO_EVAL_SIZE", "400")))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"),
                        help="served by a worker started here when nothing answers at --url")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    server = None
    if http_status(args.url.rstrip("/") + "/readyz") != 200 and http_status(args.url.rstrip("/") + "/nginx-health") != 200:
        from qaio_models import stand_in as stand_in_model

        if args.model.endswith("smollm2-135m-instruct") and not stand_in_model.is_built(Path(args.model)):
            stand_in_model.build(Path(args.model))
        print(f"nothing answers at {args.url}: starting a worker on {args.model}", flush=True)
        server = GunicornServer(args.model).wait_ready(600)
        args.url = server.url
    try:
        result = evaluate(args.url.rstrip("/"), args.size, args.seed)
    finally:
        if server is not None:
            server.stop()
    write_report(result, args.out)
    print(f"{result['model']}: accuracy {result['accuracy']:.1%}, macro-F1 {result['macro_f1']:.3f}, "
          f"ECE {result['ece']:.3f} on {result['n']} reviews; wrote {args.out / 'eval.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
