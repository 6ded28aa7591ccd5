"""The one model of a worker process: loading, the sentiment forward pass and batched generation."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Sequence

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig, LogitsProcessorList,
                          StoppingCriteriaList)

from .config import WorkerConfig
from .cpu_linear import onednn_available, pack_linears
from .generation import GenerationRow, RowSampling, RowStopping
from .prompts import LABELS, ChatMLPrompter

log = logging.getLogger(__name__)

DEMO_MARKER = "qaio_demo_model.json"  # written by demo_model into every model it builds

# A sentiment sub-batch is cut when padding would exceed this share of its real tokens, once it
# already holds enough tokens to keep the matrix multiplies efficient.
MAX_PADDING_SHARE = 0.3
MIN_BUCKET_TOKENS = 64

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def length_buckets(lengths: Sequence[int]) -> list[list[int]]:
    """Indices grouped so that left-padding each group to its longest member wastes little compute."""
    buckets: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        padded = (len(current) + 1) * lengths[i]  # sorted: the newcomer is the longest
        if current and real >= MIN_BUCKET_TOKENS and padded > (1 + MAX_PADDING_SHARE) * (real + lengths[i]):
            buckets.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        buckets.append(current)
    return buckets


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
    """A CUDA out-of-memory error, raised here or reported as text by the continuous batch."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


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
        self.parameter_count: int | None = None
        self.packed_linears = 0  # nn.Linear layers running on oneDNN
        # Fixed prompt prefix (token ids) -> its per-layer (key, value) tensors, batch size 1.
        self.prefix_kv: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}

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
        self.parameter_count = sum(p.numel() for p in model.parameters())
        if self._use_onednn_linear():
            self.packed_linears = pack_linears(model)
        self.eos_token_ids = self._eos_ids(model)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids)
        # Replace the hub's sampling defaults (top_k, repetition_penalty, ...): every request sets its own.
        model.generation_config = GenerationConfig(
            eos_token_id=sorted(self.eos_token_ids), pad_token_id=self.pad_token_id,
            bos_token_id=model.config.bos_token_id)
        self.model = model
        self.prompter = ChatMLPrompter(self.tokenizer)
        if self.config.prefix_cache:
            for prefix in self.prompter.sentiment_prefix_ids.values():
                self.prefix_kv[tuple(prefix)] = self._compute_prefix_kv(prefix)
        self.load_seconds = time.monotonic() - started

    def _use_onednn_linear(self) -> bool:
        setting = self.config.cpu_linear
        if setting == "default" or self.device.type != "cpu" or self.dtype != torch.float32:
            return False
        if setting == "onednn" and not onednn_available():
            raise RuntimeError("QAIO_CPU_LINEAR=onednn but this torch has no oneDNN linear")
        return onednn_available()

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

    def _left_pad(self, sequences: Sequence[Sequence[int]]):
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def _compute_prefix_kv(self, prefix: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = self.model(input_ids=torch.tensor([list(prefix)], device=self.device), use_cache=True)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def _cached_prefix(self, prompt: Sequence[int]) -> tuple[int, ...] | None:
        for prefix in self.prefix_kv:
            if len(prompt) > len(prefix) and tuple(prompt[:len(prefix)]) == prefix:
                return prefix
        return None

    @torch.inference_mode()
    def score_sentiment(self, prompts: Sequence[Sequence[int]]) -> list[dict[str, float]]:
        """Label probabilities: softmax over the label tokens' logits at the last position.

        Prompts starting with a cached prefix run only their own tokens on top of the prefix's KV
        cache; the rest run whole. Within each, rows of similar length share a left-padded pass.
        """
        groups: dict[tuple[int, ...] | None, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(self._cached_prefix(prompt), []).append(i)
        logits = torch.empty((len(prompts), len(LABELS)), dtype=torch.float32)
        for prefix, rows in groups.items():
            skip = len(prefix) if prefix else 0
            for bucket in length_buckets([len(prompts[i]) - skip for i in rows]):
                members = [rows[j] for j in bucket]
                logits[members] = self._label_logits([prompts[i] for i in members], prefix).float().cpu()
        probs = logits.softmax(dim=-1).tolist()
        return [dict(zip(LABELS, row)) for row in probs]

    def _label_logits(self, prompts: Sequence[Sequence[int]], prefix: tuple[int, ...] | None) -> torch.Tensor:
        labels = list(self.prompter.label_token_ids)
        if prefix is None:
            ids, mask = self._left_pad(prompts)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             use_cache=False, logits_to_keep=1)
            return out.logits[:, -1, labels]
        # Suffixes are left-padded, so padding sits between the prefix and each text: the mask hides
        # it and positions continue from the prefix, which makes this equal to the full computation.
        ids, suffix_mask = self._left_pad([p[len(prefix):] for p in prompts])
        batch = len(prompts)
        mask = torch.cat([torch.ones((batch, len(prefix)), dtype=torch.long, device=self.device), suffix_mask], 1)
        positions = len(prefix) + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                              for k, v in self.prefix_kv[prefix]])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, labels]

    @torch.inference_mode()
    def generate(self, rows: Sequence[GenerationRow], between_steps=None) -> None:
        """Generate for all rows in one batch; fills each row's tokens and finish_reason.

        `between_steps`, if given, is called after every decode step (other forward passes may run there).
        """
        ids, mask = self._left_pad([r.prompt_ids for r in rows])
        stopping = RowStopping(rows, self.eos_token_ids, between_steps=between_steps)
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
                "dtype": str(self.dtype).replace("torch.", ""), "demo_model": self.is_demo,
                "cpu_linear": "onednn" if self.packed_linears else "default",
                "prefix_cache": bool(self.prefix_kv)}
