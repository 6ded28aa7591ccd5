"""Engine construction for a loaded model: the KV block pool sized and checked, CUDA graphs captured, warm-up."""
from __future__ import annotations

import logging

import torch

from .. import memory
from ..engine import GenerationRow
from ..engine.engine import Engine
from ..engine.block_manager import BlockManager
from ..engine.kv_cache import PagedKVCache
from ..engine.model_runner import ModelRunner
from ..engine.scheduler import Scheduler

CPU_DEFAULT_POOL_MB = 1024

log = logging.getLogger(__name__)


def build_engine(model, config, device: torch.device, dtype: torch.dtype, label_head: torch.Tensor,
                 eos_token_ids: set[int]) -> Engine:
    """The engine over `model`: rows, pool and chunk size from the config (derived defaults resolved there)."""
    max_tokens = config.row_tokens
    chunk = config.prefill_chunk_tokens
    blocks = kv_pool_blocks(model, config, max_tokens, device, dtype)
    runner = ModelRunner(model, slots=config.max_batch_size, max_tokens=max_tokens, prefill_chunk=chunk,
                         use_graphs=config.cuda_graphs == "on", label_head=label_head, kv_blocks=blocks,
                         block_tokens=config.kv_block_tokens, compile=config.compile == "on", kernels=config.kernels,
                         sdpa_backend=config.sdpa_backend, score_slots=config.max_batch_size)
    try:
        runner.capture_graphs()
    except Exception:
        if not runner.compiled:
            raise
        log.exception("torch.compile failed; the engine runs eager passes instead")
        runner.disable_compile()
        runner.capture_graphs()
    return engine_over(runner, config, blocks, eos_token_ids)


def engine_over(runner, config, blocks: int, eos_token_ids: set[int]) -> Engine:
    """The engine, its scheduler and its block manager over a runner of `blocks` KV blocks."""
    manager = BlockManager(blocks, config.kv_block_tokens, caching=config.prefix_cache)
    scheduler = Scheduler(runner.slots, runner.max_tokens, config.prefill_chunk_tokens, manager,
                          score_slots=runner.score_slots)
    engine = Engine(runner, scheduler, eos_token_ids, sample_prefilter=config.sample_prefilter,
                    sample_candidates=config.sample_candidates, overlap_steps=config.overlap_steps)
    # Sampling graphs need the decode graphs' fixed shapes, and no host check of the candidates.
    if runner.graphs and config.sampling_graphs and config.sample_candidates == 0:
        try:
            engine.picker.use_graphs()
        except Exception:  # serve with eager picks rather than not at all
            log.exception("capturing the sampling graphs failed; steps pick eagerly")
            engine.picker.graphs = None
    return engine


def kv_pool_blocks(model, config, max_tokens: int, device: torch.device, dtype: torch.dtype) -> int:
    """Blocks in the KV pool (the scratch block included): QAIO_KV_CACHE_MB, or the device's default.
    Fails the load, naming the settings to change, when the pool cannot hold one full-length row."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    size = config.kv_block_tokens
    block_bytes = PagedKVCache.bytes_per_block(c.num_hidden_layers, c.num_key_value_heads, size, head_dim, dtype)
    row_blocks = -(-max_tokens // size)
    if config.kv_cache_mb:
        budget = int(config.kv_cache_mb * 2**20)
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * config.gpu_memory_fraction)
    else:
        budget = min(CPU_DEFAULT_POOL_MB * 2**20, config.max_batch_size * row_blocks * block_bytes)
    blocks = budget // block_bytes
    if blocks < row_blocks:
        raise RuntimeError(
            f"the KV pool of {budget / 2**20:.0f} MiB holds {blocks} blocks of {size} tokens, fewer than the "
            f"{row_blocks} one row of {max_tokens} tokens needs: raise QAIO_KV_CACHE_MB (or "
            f"QAIO_GPU_MEMORY_FRACTION) or lower QAIO_MAX_PROMPT_TOKENS + QAIO_MAX_TOKENS_LIMIT")
    log.info("KV pool: %d blocks of %d tokens, %.2f GiB (%d full-length rows)", blocks, size,
             blocks * block_bytes / 2**30, blocks // row_blocks)
    return blocks + 1


def warm_up(service) -> None:
    """Real sentiment passes and a short generation through the engine, so the first request pays no
    lazy initialisation (and a broken setup fails the load, not a request)."""
    prompter, engine = service.prompter, service.engine
    service.score_sentiment([prompter.sentiment_ids("warm-up", "en"), prompter.sentiment_ids("预热", "zh")])
    service.score_sentiment([prompter.sentiment_ids("warm-up", "en")] * min(4, engine.runner.slots))
    engine.run([GenerationRow(prompter.chat_ids([]), max_new_tokens=2) for _ in range(min(2, engine.runner.slots))])
    # What the passes freed goes back now, not at the heap trimmer's first tick: RSS at ready is idle RSS
    # (~100 MB less for the int8 0.5B shape).
    memory.trim()
