"""How a generation picks its tokens: one frozen type, built once at the HTTP boundary (api/params.py)
and carried whole by the request, the engine's row and the sampler. A new option is one field here,
its validation there, and its use in the engine."""
from __future__ import annotations

import msgspec

SEED_LIMIT = 2**63 - 1  # seeds are torch.Generator seeds (64-bit); seed + choice wraps below it
# Below this a temperature is greedy (as vLLM's _SAMPLING_EPS): dividing logits by 1e-40 overflows to
# infinities, and a draw from such a distribution is its argmax anyway.
GREEDY_BELOW = 1e-5


class SamplingParams(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """OpenAI's sampling options. temperature 0: greedy. seed: the row draws from a generator of its
    own. Penalties on tokens already generated (presence, frequency) or already seen, prompt included
    (repetition: a divisor of positive logits, a multiplier of negative ones). logprobs >= 0: each
    token's log-probability and that many most likely alternatives."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int = -1

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def plain_greedy(self) -> bool:
        """The next token is the argmax of the model's logits as they are (the decode graph's own)."""
        return self.greedy and not self.penalized and self.logprobs < 0

    def for_choice(self, choice: int) -> SamplingParams:
        """Choice i of n draws with seed + i: n different samples, each reproducible."""
        if self.seed is None or choice == 0:
            return self
        return msgspec.structs.replace(self, seed=(self.seed + choice) % SEED_LIMIT)


GREEDY = SamplingParams()
