"""``sknlica._torch.averaging.ParameterAverage``: the recurrence and the swap.

The estimators' use of it (``ema_decay``: the average of the best epoch is
kept, ``0`` trains without one) is tested in ``test_estimator_contract.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sknlica._torch.averaging import ParameterAverage


def _module() -> torch.nn.Module:
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    module[1].weight.requires_grad_(False)  # frozen: must not be averaged
    return module.double()


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.998])
def test_average_follows_the_recurrence(decay):
    # Oracle: the recurrence written out in NumPy, one step at a time.
    module = _module()
    average = ParameterAverage(module, decay)
    expected = module[0].weight.detach().numpy().copy()
    rng = np.random.default_rng(0)
    for t in range(30):
        with torch.no_grad():
            module[0].weight.copy_(torch.from_numpy(rng.standard_normal((4, 3))))
        weight = 1.0 - min(decay, (1 + t) / (10 + t))
        expected = expected + weight * (module[0].weight.detach().numpy() - expected)
        average.update()
    with average.applied():
        np.testing.assert_allclose(module[0].weight.detach().numpy(), expected)


def test_applied_restores_the_raw_parameters_even_on_error():
    module = _module()
    average = ParameterAverage(module, 0.9)
    with torch.no_grad():
        module[0].weight.add_(1.0)
    average.update()
    raw = [p.detach().clone() for p in module.parameters()]
    buffers = [b.detach().clone() for b in module.buffers()]
    with pytest.raises(RuntimeError, match="inside"), average.applied():
        assert not torch.equal(module[0].weight, raw[0])
        raise RuntimeError("inside")
    for parameter, saved in zip(module.parameters(), raw, strict=True):
        assert torch.equal(parameter, saved)
    for buffer, saved in zip(module.buffers(), buffers, strict=True):
        assert torch.equal(buffer, saved)


def test_frozen_parameters_are_not_averaged():
    module = _module()
    average = ParameterAverage(module, 0.5)
    assert all(p.requires_grad for p in average.parameters)
    assert len(average.parameters) == 3  # linear weight, bias; batch-norm bias


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_decay_out_of_range_is_refused(decay):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ParameterAverage(_module(), decay)


def test_weights_follow_the_num_updates_rule():
    # Oracle: TensorFlow's ExponentialMovingAverage(num_updates=t) weights,
    # 1 - min(decay, (1 + t) / (10 + t)), written out by hand.
    average = ParameterAverage(_module(), 0.998)
    weights = []
    for _ in range(4):
        weights.append(average.weight())
        average.update()
    expected = [1 - 1 / 10, 1 - 2 / 11, 1 - 3 / 12, 1 - 4 / 13]
    np.testing.assert_allclose(weights, expected, rtol=1e-15)
    assert average.n_updates == 4
    average.n_updates = 10**6  # long after the ramp: the decay itself
    assert average.weight() == pytest.approx(1 - 0.998, rel=1e-12)


def test_zero_decay_makes_the_average_the_current_parameters():
    module = _module()
    average = ParameterAverage(module, 0.0)
    with torch.no_grad():
        module[0].weight.mul_(3.0).add_(1.0)
    average.update()
    current = module[0].weight.detach().clone()
    with average.applied():
        torch.testing.assert_close(module[0].weight, current, rtol=0, atol=0)


def test_a_module_without_trainable_parameters_is_a_no_op():
    module = _module().requires_grad_(False)
    average = ParameterAverage(module, 0.9)
    assert average.parameters == []
    average.update()
    assert average.n_updates == 1
    raw = [p.detach().clone() for p in module.parameters()]
    with average.applied():
        for parameter, saved in zip(module.parameters(), raw, strict=True):
            assert torch.equal(parameter, saved)
