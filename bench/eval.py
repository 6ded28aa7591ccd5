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
import contextlib
import csv
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from qwen_worker.prompts import LABELS
from qaio_testing import REPO, GunicornServer, http_status

from .eval_report import BINS, TRUE_LABELS, write_report
from .texts import data_path



def balanced_sample(size: int, seed: int = 0, path: Path | None = None,
                    exclude: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """(review, true label): size // 2 of each label, the same reviews for the same size and seed;
    none of the reviews in `exclude` (make calibrate fits on reviews the evaluation never sees)."""
    with open(path or data_path(), encoding="utf-8") as fh:
        rows = [(row["review"], "positive" if row["label"] == "1" else "negative") for row in csv.DictReader(fh)
                if row["review"] not in exclude]
    rng = random.Random(seed)
    picked = []
    for label in TRUE_LABELS:
        of_label = [row for row in rows if row[1] == label]
        picked.append(rng.sample(of_label, size // 2))
    return [row for pair in zip(*picked) for row in pair]  # interleaved: any prefix stays balanced


def classify(url: str, texts: list[str], concurrency: int = 2, per_request: int = 32) -> list[dict]:
    """The worker's sentiment of each text, by bulk requests of `per_request` texts; texts refused under
    load (the whole request, or some of its texts) go again after the Retry-After."""
    def one(chunk: list[str]) -> list[dict]:
        answers: list[dict | None] = [None] * len(chunk)
        with requests.Session() as session:
            for _ in range(60):
                pending = [i for i, a in enumerate(answers) if a is None]
                if not pending:
                    return answers
                response = session.post(url + "/v1/sentiment", json={"texts": [chunk[i] for i in pending]},
                                        timeout=300)
                if response.status_code in (429, 503, 504):
                    time.sleep(float(response.headers.get("Retry-After", "1") or 1))
                    continue
                response.raise_for_status()
                body = response.json()
                for i, result in zip(pending, body["results"]):
                    if "error" not in result:
                        answers[i] = {**result, "model": body["model"], "demo_model": body.get("demo_model"),
                                      "stand_in_model": body.get("stand_in_model")}
                if body["failed"]:
                    time.sleep(1)
        raise RuntimeError(f"{url} kept refusing: {response.status_code}")

    chunks = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    with ThreadPoolExecutor(concurrency) as pool:
        return [answer for part in pool.map(one, chunks) for answer in part]


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


def score_probabilities(truth: list[str], scores: list[dict[str, float]]) -> dict:
    """score() of label probabilities: the most likely label, at its probability."""
    return score(truth, [max(s, key=s.get) for s in scores], [max(s.values()) for s in scores])


def evaluate(url: str, size: int, seed: int = 0) -> dict:
    """Accuracy and calibration of the served answers, and of the same scores uncalibrated."""
    sample = balanced_sample(size, seed)
    answers = classify(url, [text for text, _ in sample])
    truth = [label for _, label in sample]
    after = score(truth, [a["sentiment"]["label"] for a in answers], [a["sentiment"]["confidence"] for a in answers])
    raw = [a["sentiment"]["uncalibrated_scores"] for a in answers]
    before = score_probabilities(truth, raw)
    first = answers[0]
    return {**after, "uncalibrated": before, "calibration": first["sentiment"]["calibration"],
            "model": first["model"], "demo_model": first.get("demo_model"),
            "stand_in_model": first.get("stand_in_model"), "url": url, "seed": seed,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "data": data_path().name}


@contextlib.contextmanager
def served(url: str, model: str):
    """The URL to send sentiment to: `url` when a worker or the stack answers there, else a worker
    started here on `model` for the duration."""
    url = url.rstrip("/")
    if http_status(url + "/readyz") == 200 or http_status(url + "/nginx-health") == 200:
        yield url
        return
    from qaio_models import stand_in as stand_in_model

    if model.endswith("smollm2-135m-instruct") and not stand_in_model.is_built(Path(model)):
        stand_in_model.build(Path(model))
    print(f"nothing answers at {url}: starting a worker on {model}", flush=True)
    # Quality, not latency: a bulk request's texts share one deadline, which a loaded machine can pass.
    server = GunicornServer(model, QAIO_SENTIMENT_DEADLINE_MS="300000").wait_ready(600)
    try:
        yield server.url
    finally:
        server.stop()


def arguments(description: str, argv: list[str] | None, size_env: str, default_size: int, default_seed: int):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("QAIO_EVAL_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--size", type=int, default=int(os.environ.get(size_env, str(default_size))))
    parser.add_argument("--seed", type=int, default=default_seed)
    parser.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"),
                        help="served by a worker started here when nothing answers at --url")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__, argv, "QAIO_EVAL_SIZE", 400, 0)
    with served(args.url, args.model) as url:
        result = evaluate(url, args.size, args.seed)
    write_report(result, args.out)
    before = result["uncalibrated"]
    print(f"{result['model']}: accuracy {before['accuracy']:.1%} -> {result['accuracy']:.1%}, macro-F1 "
          f"{before['macro_f1']:.3f} -> {result['macro_f1']:.3f}, ECE {before['ece']:.3f} -> {result['ece']:.3f} "
          f"({result['calibration']['method']}) on {result['n']} reviews; wrote {args.out / 'eval.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
