"""`make eval`'s report: the metrics of the served (calibrated) answers beside the same scores
uncalibrated, the confusion matrices and the reliability chart of both."""
from __future__ import annotations

import json
from pathlib import Path

from qwen_worker.prompts import SENTIMENT_EXAMPLES, SENTIMENT_INSTRUCTION

TRUE_LABELS = ("positive", "negative")
BINS = 10


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    before, after = result["uncalibrated"], result
    flags = " (random-weight demo model)" if result.get("demo_model") else \
        " (the offline stand-in, not Qwen)" if result.get("stand_in_model") else ""
    examples = ", ".join(f"{len(v)} {k}" for k, v in SENTIMENT_EXAMPLES.items())
    cal = result["calibration"]
    method = {"fitted": f"fitted by `make calibrate` ({cal.get('fitted_on', '')})",
              "content_free": "the label-free content-free correction", "none": "none"}.get(cal["method"], cal["method"])
    rows = [("accuracy (a `neutral` answer counts as wrong; chance: 50 %)", "accuracy", _pct),
            ("macro-F1 (positive, negative)", "macro_f1", lambda x: f"{x:.3f}"),
            ("accuracy on the reviews not answered `neutral`", "accuracy_without_neutral", _pct),
            ("answered `neutral`", "neutral_share", _pct),
            (f"expected calibration error ({BINS} bins)", "ece", lambda x: f"**{x:.3f}**"),
            ("mean confidence", "mean_confidence", lambda x: f"{x:.3f}")]
    lines = [
        "# Sentiment quality",
        "",
        f"Written by `make eval` on {result['date']}: model **{result['model']}**{flags}, served at "
        f"{result['url']}; {result['n']} reviews of {result['data']}, balanced (half positive, half "
        f"negative), sample seed {result['seed']}. Calibration served: **{method}**"
        f"{'' if cal.get('applied', True) else ' (not for this language)'}. `make calibrate` fits on reviews "
        "that are not in this sample.",
        "",
        f"Prompt: the system instruction \"{SENTIMENT_INSTRUCTION}\", few-shot examples per language "
        f"({examples}), then the review. The model's scores are the softmax over the logits of the three "
        "label tokens at the next position (`uncalibrated_scores` in every answer); the served `scores` are "
        "those calibrated, and `confidence` is the largest of them.",
        "",
        "| metric | uncalibrated | served (calibrated) |",
        "| --- | --- | --- |",
        *[f"| {name} | {fmt(before[key]) if before[key] is not None else '–'} | "
          f"{fmt(after[key]) if after[key] is not None else '–'} |" for name, key, fmt in rows],
        "",
        "Confusion matrices (rows: the review's label; columns: the model's answer, uncalibrated / served):",
        "",
        "| | positive | negative | neutral |",
        "| --- | --- | --- | --- |",
        *[f"| {t} | {before['confusion'][t]['positive']} / {after['confusion'][t]['positive']} | "
          f"{before['confusion'][t]['negative']} / {after['confusion'][t]['negative']} | "
          f"{before['confusion'][t]['neutral']} / {after['confusion'][t]['neutral']} |" for t in TRUE_LABELS],
        "",
        "Calibration: a `confidence` of 0.8 should be right 80 % of the time. Per bin (mean confidence → "
        "accuracy, count), served: " + _bins(after) + "; uncalibrated: " + _bins(before),
        "",
        "![reliability chart](eval.png)",
        "",
    ]
    (out / "eval.md").write_text("\n".join(lines), encoding="utf-8")
    _chart(result, out / "eval.png")


def _bins(result: dict) -> str:
    return "; ".join(f"{b['confidence']:.2f} → {b['accuracy']:.2f} ({b['count']})"
                     for b in result["reliability"] if b["count"])


def _chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], ":", color="#999", label="perfect calibration")
    for name, data, style in (("uncalibrated", result["uncalibrated"], "s--"), ("served", result, "o-")):
        bins = [b for b in data["reliability"] if b["count"]]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style,
                label=f"{name}: ECE {data['ece']:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (mean in the bin)", ylabel="accuracy in the bin",
           title=f"{result['model']}, n={result['n']}, calibration: {result['calibration']['method']}")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
