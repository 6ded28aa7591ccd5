"""Sentiment label probabilities made calibrated: temperature scaling plus a per-label bias on the
label logits, fitted per model and language on labelled reviews (`make calibrate`), or without labels
the content-free correction ("calibrate before use": divide by what the model says of an empty text).

A fit is stored as `qaio_calibration.json` beside a local model, or as `calibrations/<model>.json` in
this package (so the images carry it); it names the sentiment prompt it was fitted with, and a fit of
another prompt is not applied.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Sequence

from .prompts import LABELS, SENTIMENT_EXAMPLES, SENTIMENT_INSTRUCTION

log = logging.getLogger(__name__)

FILE_NAME = "qaio_calibration.json"
PACKAGE_DIR = Path(__file__).parent / "calibrations"
CONTENT_FREE_TEXT = "N/A"  # Zhao et al. 2021 use "N/A", "" and "[MASK]"; our prompts refuse empty text
BIAS_L2 = 0.01  # the true labels never say neutral: without a prior its bias would run to -infinity


def prompt_fingerprint() -> str:
    """The sentiment prompt a calibration belongs to."""
    text = json.dumps([SENTIMENT_INSTRUCTION, SENTIMENT_EXAMPLES], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass
class Calibration:
    method: str  # fitted | content_free | none
    languages: dict[str, dict]  # lang -> {"temperature": T, "bias": [per label]}
    info: dict = dataclasses.field(default_factory=dict)  # where it came from, how well it fitted

    def apply(self, scores: dict[str, float], lang: str) -> dict[str, float]:
        params = self.languages.get(lang)
        if params is None:
            return scores
        z = [math.log(max(scores[label], 1e-12)) / params["temperature"] + b for label, b in zip(LABELS, params["bias"])]
        top = max(z)
        e = [math.exp(x - top) for x in z]
        return {label: x / sum(e) for label, x in zip(LABELS, e)}

    def describe(self, lang: str | None = None) -> dict:
        """What answers say: the method, and for one language whether it applies there."""
        out = {"method": self.method, **{k: self.info[k] for k in ("source", "fitted_on", "date") if k in self.info}}
        if lang is not None:
            out["applied"] = lang in self.languages
        else:
            out["languages"] = sorted(self.languages)
        return out

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Calibration":
        return cls(**data) if data else NONE


NONE = Calibration("none", {})


def fitted_path(model_source: str, model_name: str) -> Path | None:
    """Where this model's fit is, if it has one: beside a local model first, then in this package."""
    candidates = []
    if os.path.isdir(model_source):
        candidates.append(Path(model_source) / FILE_NAME)
    candidates.append(PACKAGE_DIR / f"{model_name}.json")
    return next((p for p in candidates if p.is_file()), None)


def load_fitted(model_source: str, model_name: str) -> Calibration | None:
    path = fitted_path(model_source, model_name)
    if path is None:
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("info", {}).get("prompt") != prompt_fingerprint():
        log.warning("calibration %s was fitted with another sentiment prompt; not applied", path)
        return None
    data.setdefault("info", {})["source"] = str(path)
    return Calibration.from_dict(data)


def content_free(score: Callable[[str], dict[str, float]]) -> Calibration:
    """Per language: bias = -log p(label | content-free text), temperature 1."""
    languages = {}
    for lang in SENTIMENT_EXAMPLES:
        p = score(lang)
        languages[lang] = {"temperature": 1.0, "bias": [-math.log(max(p[label], 1e-12)) for label in LABELS]}
    return Calibration("content_free", languages, {"source": f"the model's scores of {CONTENT_FREE_TEXT!r}"})


def fit(scores: Sequence[dict[str, float]], truth: Sequence[str], steps: int = 200) -> dict:
    """Temperature and per-label bias minimising the negative log-likelihood of the true labels."""
    import torch

    logp = torch.tensor([[math.log(max(s[label], 1e-12)) for label in LABELS] for s in scores], dtype=torch.float64)
    target = torch.tensor([LABELS.index(t) for t in truth])
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(LABELS), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t, bias], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(logp / log_t.exp() + bias, target) + BIAS_L2 * (bias ** 2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    log_t, bias = log_t.detach(), bias.detach()
    return {"temperature": float(log_t.exp()), "bias": [float(b) for b in bias - bias.mean()]}
