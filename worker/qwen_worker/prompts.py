"""Prompts of the product, built as token ids in Qwen's ChatML format.

Prompts are assembled from separately tokenized segments: template markup is tokenized with special
tokens recognised, client text with `split_special_tokens=True`, so a client writing `<|im_end|>` gets
plain text, never a control token. The fixed head of the sentiment prompt is a whole segment, so its
token ids are an exact prefix of every sentiment prompt.
"""
from __future__ import annotations

import dataclasses
import re
import threading
from typing import Sequence

LABELS = ("positive", "negative", "neutral")
LABELS_ZH = {"positive": "正面", "negative": "负面", "neutral": "中性"}

CHAT_SYSTEM_PROMPT = (
    "You are Qwen All-in-One, a warm and empathetic assistant. Listen carefully, acknowledge how the user "
    "feels, and answer helpfully and concisely. Reply in the language the user writes in."
)

ANALYZE_GUIDANCE = {
    "positive": "The user's message sounds positive. Share their good mood and respond warmly.",
    "negative": "The user's message sounds negative. Acknowledge their frustration or sadness with empathy "
                "first, then help.",
    "neutral": "The user's message sounds neutral. Respond in a friendly, helpful way.",
}

SENTIMENT_INSTRUCTION = (
    "You are a sentiment classifier. Read the user's text and answer with exactly one word: "
    "positive, negative or neutral."
)

# Few-shot examples per language: (text, label). One of each label keeps the prompt short and unbiased.
SENTIMENT_EXAMPLES = {
    "zh": (("很快，好吃，味道足，量大", "positive"),
           ("送餐太慢了，饭菜都凉了，再也不点了", "negative"),
           ("今天中午点了一份盖浇饭", "neutral")),
    "en": (("Fast delivery and the food was delicious!", "positive"),
           ("The order was late and the soup was cold. Never again.", "negative"),
           ("I ordered a rice bowl for lunch today.", "neutral")),
}

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")


def detect_language(text: str) -> str:
    """`zh` when CJK characters make up a noticeable share of the letters, else `en`."""
    letters = "".join(filter(str.isalnum, text))  # C loops, not Python's: a bulk request asks per text
    if not letters:
        return "zh" if _CJK.search(text) else "en"
    return "zh" if len(_CJK.findall(letters)) / len(letters) >= 0.2 else "en"


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str


