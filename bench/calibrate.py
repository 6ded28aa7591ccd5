"""`make calibrate`: fit the calibration of the served model's sentiment scores (temperature scaling plus
a per-label bias, per language) on labelled reviews that `make eval`'s sample never contains, and store it
where the worker finds it: `worker/qwen_worker/calibrations/<model>.json` (the images carry the package),
or `--beside` the model in its own directory.

    make calibrate                        # the stack at QAIO_EVAL_URL, else a worker on the stand-in
    QAIO_CALIBRATE_SIZE=800 make calibrate

waimai_10k.csv is Chinese: the fit is for `zh`; other languages keep their uncalibrated scores (each
answer's `calibration.applied` says so). Workers read the fit at start-up: restart them after fitting.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from qwen_worker.calibration import FILE_NAME, PACKAGE_DIR, Calibration, fit, prompt_fingerprint

from .eval import arguments, balanced_sample, classify, score_probabilities, served
from .texts import data_path

LANG = "zh"  # the language of waimai_10k.csv


def calibrate(url: str, size: int, seed: int, eval_size: int) -> dict:
    held_out = frozenset(text for text, _ in balanced_sample(eval_size, 0))
    sample = balanced_sample(size, seed, exclude=held_out)
    answers = classify(url, [text for text, _ in sample])
    truth = [label for _, label in sample]
    raw = [a["sentiment"]["uncalibrated_scores"] for a in answers]
    params = fit(raw, truth)
    before = score_probabilities(truth, raw)
    calibration = Calibration("fitted", {LANG: params})
    after = score_probabilities(truth, [calibration.apply(r, LANG) for r in raw])
    model = answers[0]["model"]
    calibration.info = {
        "model": model, "prompt": prompt_fingerprint(), "fitted_on": f"{size} reviews of {data_path().name} "
        f"(seed {seed}, none of make eval's {eval_size})", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "in_sample": {"ece_before": round(before["ece"], 4), "ece_after": round(after["ece"], 4),
                      "accuracy_before": round(before["accuracy"], 4), "accuracy_after": round(after["accuracy"], 4)}}
    return calibration.as_dict()


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__, argv, "QAIO_CALIBRATE_SIZE", 400, 1)
    beside = os.environ.get("QAIO_CALIBRATE_BESIDE") == "1"
    with served(args.url, args.model) as url:
        result = calibrate(url, args.size, args.seed, int(os.environ.get("QAIO_EVAL_SIZE", "400")))
    model = result["info"]["model"]
    path = Path(args.model) / FILE_NAME if beside else PACKAGE_DIR / f"{model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    fit_zh, in_sample = result["languages"][LANG], result["info"]["in_sample"]
    print(f"{model} ({LANG}): temperature {fit_zh['temperature']:.3f}, bias "
          f"{', '.join(f'{b:+.3f}' for b in fit_zh['bias'])}; in sample ECE {in_sample['ece_before']:.3f} -> "
          f"{in_sample['ece_after']:.3f}; wrote {path} (restart workers to serve it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
