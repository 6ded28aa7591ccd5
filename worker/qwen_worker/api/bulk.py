"""Bulk sentiment: `texts: [...]` scored as separate engine requests (each counted by admission and
bounded in tokens, batched with everyone else's), a window of them queued at a time, under one deadline,
answered in order with a failure reported per text."""
from __future__ import annotations

from flask import g, jsonify

from .. import validation as v
from ..errors import ApiError, bad_request, engine_error
from ..protocol import RequestFailed
from ..service import sentiment_view
from .common import envelope, service
from .tasks import _language
from .usage import track


def _texts(body: dict, limit: int, max_chars: int) -> list[str]:
    if "text" in body:
        raise bad_request("give either `text` or `texts`")
    texts = body["texts"]
    if not isinstance(texts, list) or not texts:
        raise bad_request("`texts` must be a non-empty list of strings")
    if len(texts) > limit:
        raise ApiError(413, "too_many_texts", f"at most {limit} texts per request (QAIO_MAX_BULK_TEXTS)")
    return [v.text_value(text, f"texts[{i}]", max_chars) for i, text in enumerate(texts)]


def _failure(err: Exception) -> ApiError:
    return engine_error(err) if isinstance(err, RequestFailed) else err


def bulk_sentiment(body: dict):
    svc = service()
    cfg = svc.config
    texts = _texts(body, cfg.max_bulk_texts, cfg.max_input_chars)
    langs = [_language(body, text) for text in texts]
    deadline = svc.deadline(v.deadline_ms(body, cfg.sentiment_deadline_ms), g.arrived)
    g.log_fields.update(task="sentiment", input_chars=sum(map(len, texts)), texts=len(texts))
    # At most a window of its texts is queued at once, so one bulk request cannot fill the queue that
    # every client shares; the window is what a pass scores anyway. A window's texts are tokenized and
    # sent to the engine together.
    window = max(1, min(cfg.max_batch_size, cfg.queue_capacity // 4))
    calibration = svc.calibration()
    submitted: list = []
    results, jobs, failed = [], [], []
    try:
        for start in range(0, len(texts), window):
            outcomes = svc.submit_sentiments(texts[start:start + window], langs[start:start + window], deadline)
            submitted += outcomes
            for job in outcomes:
                if not isinstance(job, ApiError):
                    track([job])  # a prompt each
            for job, lang in zip(outcomes, langs[start:start + window]):
                outcome = job if isinstance(job, ApiError) else None
                if outcome is None:
                    try:
                        scores = job.wait(g.client_gone).scores
                    except RequestFailed as err:
                        if err.code == "client_closed_request":
                            raise
                        outcome = _failure(err)
                if outcome is not None:
                    failed.append(outcome)
                    results.append({"error": {"code": outcome.code, "message": outcome.message,
                                              "status": outcome.status}})
                    continue
                jobs.append(job)
                results.append({"sentiment": sentiment_view(scores, lang, calibration), "lang": lang})
    except BaseException:
        for job in submitted:
            if not isinstance(job, ApiError):
                job.cancel("client_gone")
        raise
    if not jobs:  # nothing scored: the request failed as its texts did (a 503 nginx may retry elsewhere)
        raise failed[0]
    g.cacheable = not failed
    answer = envelope(jobs, results=results, failed=len(failed))
    # The texts were scored side by side: the request waited as long as its slowest text did.
    answer["timing"].update(queue_ms=round(max(j.queue_ms for j in jobs), 2),
                            compute_ms=round(max(j.compute_ms for j in jobs), 2))
    return jsonify(answer)
