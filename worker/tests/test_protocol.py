"""The engine link's codec (protocol.py): every message type crosses whole, a free-form field with values
MessagePack has no type for still crosses, and a peer of another version is refused at its hello."""
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from qwen_worker.protocol import (PROTOCOL_VERSION, Cancel, Control, ModelInfo, Output, Status, check_hello,
                                  decode_batch, encode_batch, hello)


def test_every_message_type_crosses_whole_in_order():
    messages = [Output(7, tokens=[1, 2], first_token_at=3.5), Output(8, finish_reason="length", finished_at=9.0,
                                                                       logprobs=[(-0.1, [1, 2], [-0.1, -2.0])]),
                Output(9, scores={"positive": 0.9, "negative": 0.1}), Cancel(7, "deadline_in_queue"),
                Control(3, "drain"), Status("ready", accepting=True, ready=True, kv={"blocks_total": 4},
                                            model=ModelInfo("m", "/m", "m@1", {"slots": 16}))]
    assert decode_batch(encode_batch(messages)) == messages
    assert Output(1).tokens is not Output(2).tokens  # each output a list of its own


def test_a_description_with_values_messagepack_cannot_hold_still_crosses():
    describe = {"ratio": np.float32(1.5), "rows": torch.tensor(3), "source": Path("/models/x"), "dtype": torch.float16}
    status, = decode_batch(encode_batch([Status("ready", model=ModelInfo("m", "/m", "m@1", describe))]))
    assert status.model.describe == {"ratio": 1.5, "rows": 3, "source": "/models/x", "dtype": "torch.float16"}


@pytest.mark.parametrize("greeting", [msgspec.msgpack.encode(["Hello", PROTOCOL_VERSION - 1]),
                                      msgspec.msgpack.encode(("hello", PROTOCOL_VERSION)), b"\x80\x04K\x05."])
def test_a_peer_of_another_version_is_refused_at_its_hello(greeting):
    check_hello(hello())
    with pytest.raises(ValueError, match="another engine protocol"):
        check_hello(greeting)
