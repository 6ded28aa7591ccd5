"""The one model of an engine: device and dtype, loading (with its fallback and its markers), and the
engine and sentiment scorer built on it."""
from __future__ import annotations

import gc
import json
import logging
import os
import re
import time
from typing import Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..calibration import CONTENT_FREE_TEXT, NONE, Calibration, content_free, load_fitted
from .. import int8_kernel, memory, precision
from ..config import WorkerConfig
from ..cpu_linear import onednn_available, pack_linears
from ..int8_linear import int8_matmul_available, quantize_model
from ..engine.engine import Engine
from ..prompts import ChatMLPrompter, load_tokenizer
from .building import build_engine, warm_up
from .sentiment import score_prompts

log = logging.getLogger(__name__)

DEMO_MARKER = "qaio_demo_model.json"  # written by qaio_models.demo into every model it builds
STAND_IN_MARKER = "qaio_stand_in.json"  # written by qaio_models.stand_in beside the stand-in's weights

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """The dtype of activations and of the weights left unquantised (int8: float32); `auto` before a
    CPU's measurement (precision.choose, at load) is float32."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.float32 if setting == "int8" else _DTYPES[setting]


def _model_shape(source: str) -> tuple[int, int]:
    """hidden_size and intermediate_size of the model at source (the 0.5B's when unreadable)."""
    try:
        config = AutoConfig.from_pretrained(source)
        return int(config.hidden_size), int(config.intermediate_size)
    except Exception:
        return 896, 4864


def own_memory(model) -> None:
    """Copy the parameters still in the checkpoint's memory map (transformers maps safetensors files and
    its tensors read from the map) into memory of the process's own: once nothing refers to the map it
    is unmapped, so the process holds one copy of its weights, the packed or quantised one, and not the
    file's float32 pages beside it (1.9 GB of RSS on the 0.5B shape). A parameter shared by two modules
    (tied embeddings) is one Parameter object, copied once."""
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    gc.collect()
    # What loading, packing and quantising freed stays in glibc's heap (its mmap threshold has grown
    # past tensor sizes by then) until trimmed: 1.4 GB of the int8 0.5B shape's RSS.
    memory.trim()


class ServedModel:
    """What responses say about the served model: a demo (random weights) or the offline stand-in."""

    demo_info: dict | None = None
    stand_in_info: dict | None = None
    is_null = False  # QAIO_NULL_MODEL: no model at all (model/null.py)

    @property
    def is_demo(self) -> bool:
        return self.demo_info is not None

    @property
    def is_stand_in(self) -> bool:
        return self.stand_in_info is not None


class ModelService(ServedModel):
    """Owns the tokenizer and model of this process; every call comes from the engine loop's thread."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        # The weights' precision: QAIO_DTYPE, or what `auto` resolved to (on a CPU, measured at load).
        self.precision = str(self.dtype).replace("torch.", "") if config.dtype == "auto" else config.dtype
        self.precision_report: dict | None = None
        self.tokenizer = None
        self.model = None
        self.prompter: ChatMLPrompter | None = None
        self.demo_info: dict | None = None
        self.stand_in_info: dict | None = None  # the offline stand-in (qaio_models.stand_in) is served
        self.served_source = config.model  # what is served: QAIO_MODEL, or QAIO_FALLBACK_MODEL when it failed
        self.fallback_reason: str | None = None
        self.load_seconds: float | None = None
        self.parameter_count: int | None = None
        self.packed_linears = 0  # nn.Linear layers running on oneDNN
        self.int8_linears = 0  # nn.Linear layers with 8-bit weights (QAIO_DTYPE=int8)
        self.int8_kernel: str | None = None  # what runs their decode rows, and why
        self.engine: Engine | None = None
        self.calibration: Calibration = NONE

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
        if self.config.dtype == "auto" and self.device.type == "cpu":
            # int8 only where this torch has both its int8 kernels (fbgemm is x86 only; the probe times the
            # layers' kernel alone) and not with the Triton kernels (they read plain weights).
            int8_ok = int8_matmul_available() and self.config.kernels != "triton"
            candidates = [c for c in precision.CANDIDATES if c != "int8" or int8_ok]
            self.precision, self.precision_report = precision.choose(
                *_model_shape(self.config.model), threads=self.config.torch_threads, candidates=candidates,
                onednn=self.config.cpu_linear != "default", kernel_dir=int8_kernel.probe_dir(self.config) if int8_ok else None)
            self.dtype = resolve_dtype(self.precision, self.device)
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
        self.tokenizer = load_tokenizer(source)
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
        if self.precision == "int8":
            if not int8_matmul_available():
                raise RuntimeError("QAIO_DTYPE=int8 needs torch's fbgemm int8 linear (an x86 CPU build of torch)")
            kernel, self.int8_kernel = int8_kernel.serving(self.config)
            self.int8_linears = quantize_model(model, kernel)
        elif self._use_onednn_linear():
            self.packed_linears = pack_linears(model)
        if self.device.type == "cpu":
            own_memory(model)
        self.engine = self.build_engine(model, label_head)
        self.calibration = self._calibration()

    def _calibration(self) -> Calibration:
        setting = self.config.calibration
        if setting in ("auto", "fitted"):
            fitted = load_fitted(self.served_source, self.name)
            if fitted is not None:
                return fitted
        if setting == "content_free":
            return content_free(lambda lang: self.score_sentiment([self.prompter.sentiment_ids(CONTENT_FREE_TEXT, lang)])[0])
        return NONE

    def build_engine(self, model, label_head: torch.Tensor) -> Engine:
        return build_engine(model, self.config, self.device, self.dtype, label_head, self.eos_token_ids)

    def _use_onednn_linear(self) -> bool:
        setting = self.config.cpu_linear
        if setting == "default" or self.device.type != "cpu" or self.dtype not in (torch.float32, torch.bfloat16):
            return False
        if self.config.kernels == "triton":  # the kernel path reads the layers' plain weights
            return False
        if setting == "onednn" and not onednn_available(self.dtype):
            raise RuntimeError(f"QAIO_CPU_LINEAR=onednn but this torch has no oneDNN linear for {self.dtype} on this CPU")
        return onednn_available(self.dtype)

    def _eos_ids(self, model) -> set[int]:
        """ChatML's end of turn, the tokenizer's end of text and the model config's (None: no model)."""
        ids = {self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        for candidate in (self.tokenizer.eos_token_id, model.config.eos_token_id if model is not None else None):
            if isinstance(candidate, int):
                ids.add(candidate)
            elif candidate:
                ids.update(candidate)
        return {i for i in ids if i is not None and i >= 0}

    def warmup(self) -> None:
        warm_up(self)

    def score_sentiment(self, prompts: Sequence[Sequence[int]]) -> list[dict[str, float]]:
        """Label probabilities (softmax over the label tokens' logits) after each prompt, through the
        engine (not while the engine loop serves: only its thread steps the engine)."""
        return score_prompts(self.engine, prompts)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _sampling_graphs(self) -> int:
        """Captured sampling graphs (0 where none were: no decode graphs, turned off, or a failed capture)."""
        picks = self.engine.picker.graphs if self.engine is not None else None
        return len(picks.graphs) if picks is not None else 0

    def describe(self) -> dict:
        runner = self.engine.runner if self.engine is not None else None
        return {"model": self.name, "source": self.served_source, "configured_model": self.config.model,
                "device": str(self.device),
                "dtype": self.precision, "dtype_measured": self.precision_report,
                "demo_model": self.is_demo, "stand_in_model": self.is_stand_in,
                "cpu_linear": "int8" if self.int8_linears else "onednn" if self.packed_linears else "default",
                "int8_kernel": self.int8_kernel,
                "prefix_cache": self.config.prefix_cache,
                "kv_block_tokens": runner.block_tokens if runner else None,
                "slots": runner.slots if runner else None,
                "cuda_graphs": len(runner.graphs) if runner else 0,
                "sampling_graphs": self._sampling_graphs(),
                "compiled": runner.compiled if runner else False,
                "graph_capture_seconds": round(runner.capture_seconds, 2) if runner else None}
