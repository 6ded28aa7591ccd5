"""The engine's Triton kernels against the torch operations they replace, in Triton's interpreter on
this CPU (conftest sets TRITON_INTERPRET=1) and compiled on a GPU: float32, so any difference beyond
rounding is a bug in the kernel."""
import pytest
import torch
import torch.nn.functional as F

from qwen_worker.engine.forward import _rope

pytest.importorskip("triton")
from qwen_worker.engine.kernels.attention import SPLIT_TOKENS, decode_attention  # noqa: E402
from qwen_worker.engine.kernels.norm import add_rms_norm, silu_mul  # noqa: E402
from qwen_worker.engine.kernels.rope import rope_and_write_kv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_attention(q, keys, values, table, lengths, scale):
    """Row b's query against the tokens table[b, :lengths[b]], gathered and repeated per query head."""
    heads, kv_heads, page = q.shape[1], keys.shape[1], keys.shape[2]
    out = []
    for b, length in enumerate(lengths.tolist()):
        locs = table[b, :length].long()
        k = keys[locs // page, :, locs % page].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        v = values[locs // page, :, locs % page].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        out.append(F.scaled_dot_product_attention(q[b][:, None], k, v, scale=scale)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (14, 2), (4, 4)])
def test_decode_attention_over_slots_equals_attention_over_each_rows_keys(heads, kv_heads):
    torch.manual_seed(0)
    slots, page, dim = 4, 2 * SPLIT_TOKENS + 40, 64
    keys = torch.randn(slots, kv_heads, page, dim, device=DEVICE)
    values = torch.randn(slots, kv_heads, page, dim, device=DEVICE)
    table = (torch.arange(slots)[:, None] * page + torch.arange(page)[None]).int().to(DEVICE)
    # one key; a split boundary exactly; many splits; a row that fills its slot
    lengths = torch.tensor([1, SPLIT_TOKENS, SPLIT_TOKENS + 65, page], device=DEVICE, dtype=torch.int32)
    q = torch.randn(slots, heads, dim, device=DEVICE)
    got = decode_attention(q, keys, values, table, lengths, 0.125)
    torch.testing.assert_close(got, reference_attention(q, keys, values, table, lengths, 0.125), atol=1e-5, rtol=1e-5)


def test_decode_attention_reads_keys_through_the_table_so_blocks_in_any_order_work():
    """A block cache: pages of 16 tokens, each row's blocks scattered over the pool and shared blocks
    (a common prefix) read by two rows: the same kernel, only a different table."""
    torch.manual_seed(1)
    block, blocks, kv_heads, heads, dim = 16, 40, 2, 4, 32
    keys = torch.randn(blocks, kv_heads, block, dim, device=DEVICE)
    values = torch.randn(blocks, kv_heads, block, dim, device=DEVICE)
    order = torch.randperm(blocks)
    shared = order[:3]  # 48 tokens of prefix both rows start with
    rows = [torch.cat([shared, order[3:10]]), torch.cat([shared, order[10:30]])]
    width = 20 * block + 3 * block
    table = torch.zeros(2, width, dtype=torch.int32)
    for b, row_blocks in enumerate(rows):
        locs = (row_blocks[:, None] * block + torch.arange(block)[None]).flatten()
        table[b, :len(locs)] = locs.int()
    table = table.to(DEVICE)
    lengths = torch.tensor([10 * block - 5, 23 * block], device=DEVICE, dtype=torch.int32)
    q = torch.randn(2, heads, dim, device=DEVICE)
    got = decode_attention(q, keys, values, table, lengths, 0.2)
    torch.testing.assert_close(got, reference_attention(q, keys, values, table, lengths, 0.2), atol=1e-5, rtol=1e-5)


def test_rope_and_kv_write_rotates_like_the_model_and_writes_only_the_given_locations():
    torch.manual_seed(2)
    tokens, heads, kv_heads, dim, pages, page = 5, 4, 2, 16, 3, 12
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device=DEVICE)
    positions = torch.tensor([0, 3, 7, 7, 11], device=DEVICE)
    locs = torch.tensor([0, 1 * page + 3, 2 * page + 7, 1 * page + 11, 2 * page + 11], device=DEVICE)
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=DEVICE).float() / dim))
    angles = torch.arange(page, device=DEVICE)[:, None].float() * inv[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    keys = torch.zeros(pages, kv_heads, page, dim, device=DEVICE)
    values = torch.zeros_like(keys)
    q = rope_and_write_kv(qkv, positions, locs, cos, sin, keys, values, heads)
    split = qkv.view(tokens, heads + 2 * kv_heads, dim)
    c, s = cos[positions][:, None], sin[positions][:, None]
    torch.testing.assert_close(q, _rope(split[:, :heads], c, s), atol=1e-6, rtol=1e-6)
    want_k, want_v = torch.zeros_like(keys), torch.zeros_like(values)
    rotated_k = _rope(split[:, heads:heads + kv_heads], c, s)
    for t, loc in enumerate(locs.tolist()):
        want_k[loc // page, :, loc % page] = rotated_k[t]
        want_v[loc // page, :, loc % page] = split[t, heads + kv_heads:]
    torch.testing.assert_close(keys, want_k, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(values, want_v, atol=0, rtol=0)


def test_add_rms_norm_normalises_the_sum_and_leaves_it_in_the_residual():
    torch.manual_seed(3)
    x, residual, weight = (torch.randn(6, 896, device=DEVICE), torch.randn(6, 896, device=DEVICE),
                           torch.randn(896, device=DEVICE))
    before = residual.clone()
    got = add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(residual, x + before, atol=0, rtol=0)
    torch.testing.assert_close(got, F.rms_norm(x + before, (896,), weight, 1e-6), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(add_rms_norm(x, None, weight, 1e-6), F.rms_norm(x, (896,), weight, 1e-6),
                               atol=1e-5, rtol=1e-5)


def test_silu_mul_over_columns_wider_than_one_block():
    torch.manual_seed(4)
    gate_up = torch.randn(3, 2 * 2500, device=DEVICE)
    torch.testing.assert_close(silu_mul(gate_up), F.silu(gate_up[:, :2500]) * gate_up[:, 2500:], atol=1e-6, rtol=1e-5)
