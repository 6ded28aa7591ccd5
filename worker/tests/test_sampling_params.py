"""One sampling type from the HTTP boundary to the sampler: frozen, carried whole over the engine link."""
import msgspec

import pytest

from qwen_worker.protocol import GENERATE, Request, decode_batch, encode_batch
from qwen_worker.sampling import GREEDY, SEED_LIMIT, SamplingParams


def test_a_request_crosses_the_link_with_its_sampling_whole():
    sampling = SamplingParams(temperature=0.7, top_p=0.9, seed=3, presence_penalty=0.5, frequency_penalty=-0.25,
                              repetition_penalty=1.1, logprobs=2)
    request = Request(9, GENERATE, "chat", [1, 2, 3], 123.0, 16, sampling, stream=True)
    received, = decode_batch(encode_batch([request]))  # what the socket carries
    assert received == request and received.sampling == sampling
    assert decode_batch(encode_batch([Request(1, GENERATE, "chat", [1], 1.0)]))[0].sampling == GREEDY


@pytest.mark.parametrize("fields", [[9, "generate", "chat", "1 2 3", 123.0],  # a prompt that is not token ids
                                    [9, "generate", "chat", [1], 123.0, 16, [0.7, "hot"]],  # a top_p that is no number
                                    [9, "generate"]])  # fields missing
def test_a_message_of_the_wrong_shape_is_refused_when_it_arrives(fields):
    with pytest.raises(ValueError, match="protocol version"):
        decode_batch(msgspec.msgpack.encode([["Request", *fields]]))


def test_sampling_is_frozen_and_says_what_the_engine_needs_of_it():
    with pytest.raises(AttributeError):  # msgspec's frozen Structs refuse assignment so
        GREEDY.temperature = 1.0
    assert GREEDY.greedy and GREEDY.plain_greedy and not GREEDY.penalized
    assert SamplingParams(repetition_penalty=1.1).penalized and not SamplingParams(repetition_penalty=1.1).plain_greedy
    assert not SamplingParams(logprobs=0).plain_greedy and not SamplingParams(temperature=0.5).greedy


def test_choice_i_of_n_draws_with_seed_plus_i():
    seeded = SamplingParams(temperature=1.0, seed=SEED_LIMIT - 1)
    assert seeded.for_choice(0) is seeded
    assert seeded.for_choice(2).seed == 1 and seeded.for_choice(2).temperature == 1.0
    assert SamplingParams(temperature=1.0).for_choice(3).seed is None
