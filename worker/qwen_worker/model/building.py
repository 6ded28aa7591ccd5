"""Engine construction for a loaded model: KV slots sized and checked, CUDA graphs captured, warm-up."""
from __future__ import annotations

import logging

import torch

from ..engine import GenerationRow
from ..engine.engine import Engine
from ..engine.kv_cache import SlotKVCache
from ..engine.model_runner import ModelRunner
from ..engine.scheduler import Scheduler

log = logging.getLogger(__name__)


def build_engine(model, config, device: torch.device, dtype: torch.dtype, label_head: torch.Tensor,
                 eos_token_ids: set[int]) -> Engine:
    """The engine over `model`: slots and chunk size from the config (derived defaults resolved there)."""
    max_tokens = config.max_prompt_tokens + config.max_tokens_limit
    chunk = config.prefill_chunk_tokens
    if device.type == "cuda":
        check_kv_fits(model, config.max_batch_size, max_tokens, device, dtype)
    runner = ModelRunner(model, slots=config.max_batch_size, max_tokens=max_tokens, prefill_chunk=chunk,
                         use_graphs=config.cuda_graphs == "on", label_head=label_head,
                         compile=config.compile == "on", kernels=config.kernels, sdpa_backend=config.sdpa_backend)
    try:
        runner.capture_graphs()
    except Exception:
        if not runner.compiled:
            raise
        log.exception("torch.compile failed; the engine runs eager passes instead")
        runner.disable_compile()
        runner.capture_graphs()
    return Engine(runner, Scheduler(config.max_batch_size, max_tokens, chunk), eos_token_ids,
                  sample_prefilter=config.sample_prefilter, sample_candidates=config.sample_candidates)


def check_kv_fits(model, slots: int, max_tokens: int, device: torch.device, dtype: torch.dtype) -> None:
    """Fail the load with the settings to change, not with an opaque CUDA out-of-memory, when the KV
    slots would not leave room for the model's activations and graphs."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    needed = SlotKVCache.bytes_needed(c.num_hidden_layers, slots, c.num_key_value_heads, max_tokens, head_dim, dtype)
    free, _ = torch.cuda.mem_get_info(device)
    if needed > 0.8 * free:
        raise RuntimeError(
            f"the KV slots need {needed / 2**30:.1f} GiB but {device} has {free / 2**30:.1f} GiB free: "
            f"lower QAIO_MAX_BATCH_SIZE ({slots} slots) or QAIO_MAX_PROMPT_TOKENS + "
            f"QAIO_MAX_TOKENS_LIMIT ({max_tokens} tokens per slot)")
    log.info("KV slots: %d x %d tokens, %.1f GiB of %.1f GiB free", slots, max_tokens, needed / 2**30, free / 2**30)


def warm_up(service) -> None:
    """Real sentiment passes and a short generation through the engine, so the first request pays no
    lazy initialisation (and a broken setup fails the load, not a request)."""
    prompter, engine = service.prompter, service.engine
    service.score_sentiment([prompter.sentiment_ids("warm-up", "en"), prompter.sentiment_ids("预热", "zh")])
    service.score_sentiment([prompter.sentiment_ids("warm-up", "en")] * min(4, engine.runner.slots))
    engine.run([GenerationRow(prompter.chat_ids([]), max_new_tokens=2) for _ in range(min(2, engine.runner.slots))])
