"""The one model of a worker process: loading, the sentiment forward pass and batched generation."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from .config import WorkerConfig
from .generation import GenerationRow, RowSampling, RowStopping
from .prompts import LABELS, ChatMLPrompter

log = logging.getLogger(__name__)

DEMO_MARKER = "qaio_demo_model.json"  # written by demo_model into every model it builds

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        # bf16 has no fast path on most CPUs (prefill 4-5x slower here); GPUs want it.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[setting]


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def free_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ModelService:
    """Owns the tokenizer and model of this process; every call comes from the batcher thread."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer = None
        self.model = None
        self.prompter: ChatMLPrompter | None = None
        self.demo_info: dict | None = None
        self.load_seconds: float | None = None

    @property
    def is_demo(self) -> bool:
        return self.demo_info is not None

    def load(self) -> None:
        started = time.monotonic()
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        source = self.config.model
        marker = os.path.join(source, DEMO_MARKER)
        if os.path.isfile(marker):
            with open(marker, encoding="utf-8") as fh:
                self.demo_info = json.load(fh)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        # dtype is always explicit: transformers otherwise takes it from config.json (bf16 for Qwen).
        model = AutoModelForCausalLM.from_pretrained(source, dtype=self.dtype)
        model.to(self.device).eval()
        self.eos_token_ids = self._eos_ids(model)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids)
        # Replace the hub's sampling defaults (top_k, repetition_penalty, ...): every request sets its own.
        model.generation_config = GenerationConfig(
            eos_token_id=sorted(self.eos_token_ids), pad_token_id=self.pad_token_id,
            bos_token_id=model.config.bos_token_id)
        self.model = model
        self.prompter = ChatMLPrompter(self.tokenizer)
        self.load_seconds = time.monotonic() - started

    def _eos_ids(self, model) -> set[int]:
        ids = {self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        for candidate in (self.tokenizer.eos_token_id, model.config.eos_token_id):
            if isinstance(candidate, int):
                ids.add(candidate)
            elif candidate:
                ids.update(candidate)
        return {i for i in ids if i is not None and i >= 0}

    def warmup(self) -> None:
        """One real sentiment forward and a short generation, so the first request pays no lazy init."""
        prompter = self.prompter
        self.score_sentiment([prompter.sentiment_ids("warm-up", "en")])
        self.generate([GenerationRow(prompter.chat_ids([]), max_new_tokens=2)])

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _left_pad(self, sequences: Sequence[Sequence[int]]):
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def score_sentiment(self, prompts: Sequence[Sequence[int]]) -> list[dict[str, float]]:
        """Label probabilities from one left-padded forward pass over the last position only."""
        ids, mask = self._left_pad(prompts)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=False, logits_to_keep=1)
        label_logits = out.logits[:, -1, list(self.prompter.label_token_ids)].float()
        probs = label_logits.softmax(dim=-1).cpu().tolist()
        return [dict(zip(LABELS, row)) for row in probs]

    @torch.inference_mode()
    def generate(self, rows: Sequence[GenerationRow]) -> None:
        """Generate for all rows in one batch; fills each row's tokens and finish_reason."""
        ids, mask = self._left_pad([r.prompt_ids for r in rows])
        stopping = RowStopping(rows, self.eos_token_ids)
        self.model.generate(
            input_ids=ids, attention_mask=mask,
            max_new_tokens=max(r.max_new_tokens for r in rows),
            do_sample=any(r.temperature > 0 for r in rows),
            logits_processor=LogitsProcessorList([RowSampling(rows, self.device)]),
            stopping_criteria=StoppingCriteriaList([stopping]),
        )
        for row in rows:
            if row.finish_reason is None:  # generate stopped on its own length limit
                row.finish_reason = "length"

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def describe(self) -> dict:
        return {"model": self.config.model_name, "source": self.config.model, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "demo_model": self.is_demo}
