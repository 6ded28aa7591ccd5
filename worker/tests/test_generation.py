import torch

from qwen_worker.generation import GenerationRow, RowSampling, RowStopping


def rows(**kw):
    return [GenerationRow([1, 2], max_new_tokens=kw.get("max_new_tokens", 5), temperature=t, top_p=p)
            for t, p in kw["settings"]]


def test_greedy_rows_keep_only_their_argmax_and_sampled_rows_their_nucleus():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    processed = RowSampling(rows(settings=[(0.0, 1.0), (1.0, 0.75), (1.0, 1.0)]), torch.device("cpu"))(None, scores)
    kept = torch.isfinite(processed)
    assert kept[0].tolist() == [True, False, False, False]
    assert kept[1].tolist() == [True, True, False, False]  # 0.5 + 0.3 reaches top_p 0.75
    assert kept[2].all()
    # A sampled row's distribution is its temperature-scaled softmax, renormalised over the nucleus.
    assert torch.allclose(processed[2].softmax(-1), torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=1e-6)


def test_temperature_sharpens_a_row():
    scores = torch.log(torch.tensor([[0.6, 0.4]]))
    cold = RowSampling(rows(settings=[(0.5, 1.0)]), torch.device("cpu"))(None, scores).softmax(-1)
    assert cold[0, 0] > 0.6


def test_stopping_records_each_rows_reason_and_tokens():
    batch = rows(settings=[(0.0, 1.0)] * 4, max_new_tokens=5)
    batch[1].max_new_tokens = 2
    batch[2].deadline = 10.0
    streamed = []
    batch[3].on_token = streamed.append
    stop = RowStopping(batch, eos_token_ids={99}, clock=lambda: 5.0)
    step1 = stop(torch.tensor([[0, 99], [0, 7], [0, 7], [0, 8]]), None)
    assert step1.tolist() == [True, False, False, False]
    batch[3].cancelled.set()
    stop.clock = lambda: 11.0
    step2 = stop(torch.tensor([[0, 99, 0], [0, 7, 9], [0, 7, 9], [0, 8, 9]]), None)
    assert step2.tolist() == [True, True, True, True]
    assert [r.finish_reason for r in batch] == ["stop", "length", "deadline", "cancelled"]
    assert [r.tokens for r in batch] == [[], [7, 9], [7, 9], [8, 9]]
    assert streamed == [8, 9]
