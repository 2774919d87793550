"""Parameter averaging (``ema_decay``): the recurrence, the swap, the kept model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import InvalidParameterError

import sknlica._torch.training
from sknlica import NonlinearICAMLE, NonlinearICAVAE
from sknlica._torch.averaging import ParameterAverage
from sknlica.datasets import make_nonlinear_ica

ESTIMATORS = [NonlinearICAMLE, NonlinearICAVAE]
CHEAP = {
    NonlinearICAMLE: {"n_nodes": 64, "n_eval_nodes": 256},
    NonlinearICAVAE: {"n_eval_samples": 64},
}


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


@pytest.fixture(scope="module")
def data():
    X, _ = make_nonlinear_ica(400, n_components=2, n_features=5, random_state=0)
    return X


class _RecordingAverage(ParameterAverage):
    """Keeps a copy of the average each time it is applied (once per epoch)."""

    instances: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.snapshots = []
        self.instances.append(self)

    def applied(self):
        self.snapshots.append([a.clone() for a in self.average])
        return super().applied()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fit_keeps_the_average_of_the_best_epoch(estimator, data, monkeypatch):
    _RecordingAverage.instances = []
    monkeypatch.setattr(sknlica._torch.training, "ParameterAverage", _RecordingAverage)
    model = estimator(
        hidden_layer_sizes=(8,),
        max_iter=6,
        batch_size=50,
        ema_decay=0.9,
        random_state=0,
        **CHEAP[estimator],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(data)
    (average,) = _RecordingAverage.instances
    assert len(average.snapshots) == model.n_iter_
    # 360 training rows in batches of 50: 8 steps per epoch.
    assert average.n_updates == 8 * model.n_iter_
    kept = average.snapshots[model.best_epoch_ - 1]
    position = {id(p): i for i, p in enumerate(average.parameters)}
    # On the CPU the fitted decoder is the trained module itself, so its
    # parameters are found in the average by identity.
    fitted = list(model.decoder_.parameters())
    assert fitted and all(id(p) in position for p in fitted)
    for parameter in fitted:
        assert torch.equal(parameter.detach(), kept[position[id(parameter)]])


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_zero_decay_trains_without_averaging(estimator, data, monkeypatch):
    _RecordingAverage.instances = []
    monkeypatch.setattr(sknlica._torch.training, "ParameterAverage", _RecordingAverage)
    settings = {
        "hidden_layer_sizes": (8,),
        "max_iter": 3,
        "batch_size": 50,
        "random_state": 0,
        **CHEAP[estimator],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        raw = estimator(ema_decay=0.0, **settings).fit(data)
        assert _RecordingAverage.instances == []
        averaged = estimator(**settings).fit(data)
    # Same seed, same steps: only the kept parameters differ.
    assert [h["train_objective"] for h in raw.history_] == [
        h["train_objective"] for h in averaged.history_
    ]
    assert not all(
        torch.equal(a, b)
        for a, b in zip(
            raw.decoder_.parameters(), averaged.decoder_.parameters(), strict=True
        )
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("decay", [1.0, -0.5])
def test_invalid_ema_decay_gets_a_clear_error(estimator, decay, data):
    with pytest.raises(InvalidParameterError, match="ema_decay"):
        estimator(ema_decay=decay).fit(data)
