import torch

from qwen_worker.engine.sampler import sample


def test_greedy_rows_take_their_argmax_and_nucleus_rows_stay_in_their_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2000)
    temperature = torch.tensor([0.0] * 1000 + [1.0] * 1000)
    top_p = torch.tensor([1.0] * 1000 + [0.75] * 1000)
    tokens = sample(probs.log(), temperature, top_p, torch.Generator().manual_seed(0))
    assert (tokens[:1000] == 0).all()
    sampled = tokens[1000:]
    assert set(sampled.tolist()) == {0, 1}  # 0.5 + 0.3 reaches top_p 0.75; 2 and 3 never drawn
    assert abs((sampled == 0).float().mean().item() - 0.5 / 0.8) < 0.05  # renormalised over the nucleus


def test_a_sampled_row_follows_its_temperature_scaled_distribution():
    logits = torch.tensor([[0.6, 0.4]]).log().repeat(4000, 1)
    warm = sample(logits, torch.full((4000,), 1.0), torch.ones(4000), torch.Generator().manual_seed(1))
    cold = sample(logits, torch.full((4000,), 0.5), torch.ones(4000), torch.Generator().manual_seed(2))
    assert abs((warm == 0).float().mean().item() - 0.6) < 0.03
    expected_cold = 0.36 / (0.36 + 0.16)  # p^(1/T), renormalised
    assert abs((cold == 0).float().mean().item() - expected_cold) < 0.03


def test_a_tiny_top_p_is_greedy():
    logits = torch.randn(64, 1000)
    tokens = sample(logits, torch.full((64,), 1.3), torch.full((64,), 1e-6))
    assert torch.equal(tokens, logits.argmax(-1))


def test_a_prefilter_draws_only_from_each_rows_top_k_and_keeps_the_distribution_within_them():
    torch.manual_seed(3)
    logits = torch.randn(8, 5000) * 3
    top = logits.topk(16, dim=-1).indices
    tokens = sample(logits.repeat(250, 1), torch.full((2000,), 1.0), torch.ones(2000),
                    torch.Generator().manual_seed(4), prefilter=16)
    for row, token in zip(range(2000), tokens.tolist()):
        assert token in top[row % 8].tolist()
    # Within the top k, the frequencies are the renormalised probabilities (row 0, 250 draws).
    probs = logits[0, top[0]].softmax(-1)
    drawn = tokens.view(250, 8)[:, 0]
    assert abs((drawn == top[0, 0]).float().mean().item() - probs[0].item()) < 0.1


def test_a_prefilter_keeps_greedy_rows_and_the_nucleus_rule():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05] + [0.0] * 60] * 1000) + 1e-9
    temperature = torch.tensor([0.0] * 500 + [1.0] * 500)
    top_p = torch.tensor([1.0] * 500 + [0.75] * 500)
    tokens = sample(probs.log(), temperature, top_p, torch.Generator().manual_seed(0), prefilter=3)
    assert (tokens[:500] == 0).all()
    assert set(tokens[500:].tolist()) == {0, 1}


def test_candidates_are_exact_where_the_nucleus_fits_and_fall_back_where_it_does_not():
    """Peaked rows (nucleus within the candidates) draw from the candidates with the full sort's law;
    a flat row whose nucleus is wider than the candidates falls back to the full sort."""
    torch.manual_seed(6)
    peaked = torch.randn(500, 4000) * 6
    temperature, top_p = torch.full((500,), 0.7), torch.full((500,), 0.9)
    full = sample(peaked, temperature, top_p, torch.Generator().manual_seed(7))
    narrowed = sample(peaked, temperature, top_p, torch.Generator().manual_seed(7), candidates=256)
    # The race draws over k entries instead of the vocabulary: different random numbers, same law.
    top = peaked.topk(256, dim=-1).indices
    assert all(t in top[i].tolist() for i, t in enumerate(narrowed.tolist()))
    assert abs((full == peaked.argmax(-1)).float().mean() - (narrowed == peaked.argmax(-1)).float().mean()) < 0.08
    flat = torch.zeros(200, 4000)
    drawn = sample(flat, torch.ones(200), torch.full((200,), 0.9), torch.Generator().manual_seed(8), candidates=16)
    assert len(set(drawn.tolist())) > 100  # from ~3,600 tokens, not from 16


def test_a_seeded_row_draws_the_same_whatever_the_other_rows_and_the_candidates():
    from qwen_worker.engine.sampler import sample as draw

    torch.manual_seed(8)
    logits = torch.randn(3, 3000)
    temperature, top_p = torch.ones(3), torch.full((3,), 0.95)

    def seeded_row(candidates: int, others: torch.Tensor) -> int:
        rows = torch.stack([others[0], logits[1], others[1]])
        generators = [None, torch.Generator().manual_seed(11), None]
        return draw(rows, temperature, top_p, candidates=candidates, row_generators=generators)[1].item()

    first = seeded_row(0, torch.randn(2, 3000))
    assert all(seeded_row(c, torch.randn(2, 3000) * 4) == first for c in (0, 64, 3000, 0, 64))
    assert len({draw(logits[1:2], temperature[:1], top_p[:1], row_generators=[torch.Generator().manual_seed(s)])
                .item() for s in range(20)}) > 5
