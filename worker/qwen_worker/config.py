"""Worker configuration: every setting is a `QAIO_*` environment variable, read and validated here."""
from __future__ import annotations

import dataclasses
import os
import re
import socket
from typing import Any, Mapping

from .devices import cuda_expected

ENV_PREFIX = "QAIO_"
# Threads beyond the admission bound: requests past it get their 503 at once, probes and scrapes answer.
SPARE_THREADS = 32
# A token nginx can compare inside its configuration (no quotes, no `$`) and long enough to guess at.
ADMIN_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")
SECRETS = ("admin_token",)


class ConfigError(ValueError):
    """Raised at start-up when one or more settings are invalid."""


def _setting(default: Any, help: str, minimum: float | None = None, choices: tuple | None = None):
    return dataclasses.field(default=default, metadata={"help": help, "min": minimum, "choices": choices})


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    # Model and device
    model: str = _setting("Qwen/Qwen2.5-0.5B-Instruct", "Hugging Face hub id or local directory of the chat model")
    fallback_model: str = _setting("", "Local model directory served when QAIO_MODEL cannot be loaded (the worker "
                                       "image sets it to the SmolLM2 stand-in it carries); responses, /readyz and "
                                       "the logs then name the model actually served")
    model_name: str = _setting("", "Name reported in responses and /v1/models (default: the model's directory or hub name)")
    device: str = _setting("auto", "`auto` (cuda:0 when present, else cpu), `cpu`, `cuda` or `cuda:N`")
    dtype: str = _setting("auto", "`auto` (GPU: bfloat16; CPU: whichever of float32, bfloat16 and int8 runs this "
                                  "model's matrix shapes fastest here, measured at load in child processes), "
                                  "`float32`, `bfloat16`, `float16`, or `int8` (CPU: the linear layers', the LM "
                                  "head's and the embedding's weights in 8 bits with a scale per output channel, "
                                  "the rest float32; docs/cpu-precision.md)",
                          choices=("auto", "float32", "bfloat16", "float16", "int8"))
    torch_threads: int = _setting(0, "CPU threads for torch (0: torch's default, one per core)", minimum=0)
    null_model: bool = _setting(False, "Serve no model: the tokenizer of QAIO_MODEL, prompts, engine, scheduler and "
                                       "HTTP as always, over a forward pass that does no arithmetic (a fixed cycle "
                                       "of tokens and label scores), named `null` in every answer; for measuring "
                                       "the host path (make bench-host)")
    step_delay_ms: float = _setting(0.0, "Sleep this long after every engine step: a stand-in for a slower device "
                                         "(a throttled CPU, a sick GPU), for the routing tests and make routing-bench; "
                                         "0 in service", minimum=0)
    instance_id: str = _setting("", "Name of this instance in responses, logs and metrics (default: host name)")
    warmup: bool = _setting(True, "Run a warm-up forward pass before reporting ready")
    # HTTP server (read by gunicorn.conf.py)
    host: str = _setting("127.0.0.1", "Address gunicorn binds to")
    port: int = _setting(8001, "Port gunicorn binds to", minimum=1)
    metrics_port: int = _setting(0, "A second port that serves /metrics and nothing else, which then leaves "
                                    "QAIO_PORT (so a NetworkPolicy can let Prometheus reach the metrics and not "
                                    "the API); 0: /metrics on QAIO_PORT", minimum=0)
    engine_process: str = _setting("auto", "`on`: the model runs in an engine process of its own and gunicorn's "
                                           "processes only speak HTTP (so HTTP never shares the engine's GIL); "
                                           "`off`: each gunicorn process runs its own model; `auto`: on with a GPU",
                                   choices=("auto", "on", "off"))
    workers: int = _setting(0, "gunicorn processes: with an engine process, API processes sharing it; without, "
                               "each loads its own model copy (0: 4 API processes with an engine process on a GPU, "
                               "else 1)", minimum=0)
    http_worker: str = _setting("auto", "gunicorn's worker class: `gevent` (one event loop per process, a greenlet "
                                        "per request: docs/benchmarks-host.md measured less CPU per request and per "
                                        "streamed token than threads), `gthread` (a thread per request), `auto`: "
                                        "gevent with an engine process, gthread without one (a process that runs "
                                        "its own model needs real threads beside the engine's)",
                                choices=("auto", "gevent", "gthread"))
    threads: int = _setting(0, "Connections per gunicorn process (gthread: its threads): every open request, streams "
                               "included, holds one (0: QAIO_MAX_BATCH_SIZE + QAIO_QUEUE_CAPACITY + 32 spare, so a "
                               "request past the bound is refused at once and probes and /metrics always find room)",
                            minimum=0)
    stream_coalesce_ms: float = _setting(20.0, "A stream sends the tokens of this many milliseconds as one event (the "
                                              "first token goes at once); the engine holds them back and sends them as "
                                              "one message", minimum=0)
    cpu_linear: str = _setting("auto", "Linear-layer kernels on CPU: `onednn` (weights prepacked once), `default` "
                                       "(torch's F.linear), `auto` (onednn for float32 and bfloat16 on CPU when available)",
                               choices=("auto", "onednn", "default"))
    int8_kernel: str = _setting("auto", "Kernel of QAIO_DTYPE=int8's decode rows: `auto` (the project's own, "
                                        "AVX-512 VNNI or AVX2, built once into QAIO_KERNEL_DIR and tried in a child "
                                        "process first; torch's where it cannot be built or fails its trial), `torch`",
                                choices=("auto", "torch"))
    kernel_dir: str = _setting("", "Directory of the compiled CPU kernel (QAIO_INT8_KERNEL): a build is reused by "
                                   "every worker and rebuilt when its source or torch changes; the image carries "
                                   "one built (default: ~/.cache/qaio/kernels)")
    calibration: str = _setting("auto", "Sentiment confidence calibration: `fitted` (the model's `make calibrate` fit, "
                                        "none without one), `content_free` (label-free: divided by the scores of a "
                                        "content-free text), `none`, `auto` (fitted where the model has a fit, else "
                                        "none)", choices=("auto", "fitted", "content_free", "none"))
    prefix_cache: bool = _setting(True, "Reuse computed keys and values of prompt prefixes: generation prompts attach "
                                        "the cached KV blocks they start with (earlier turns of a conversation, "
                                        "shared system prompts, the sentiment instruction)")
    cuda_graphs: str = _setting("auto", "Decode steps as CUDA graphs captured at start-up: `auto` (on a GPU), `on`, `off` "
                                        "(eager, for debugging)", choices=("auto", "on", "off"))
    sampling_graphs: bool = _setting(True, "With decode graphs: a step's penalties, draw and penalty counts as one more "
                                           "captured graph per batch size, so default chats (penalty, temperature, "
                                           "top-p) stay on graphs; rows with a seed or logprobs, and "
                                           "QAIO_SAMPLE_CANDIDATES > 0, run eagerly as without it")
    overlap_steps: bool = _setting(False, "A decode step's tokens stay on the device, feed the next step there, and are "
                                           "read back after it is launched, so on a GPU the host's bookkeeping runs "
                                           "while the device computes. Same tokens; a finished row costs one step more. "
                                           "Off until a GPU run has measured it (docs/gpu-engine-notes.md)")
    compile: str = _setting("off", "`on`: torch.compile the engine's passes (experimental: it recompiles for each "
                                   "shape bucket, and start-up took over 10 minutes on an H100), `off`",
                            choices=("on", "off"))
    kernels: str = _setting("torch", "Decode step's kernels: `torch` (torch's operators, attention by "
                                     "scaled_dot_product_attention over length buckets), `triton` (the engine's own "
                                     "kernels: attention over the KV cache by per-row lengths, RoPE fused with the K/V "
                                     "write, add + RMSNorm, SiLU x mul; one decode graph per batch size). Off until a GPU "
                                     "run has measured it (docs/gpu-engine-notes.md)", choices=("torch", "triton"))
    sdpa_backend: str = _setting("auto", "Attention backend of the passes that use torch's attention (prefill, sentiment, and decode on the "
                                         "`torch` kernels; captured into its graphs): `auto` (torch's choice), "
                                         "`efficient`, `flash`, `cudnn`, `math`",
                                 choices=("auto", "efficient", "flash", "cudnn", "math"))
    sample_candidates: int = _setting(-1, "Sampled rows order only their this many most likely tokens for top-p, "
                                          "exact: a step where some row's nucleus reaches past them sorts the whole "
                                          "vocabulary instead; 0: always the whole vocabulary; -1: 1024 on a CPU "
                                          "(measured), 0 on a GPU until a GPU run has measured it", minimum=-1)
    sample_prefilter: int = _setting(0, "Sampled rows draw from their this many most likely tokens (top-k before "
                                        "top-p; the sort then covers k entries, not the vocabulary); 0: the whole "
                                        "vocabulary, exact", minimum=0)
    prefill_chunk_tokens: int = _setting(0, "Prompt tokens prefilled per engine step, generations' and sentiment "
                                            "texts' alike; longer prompts go in chunks, so running replies wait at "
                                            "most one chunk. Requests whose own tokens fit a quarter of it go first (0: "
                                            "2048 on a GPU, 512 on a CPU)",
                                         minimum=0)
    # Batching and admission
    max_batch_size: int = _setting(0, "Requests generating at once (rows of a decode step; their keys and values "
                                      "live in the KV block pool), and as many sentiment texts being scored beside "
                                      "them (0: 256 on a GPU, 16 on a CPU)", minimum=0)
    kv_cache_mb: float = _setting(0.0, "Size of the KV block pool in MiB (0: on a GPU QAIO_GPU_MEMORY_FRACTION of the "
                                   "memory free after the weights; on a CPU what QAIO_MAX_BATCH_SIZE full-length rows "
                                   "need, at most 1024 MiB, its pages resident only once used). It must hold one "
                                   "row of QAIO_MAX_PROMPT_TOKENS + QAIO_MAX_TOKENS_LIMIT tokens", minimum=0)
    gpu_memory_fraction: float = _setting(0.7, "Share of the GPU memory free after loading the weights that the KV "
                                                "block pool takes when QAIO_KV_CACHE_MB is 0 (the rest: activations, "
                                                "CUDA graphs, sentiment passes)", minimum=0.01)
    kv_block_tokens: int = _setting(16, "Tokens per KV block: the unit of allocation and of prefix reuse", minimum=1)
    batch_wait_ms: float = _setting(10.0, "How long an idle worker waits for more sentiment requests to fill a batch",
                                    minimum=0)
    queue_capacity: int = _setting(0, "Requests that may wait for a slot or a sentiment pass; more are refused with "
                                      "503 (0: twice QAIO_MAX_BATCH_SIZE, at least 64)", minimum=0)
    admit_by_estimate: bool = _setting(True, "Refuse at once (503 deadline_unreachable) a generation that would not "
                                             "get a KV slot and generate before its deadline, by the slots' recent "
                                             "turnover, and a sentiment text that would not be scored before its "
                                             "deadline, by the tokens ahead of it at the recent scoring pace; off: "
                                             "every request the queue has room for waits, and one whose deadline "
                                             "passes answers 504")
    retry_after_s: int = _setting(1, "Retry-After seconds sent with 503 answers", minimum=0)
    # Deadlines (a client may lower them with `deadline_ms` in the body or the X-Deadline-Ms header)
    sentiment_deadline_ms: int = _setting(15000, "Default deadline of a sentiment request", minimum=1)
    chat_deadline_ms: int = _setting(120000, "Default deadline of a chat or analyze request", minimum=1)
    # Input limits
    max_body_bytes: int = _setting(65536, "Largest request body accepted (413 beyond)", minimum=1)
    max_input_chars: int = _setting(4000, "Longest text or single message accepted (413 beyond)", minimum=1)
    max_messages: int = _setting(64, "Most messages in one chat request", minimum=1)
    max_prompt_tokens: int = _setting(4096, "Longest prompt in tokens after templating, for every task (chat, "
                                            "analyze, sentiment, OpenAI): 413 prompt_too_long beyond, before "
                                            "anything is queued", minimum=16)
    # Generation defaults
    default_max_tokens: int = _setting(128, "max_tokens when a chat request gives none", minimum=1)
    max_tokens_limit: int = _setting(1024, "Largest max_tokens a client may ask for", minimum=1)
    default_temperature: float = _setting(0.7, "temperature when a chat request gives none (0: greedy)", minimum=0)
    default_top_p: float = _setting(0.9, "top_p when a chat request gives none", minimum=0)
    default_repetition_penalty: float = _setting(1.1, "repetition_penalty when a generation request gives none "
                                                      "(1: none; docs/repetition.md measured 1.1 against greedy "
                                                      "replies that repeat one phrase)", minimum=0.01)
    max_choices: int = _setting(4, "Largest `n` (choices per request, each a generation row of its own)", minimum=1)
    max_bulk_texts: int = _setting(64, "Most texts in one bulk sentiment request (`texts: [...]`)", minimum=1)
    # Caching by the front door (nginx honours X-Accel-Expires)
    cache_ttl_s: int = _setting(600, "How long nginx may cache a deterministic answer (sentiment, greedy chat); 0: never",
                                minimum=0)
    heap_trim_s: float = _setting(10.0, "Every this many seconds, hand the free pages inside malloc's arenas back to "
                                        "the system (malloc_trim), so resident memory follows what is in use under "
                                        "varying tensor shapes; 0: never", minimum=0)
    # Health
    failure_threshold: int = _setting(3, "Model failures in a row that make /readyz answer 503", minimum=1)
    failure_cooldown_s: float = _setting(30.0, "How long /readyz stays 503 after that", minimum=0)
    device_error_exit_s: float = _setting(5.0, "After a sticky device error (a CUDA error that is not an "
                                               "out-of-memory), the engine stops, what it held is answered 503 "
                                               "and /healthz fails; this many seconds later the process exits so "
                                               "that gunicorn, compose or Kubernetes start a fresh one (0: never "
                                               "exit, only fail /healthz)", minimum=0)
    log_level: str = _setting("INFO", "Python log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    # Operations
    admin_token: str = _setting("", "Bearer token of the admin endpoints (POST /admin/drain, /admin/undrain); nginx "
                                    "reads the same variable and forwards them only with it. Empty: the endpoints "
                                    "do not exist (404). At least 16 of A-Z a-z 0-9 . _ ~ + / = -")

    @classmethod
    def env_name(cls, field_name: str) -> str:
        return ENV_PREFIX + field_name.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "WorkerConfig":
        """Read every setting from `environ` (default os.environ); keyword overrides win. Validates."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(overrides) - set(fields)
        if unknown:
            raise ConfigError(f"unknown settings: {sorted(unknown)}")
        for name, field in fields.items():
            if name in overrides:
                values[name] = overrides[name]
                continue
            raw = environ.get(cls.env_name(name))
            if raw is None or raw == "":
                continue
            try:
                values[name] = _parse(raw, type(field.default))
            except ValueError as exc:
                problems.append(f"{cls.env_name(name)}={raw!r}: {exc}")
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(**values).validated()

    def validated(self) -> "WorkerConfig":
        problems = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            meta = field.metadata
            if meta["min"] is not None and value < meta["min"]:
                problems.append(f"{self.env_name(field.name)} must be >= {meta['min']} (got {value})")
            if meta["choices"] and value not in meta["choices"]:
                problems.append(f"{self.env_name(field.name)} must be one of {meta['choices']} (got {value!r})")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            problems.append(f"QAIO_DEVICE must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        if self.default_max_tokens > self.max_tokens_limit:
            problems.append("QAIO_DEFAULT_MAX_TOKENS must not exceed QAIO_MAX_TOKENS_LIMIT")
        if self.gpu_memory_fraction >= 1:
            problems.append("QAIO_GPU_MEMORY_FRACTION must be below 1")
        if not 0 < self.default_top_p <= 1:
            problems.append("QAIO_DEFAULT_TOP_P must be in (0, 1]")
        if self.metrics_port and self.metrics_port == self.port:
            problems.append("QAIO_METRICS_PORT must differ from QAIO_PORT")
        if self.kernels == "triton" and not cuda_expected(self.device) and os.environ.get("TRITON_INTERPRET") != "1":
            problems.append("QAIO_KERNELS=triton needs a GPU (on a CPU only in Triton's interpreter, "
                            "TRITON_INTERPRET=1, which is for tests)")
        if self.kernels == "triton" and self.cpu_linear == "onednn":
            problems.append("QAIO_CPU_LINEAR=onednn and QAIO_KERNELS=triton do not combine (the kernels read "
                            "the layers' plain weights)")
        if self.dtype == "int8" and cuda_expected(self.device):
            problems.append("QAIO_DTYPE=int8 is for CPUs (a GPU serves bfloat16)")
        if self.dtype == "int8" and self.kernels == "triton":
            problems.append("QAIO_DTYPE=int8 and QAIO_KERNELS=triton do not combine (the kernels read the "
                            "layers' plain weights)")
        if self.admin_token and not ADMIN_TOKEN.fullmatch(self.admin_token):
            problems.append("QAIO_ADMIN_TOKEN must be at least 16 of A-Z a-z 0-9 . _ ~ + / = -")
        if problems:
            raise ConfigError("; ".join(problems))
        fill = {}
        # Sizes that depend on the device: a GPU holds hundreds of rows in one step, a CPU a handful.
        on_gpu = cuda_expected(self.device)
        batch = self.max_batch_size or (256 if on_gpu else 16)
        queue = self.queue_capacity or max(64, 2 * batch)
        fill.update(max_batch_size=batch, queue_capacity=queue, threads=self.threads or batch + queue + SPARE_THREADS)
        engine_process = self.engine_process if self.engine_process != "auto" else ("on" if on_gpu else "off")
        fill.update(prefill_chunk_tokens=self.prefill_chunk_tokens or (2048 if on_gpu else 512),
                    cuda_graphs=self.cuda_graphs if self.cuda_graphs != "auto" else ("on" if on_gpu else "off"))
        fill.update(sample_candidates=self.sample_candidates if self.sample_candidates >= 0 else (0 if on_gpu else 1024))
        if engine_process == "off" and self.http_worker == "gevent":
            raise ConfigError("QAIO_HTTP_WORKER=gevent needs an engine process (QAIO_ENGINE_PROCESS=on; auto is "
                              "off on a CPU): the engine loop of a process that runs its own model needs a thread")
        fill.update(engine_process=engine_process,
                    workers=self.workers or (4 if engine_process == "on" and on_gpu else 1),
                    http_worker=self.http_worker if self.http_worker != "auto" else
                    ("gevent" if engine_process == "on" else "gthread"))
        if not self.instance_id:
            fill["instance_id"] = socket.gethostname()
        if self.null_model:
            fill["model_name"] = "null"  # whatever QAIO_MODEL_NAME says: the null model is never mistaken for one
            # Its only tensors are the bookkeeping's (a GPU's engine launches those on the device); torch's
            # OpenMP threads would spin after each of them, CPU no host path of a GPU engine pays.
            fill["torch_threads"] = self.torch_threads or 1
        elif not self.model_name:
            fill["model_name"] = self.model.rstrip("/").split("/")[-1] if os.path.isdir(self.model) else self.model
        return dataclasses.replace(self, **fill) if fill else self

    @property
    def row_tokens(self) -> int:
        """The most tokens one generation row holds: the longest prompt and the longest reply."""
        return self.max_prompt_tokens + self.max_tokens_limit

    @property
    def capacity(self) -> int:
        """Requests one instance holds at once (generating + queued); the front door's max_conns per
        worker (nginx/qaio-env.envsh applies the same rule to the same variables)."""
        return self.max_batch_size + self.queue_capacity

    def as_log_dict(self) -> dict[str, Any]:
        return {self.env_name(k): ("<set>" if k in SECRETS and v else v) for k, v in dataclasses.asdict(self).items()}


def _parse(raw: str, kind: type) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true/false")
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    return raw.strip()


def describe_settings() -> list[tuple[str, Any, str]]:
    """(env var, default, meaning) for every setting: the source of README's configuration table."""
    return [(WorkerConfig.env_name(f.name), f.default, f.metadata["help"]) for f in dataclasses.fields(WorkerConfig)]