def load_tokenizer(source: str):
    """transformers' tokenizer for source, without the Python copies of its vocabulary and merges that
    its constructor keeps after building the Rust tokenizer from them (Qwen2's `_vocab`, `_merges`:
    ~90 MB of RSS per process for Qwen's 151k-entry vocabulary; nothing reads them afterwards)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    for retained in ("_vocab", "_merges"):
        if isinstance(getattr(tokenizer, retained, None), (dict, list)):
            setattr(tokenizer, retained, None)
    return tokenizer


class ChatMLPrompter:
    """Turns messages into ChatML token ids with a given tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # A fast tokenizer keeps `split_special_tokens` as a flag on its shared Rust backend, set by each call
        # that asks for the other value: concurrent request threads tokenizing through transformers would
        # tokenize ChatML markup with another call's flag (seen as corrupted prompts under load), and pay
        # transformers' per-call Python (a tenth of a busy worker's time). So markup is encoded by the backend
        # itself with the flag off (transformers' default: its calls here never ask otherwise) and client
        # text by one copy with it on: no lock, one extra copy (~28 MB for Qwen's vocabulary, per process).
        # A tokenizer without a Rust backend takes turns on a lock instead.
        self._tokenize_lock = threading.Lock()
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backends = None
        if backend is not None:
            from tokenizers import Tokenizer

            plain = Tokenizer.from_str(backend.to_str())
            backend.encode_special_tokens, plain.encode_special_tokens = False, True
            self._backends = {False: backend, True: plain}
        # The template's own pieces (role headers, turn ends, the product's system turns) are encoded once:
        # each Rust call costs ~6 us however short its text, and a chat prompt took seven (~125 us).
        self._template_ids: dict[str, tuple[int, ...]] = {}
        self._system_turns: dict[str, tuple[int, ...]] = {}
        for prompt in (CHAT_SYSTEM_PROMPT, *(f"{CHAT_SYSTEM_PROMPT} {g}" for g in ANALYZE_GUIDANCE.values())):
            self._system_turns[prompt] = tuple(self._turn("system", prompt))
        # Streamed replies decode a few ids per event: the backend's own decode is transformers' minus its
        # Python (~0.7 against ~2.5 us a call) unless transformers would clean up spaces after it.
        self._decoder = self._backends[False] if self._backends is not None and \
            not getattr(tokenizer, "clean_up_tokenization_spaces", False) else None
        self.label_token_ids = tuple(self._single_token(label) for label in LABELS)
        self.sentiment_prefix_ids = {lang: self._sentiment_prefix(lang) for lang in SENTIMENT_EXAMPLES}
        self._user_turn_end = self.markup("<|im_end|>\n<|im_start|>assistant\n")

    def _encode(self, text: str, split_special_tokens: bool) -> list[int]:
        if self._backends is not None:
            return self._backends[split_special_tokens].encode(text, add_special_tokens=False).ids
        with self._tokenize_lock:
            return self.tokenizer(text, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]

    def _encode_many(self, texts: Sequence[str], split_special_tokens: bool) -> list[list[int]]:
        """Each text's ids, as _encode's, in one call of the backend (no offsets kept: ~15 % less per text)."""
        if self._backends is None:
            return [self._encode(text, split_special_tokens) for text in texts]
        encodings = self._backends[split_special_tokens].encode_batch_fast(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids as text, special tokens left out (as transformers' decode with skip_special_tokens)."""
        if self._decoder is not None:
            return self._decoder.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def markup(self, text: str) -> list[int]:
        """Template markup: `<|im_start|>` and the like are their control tokens."""
        return self._encode(text, split_special_tokens=False)

    def plain(self, text: str) -> list[int]:
        """Client text: a client writing `<|im_end|>` gets plain text, never a control token."""
        return self._encode(text, split_special_tokens=True)

    def _single_token(self, word: str) -> int:
        ids = self.plain(word)
        if len(ids) != 1:
            raise ValueError(f"label {word!r} is not a single token for this tokenizer: {ids}")
        return ids[0]

    def _template(self, markup: str) -> tuple[int, ...]:
        """A piece of the template's own markup (never client text: the cache stays as small as the template)."""
        ids = self._template_ids.get(markup)
        if ids is None:
            ids = self._template_ids[markup] = tuple(self.markup(markup))
        return ids

    def _turn(self, role: str, content: str) -> list[int]:
        if role == "system" and content in self._system_turns:
            return list(self._system_turns[content])
        return [*self._template(f"<|im_start|>{role}\n"), *self.plain(content), *self._template("<|im_end|>\n")]

    def _sentiment_prefix(self, lang: str) -> list[int]:
        ids = self._turn("system", SENTIMENT_INSTRUCTION)
        for text, label in SENTIMENT_EXAMPLES[lang]:
            ids += self._turn("user", text) + self._turn("assistant", label)
        return ids + self.markup("<|im_start|>user\n")

    def sentiment_ids(self, text: str, lang: str) -> list[int]:
        """Prompt whose next token is the label; starts with `sentiment_prefix_ids[lang]`."""
        return self.sentiment_prefix_ids[lang] + self.plain(text) + self._user_turn_end

    def sentiment_ids_many(self, texts: Sequence[str], langs: Sequence[str]) -> list[list[int]]:
        """sentiment_ids of each text (with its lang), its client text encoded in one call for all."""
        return [self.sentiment_prefix_ids[lang] + ids + self._user_turn_end
                for ids, lang in zip(self._encode_many(texts, split_special_tokens=True), langs)]

    def chat_ids(self, messages: Sequence[Message], system_prompt: str = CHAT_SYSTEM_PROMPT) -> list[int]:
        """ChatML prompt ending with the open assistant turn; adds the product's system prompt if none is given."""
        ids: list[int] = []
        if not messages or messages[0].role != "system":
            ids += self._turn("system", system_prompt)
        for message in messages:
            ids += self._turn(message.role, message.content)
        return ids + list(self._template("<|im_start|>assistant\n"))

    def analyze_ids(self, text: str | Sequence[Message], label: str) -> list[int]:
        """The reply prompt of a text (or a conversation ending with it) whose sentiment is `label`."""
        system = f"{CHAT_SYSTEM_PROMPT} {ANALYZE_GUIDANCE[label]}"
        messages = [Message("user", text)] if isinstance(text, str) else list(text)
        if messages and messages[0].role == "system":  # the client's own system prompt, then the guidance
            messages[0] = Message("system", f"{messages[0].content} {ANALYZE_GUIDANCE[label]}")
            return self.chat_ids(messages)
        return self.chat_ids(messages, system_prompt=system)
