"""Token log-probabilities as OpenAI's two formats show them: chat's `content` entries and legacy
completions' parallel lists. Tokens are shown by their bytes (byte-level BPE: one token can be part
of a character)."""
from __future__ import annotations

import functools
from typing import Sequence


@functools.cache
def _byte_decoder() -> dict[str, int] | None:
    """GPT-2's printable stand-ins for bytes, reversed (None without transformers' GPT-2 module)."""
    try:
        from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode
    except ImportError:
        return None
    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenText:
    """A tokenizer's token ids as bytes and text, cached (the same tokens recur in every answer)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._token_bytes(token_id)
        return cached

    def _token_bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        decoder = _byte_decoder()
        if decoder is not None and isinstance(piece, str) and all(ch in decoder for ch in piece):
            return bytes(decoder[ch] for ch in piece)
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")

    def entry(self, token_id: int, logprob: float) -> dict:
        raw = self.bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def chat_content(text: TokenText, tokens: Sequence[int], logprobs: Sequence[tuple]) -> list[dict]:
    """OpenAI chat's `logprobs.content`: per token, itself and its top alternatives."""
    return [{**text.entry(token, lp), "top_logprobs": [text.entry(i, p) for i, p in zip(ids, lps)]}
            for token, (lp, ids, lps) in zip(tokens, logprobs)]


def completions_logprobs(text: TokenText, tokens: Sequence[int], logprobs: Sequence[tuple], offset: int = 0) -> dict:
    """Legacy completions' `logprobs`: tokens, their logprobs, top alternatives by token, text offsets."""
    pieces = [text.text(t) for t in tokens]
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": pieces, "token_logprobs": [lp for lp, _, _ in logprobs],
            "top_logprobs": [{text.text(i): p for i, p in zip(ids, lps)} for _, ids, lps in logprobs],
            "text_offset": offsets}
