"""The weight average (EMA) the shared loop keeps: torch's rule, a clean swap, a checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from pipelines.train_loop import lr_lambda
from pipelines.weight_average import WeightAverage


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    m(torch.randn(2, 1, 6, 6))
    m[0].weight.requires_grad_(False)  # frozen: not averaged
    return m


def _train(m, steps, avg):
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        loss = m(torch.randn(8, 1, 6, 6)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        avg.update()


def test_matches_torch_averaged_model_with_buffers():
    m = _model()
    reference = torch.optim.swa_utils.AveragedModel(
        m, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True)
    avg = WeightAverage(m, 0.9)
    reference.update_parameters(m)  # AveragedModel's first update copies; ours starts as that copy
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for _ in range(5):
        m(torch.randn(8, 1, 6, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        avg.update()
        reference.update_parameters(m)
    ref = dict(reference.module.named_parameters()) | dict(reference.module.named_buffers())
    assert "0.weight" not in avg.names and "1.running_mean" in avg.names
    for name, value in zip(avg.names, avg.average):
        torch.testing.assert_close(value, ref[name].float())


def test_applied_swaps_in_the_average_and_restores_the_live_weights():
    m = _model()
    avg = WeightAverage(m, 0.5)
    _train(m, 3, avg)
    live = {k: v.clone() for k, v in m.state_dict().items()}
    with avg.applied():
        inside = {k: v.clone() for k, v in m.state_dict().items()}
    assert not torch.equal(inside["3.weight"], live["3.weight"])
    torch.testing.assert_close(inside["3.weight"], avg.average[avg.names.index("3.weight")])
    torch.testing.assert_close(inside["0.weight"], live["0.weight"])  # frozen: untouched
    for k, v in m.state_dict().items():
        assert torch.equal(v, live[k]), k


def test_checkpoint_round_trip_and_refusals(tmp_path):
    m = _model()
    avg = WeightAverage(m, 0.9)
    _train(m, 2, avg)
    avg.save(str(tmp_path))
    again = WeightAverage(m, 0.9)
    again.load(str(tmp_path))
    assert again.updates == 2
    for a, b in zip(avg.average, again.average):
        assert torch.equal(a, b)
    other = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="does not fit this model"):
        WeightAverage(other, 0.9).load(str(tmp_path))
    with pytest.raises(RuntimeError, match="holds no weight average"):
        WeightAverage(m, 0.9).load(str(tmp_path / "empty"))


def test_lr_schedules():
    cosine, constant = lr_lambda(2, 10), lr_lambda(2, 10, "constant")
    assert cosine(0) == constant(0) == 0.5
    assert constant(9) == 1.0 and cosine(9) < 0.1
