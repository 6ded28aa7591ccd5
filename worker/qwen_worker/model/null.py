"""QAIO_NULL_MODEL: the real tokenizer, prompts, engine, scheduler and protocol over a model that does no
arithmetic (engine/null_runner.py), to measure the host path. It names itself `null` everywhere a model
is named, so that nobody mistakes it for a model."""
from __future__ import annotations

from ..calibration import NONE
from ..engine.null_runner import NullRunner
from ..prompts import ChatMLPrompter, load_tokenizer
from .building import engine_over
from .loading import ModelService

NAME = "null"
# The null model's replies cycle through this text's tokens: real words in both languages, so that
# detokenising, stop strings and streaming do the work they do for a model's replies.
CYCLE_TEXT = ("The service answers in short sentences, and each reply streams token by token to the client. "
              "这家店的外卖送得很快，味道也不错，下次还会再点。 Numbers like 3.14 and 2026 appear too; "
              "so do words with accents (café, naïve) and emoji 🙂. ")


class NullModelService(ModelService):
    """A ModelService whose engine runs a NullRunner; only the tokenizer is loaded from QAIO_MODEL."""

    is_null = True

    @property
    def identity(self) -> str:
        return NAME  # the front door's cache key: never a real model's answers

    def _load_from(self, source: str):
        self.tokenizer = load_tokenizer(source)  # the tokenizer's files only: no weights read
        self.served_source = source
        return None

    def _prepare(self, model) -> None:
        config = self.config
        self.parameter_count = 0
        self.eos_token_ids = self._eos_ids(None)
        self.prompter = ChatMLPrompter(self.tokenizer)
        cycle = [t for t in self.tokenizer.encode(CYCLE_TEXT, add_special_tokens=False) if t not in self.eos_token_ids]
        size = config.kv_block_tokens
        slots = config.max_batch_size
        runner = NullRunner(cycle, vocab_size=len(self.tokenizer), slots=slots, max_tokens=config.row_tokens,
                            block_tokens=size, score_slots=slots)
        # Blocks for every row at full length: they hold no memory, and the pool never runs dry.
        self.engine = engine_over(runner, config, 2 * slots * -(-config.row_tokens // size) + 1, self.eos_token_ids)
        self.calibration = NONE

    def describe(self) -> dict:
        return {**super().describe(), "null_model": True, "dtype": "none", "device": "none", "cpu_linear": "none"}
