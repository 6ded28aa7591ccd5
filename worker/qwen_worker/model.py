"""The one model of a worker process: loading, the sentiment prefix cache, and the engine that runs it."""
from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import WorkerConfig
from .cpu_linear import onednn_available, pack_linears
from .engine import GenerationRow
from .engine.engine import Engine
from .engine.model_runner import ModelRunner
from .engine.scheduler import Scheduler
from .prompts import LABELS, ChatMLPrompter
from .stand_in_model import STAND_IN_MARKER

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


def model_key(source: str) -> str:
    """A model id or path as the front door's cache key holds it: characters outside [A-Za-z0-9._/:-]
    become `_` (nginx/qaio-env.envsh applies the same rule to QAIO_MODEL)."""
    return re.sub(r"[^A-Za-z0-9._/:-]", "_", source)


def _read_marker(source: str, marker: str) -> dict | None:
    path = os.path.join(source, marker)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


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
    """A CUDA out-of-memory error: torch's own, or one that a kernel library raises as a plain
    RuntimeError ("CUDA error: out of memory")."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# CUDA errors that are not an out-of-memory poison the context: every later call fails the same way.
_STICKY_DEVICE_ERROR = re.compile(
    r"CUDA error|device-side assert|illegal memory access|illegal instruction|misaligned address|"
    r"unspecified launch failure|CUBLAS_STATUS_(?!ALLOC_FAILED)|CUDNN_STATUS_EXECUTION_FAILED|"
    r"cudaErrorLaunch|uncorrectable ECC error")


def is_fatal_device_error(exc: BaseException) -> bool:
    """A device error that leaves the process unusable (CUDA's sticky errors), never an out-of-memory.
    torch raises these as torch.AcceleratorError (RuntimeError in older releases); the message decides."""
    return not is_oom(exc) and bool(_STICKY_DEVICE_ERROR.search(str(exc)))


def free_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ServedModel:
    """What responses say about the served model: a demo (random weights) or the offline stand-in."""

    demo_info: dict | None = None
    stand_in_info: dict | None = None

    @property
    def is_demo(self) -> bool:
        return self.demo_info is not None

    @property
    def is_stand_in(self) -> bool:
        return self.stand_in_info is not None


class ModelService(ServedModel):
    """Owns the tokenizer and model of this process; every call comes from the batcher thread."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer = None
        self.model = None
        self.prompter: ChatMLPrompter | None = None
        self.demo_info: dict | None = None
        self.stand_in_info: dict | None = None  # the offline stand-in (qwen_worker.stand_in_model) is served
        self.served_source = config.model  # what is served: QAIO_MODEL, or QAIO_FALLBACK_MODEL when it failed
        self.fallback_reason: str | None = None
        self.load_seconds: float | None = None
        self.parameter_count: int | None = None
        self.packed_linears = 0  # nn.Linear layers running on oneDNN
        # Fixed prompt prefix (token ids) -> its per-layer (key, value) tensors, batch size 1.
        self.prefix_kv: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.engine: Engine | None = None

    @property
    def name(self) -> str:
        """The served model's name: QAIO_MODEL_NAME, or the fallback's own name once it stood in."""
        if self.served_source == self.config.model:
            return self.config.model_name
        return self.served_source.rstrip("/").split("/")[-1]

    @property
    def identity(self) -> str:
        """The served model as the front door's cache key names it (model_key of its source)."""
        return model_key(self.served_source)

    def load(self) -> None:
        started = time.monotonic()
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        try:
            model = self._load_from(self.config.model)
        except Exception as exc:
            if not self.config.fallback_model:
                raise
            self.fallback_reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            log.error("could not load QAIO_MODEL=%s (%s); serving QAIO_FALLBACK_MODEL=%s instead",
                      self.config.model, self.fallback_reason, self.config.fallback_model)
            model = self._load_from(self.config.fallback_model)
        self._prepare(model)
        self.load_seconds = time.monotonic() - started

    def _load_from(self, source: str):
        self.demo_info = _read_marker(source, DEMO_MARKER)
        self.stand_in_info = _read_marker(source, STAND_IN_MARKER)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        # dtype is always explicit: transformers otherwise takes it from config.json (bf16 for Qwen).
        model = AutoModelForCausalLM.from_pretrained(source, dtype=self.dtype)
        self.served_source = source
        return model

    def _prepare(self, model) -> None:
        model.to(self.device).eval()
        self.parameter_count = sum(p.numel() for p in model.parameters())
        self.eos_token_ids = self._eos_ids(model)
        self.model = model
        self.prompter = ChatMLPrompter(self.tokenizer)
        # The sentiment head: the output embedding rows of the three label tokens, taken before the
        # linears are repacked for the CPU (a packed head has no plain weight left).
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("an output layer with a bias is not supported")
        label_head = head.weight.detach()[list(self.prompter.label_token_ids)].clone()
        if self.config.prefix_cache:
            for prefix in self.prompter.sentiment_prefix_ids.values():
                self.prefix_kv[tuple(prefix)] = self._compute_prefix_kv(prefix)
        if self._use_onednn_linear():
            self.packed_linears = pack_linears(model)
        self.engine = self._build_engine(model, label_head)

    def _build_engine(self, model, label_head: torch.Tensor) -> Engine:
        cfg = self.config
        max_tokens = cfg.max_prompt_tokens + cfg.max_tokens_limit
        chunk = cfg.prefill_chunk_tokens or (2048 if self.device.type == "cuda" else 512)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            self._check_kv_fits(model, max_tokens)
        use_graphs = cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and on_gpu)
        compile = cfg.compile == "on"
        runner = ModelRunner(model, slots=cfg.max_batch_size, max_tokens=max_tokens, prefill_chunk=chunk,
                             use_graphs=use_graphs, label_head=label_head, compile=compile)
        try:
            runner.capture_graphs()
        except Exception:
            if not runner.compiled:
                raise
            log.exception("torch.compile failed; the engine runs eager passes instead")
            runner.disable_compile()
            runner.capture_graphs()
        return Engine(runner, Scheduler(cfg.max_batch_size, max_tokens, chunk), self.eos_token_ids)

    def _check_kv_fits(self, model, max_tokens: int) -> None:
        """Fail the load with the settings to change, not with an opaque CUDA out-of-memory, when the
        KV slots would not leave room for the model's activations and graphs."""
        from .engine.kv_cache import SlotKVCache

        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        needed = SlotKVCache.bytes_needed(c.num_hidden_layers, self.config.max_batch_size, c.num_key_value_heads,
                                          max_tokens, head_dim, self.dtype)
        free, _ = torch.cuda.mem_get_info(self.device)
        if needed > 0.8 * free:
            raise RuntimeError(
                f"the KV slots need {needed / 2**30:.1f} GiB but {self.device} has {free / 2**30:.1f} GiB free: "
                f"lower QAIO_MAX_BATCH_SIZE ({self.config.max_batch_size} slots) or QAIO_MAX_PROMPT_TOKENS + "
                f"QAIO_MAX_TOKENS_LIMIT ({max_tokens} tokens per slot)")
        log.info("KV slots: %d x %d tokens, %.1f GiB of %.1f GiB free", self.config.max_batch_size, max_tokens,
                 needed / 2**30, free / 2**30)

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
        """Real sentiment passes and a short generation through the engine, so the first request pays
        no lazy initialisation (and a broken setup fails the load, not a request)."""
        prompter = self.prompter
        self.score_sentiment([prompter.sentiment_ids("warm-up", "en"), prompter.sentiment_ids("预热", "zh")])
        self.score_sentiment([prompter.sentiment_ids("warm-up", "en")] * min(4, self.engine.runner.slots))
        self.engine.run([GenerationRow(prompter.chat_ids([]), max_new_tokens=2)
                         for _ in range(min(2, self.engine.runner.slots))])

    def _compute_prefix_kv(self, prefix: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed sentiment prefix's per-layer (key, value) [1, kv_heads, len, head_dim], by the model itself."""
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([list(prefix)], device=self.device), use_cache=True)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def _cached_prefix(self, prompt: Sequence[int]) -> tuple[int, ...] | None:
        for prefix in self.prefix_kv:
            if len(prompt) > len(prefix) and tuple(prompt[:len(prefix)]) == prefix:
                return prefix
        return None

    def score_sentiment(self, prompts: Sequence[Sequence[int]]) -> list[dict[str, float]]:
        """Label probabilities: softmax over the label tokens' logits after each prompt.

        Prompts starting with a cached prefix run only their own tokens on top of the prefix's keys and
        values; the rest run whole. Each group is one padded, fixed-shape pass.
        """
        groups: dict[tuple[int, ...] | None, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(self._cached_prefix(prompt), []).append(i)
        logits = torch.empty((len(prompts), len(LABELS)), dtype=torch.float32)
        for prefix, rows in groups.items():
            skip = len(prefix) if prefix else 0
            cached = self.prefix_kv[prefix] if prefix else None
            # On a CPU every padded token costs compute, so similar lengths share a pass; on a GPU one
            # pass is faster than several smaller ones (launches, not arithmetic, bound it there).
            parts = length_buckets([len(prompts[i]) - skip for i in rows]) if self.device.type == "cpu" \
                else [list(range(len(rows)))]
            for part in parts:
                members = [rows[j] for j in part]
                logits[members] = self.engine.score(cached, [prompts[i][skip:] for i in members])
        probs = logits.softmax(dim=-1).tolist()
        return [dict(zip(LABELS, row)) for row in probs]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def describe(self) -> dict:
        runner = self.engine.runner if self.engine is not None else None
        return {"model": self.name, "source": self.served_source, "configured_model": self.config.model,
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "demo_model": self.is_demo, "stand_in_model": self.is_stand_in,
                "cpu_linear": "onednn" if self.packed_linears else "default",
                "prefix_cache": bool(self.prefix_kv),
                "slots": runner.slots if runner else None,
                "cuda_graphs": len(runner.graphs) if runner else 0,
                "compiled": runner.compiled if runner else False,
                "graph_capture_seconds": round(runner.capture_seconds, 2) if runner else None}
