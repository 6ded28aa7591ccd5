"""The design this product replaces, kept only to be measured against: one request at a time.

A Flask app around `model.generate` behind one lock: no batching, no prefix reuse, torch's default
kernels, and sentiment by generating a few tokens of text and parsing a label out of them (a reply
that names no label counts as neutral). Same prompts and HTTP shapes as the worker, so a benchmark
client can talk to either.

    QAIO_MODEL=models/qwen2.5-0.5b-shape gunicorn -c worker/gunicorn.conf.py 'bench.baseline_app:create_app()'
"""
from __future__ import annotations

import json
import threading
import time

import torch
from flask import Flask, Response, jsonify, request
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from qwen_worker.config import WorkerConfig
from qwen_worker.model import resolve_device, resolve_dtype
from qwen_worker.prompts import LABELS, ChatMLPrompter, Message, detect_language


def create_app(config: WorkerConfig | None = None) -> Flask:
    config = config or WorkerConfig.from_env()
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    # The old design on the device it would run on: float32 on a CPU, bfloat16 on a GPU.
    device = resolve_device(config.device)
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=resolve_dtype(config.dtype, device)).to(device).eval()
    prompter = ChatMLPrompter(tokenizer)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id]
    one_at_a_time = threading.Lock()
    app = Flask(__name__)

    def generate(ids, max_new_tokens, streamer=None):
        with one_at_a_time, torch.inference_mode():
            out = model.generate(torch.tensor([ids], device=device),
                                 attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id, streamer=streamer)
        return out[0, len(ids):].tolist()

    @app.get("/readyz")
    def readyz():
        return jsonify({"status": "ready", "baseline": True})

    @app.post("/v1/sentiment")
    def sentiment():
        text = request.get_json()["text"]
        started = time.perf_counter()
        # Two steps: the label word and the end token a real model emits (the least it needs).
        reply = tokenizer.decode(generate(prompter.sentiment_ids(text, detect_language(text)), 2),
                                 skip_special_tokens=True).strip().lower()
        label = next((name for name in LABELS if reply.startswith(name)), "neutral")
        return jsonify({"sentiment": {"label": label, "parsed_from": reply},
                        "timing": {"compute_ms": (time.perf_counter() - started) * 1000}})

    @app.post("/v1/chat")
    def chat():
        body = request.get_json()
        ids = prompter.chat_ids([Message("user", body["text"])])
        max_tokens = int(body.get("max_tokens", 32))
        if not body.get("stream"):
            tokens = generate(ids, max_tokens)
            return jsonify({"reply": tokenizer.decode(tokens, skip_special_tokens=True),
                            "usage": {"completion_tokens": len(tokens)}})
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        result = {}
        worker = threading.Thread(target=lambda: result.update(tokens=generate(ids, max_tokens, streamer)))
        worker.start()

        def events():
            for delta in streamer:
                if delta:
                    yield f"data: {json.dumps({'delta': delta})}\n\n"
            worker.join()
            usage = {"completion_tokens": len(result.get("tokens", []))}
            yield f"data: {json.dumps({'done': True, 'usage': usage})}\n\n"

        return Response(events(), mimetype="text/event-stream")

    return app
