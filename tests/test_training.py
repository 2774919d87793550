"""``sknlica._torch.training``: the epoch loop, run on a scripted objective.

:class:`Scripted` is a tiny :class:`~sknlica._torch.training.Objective`: a
quadratic loss on a two-parameter module whose per-epoch scores are a list
the test chooses, so early stopping, the learning-rate plateau and the kept
epoch can be checked against schedules worked out by hand.  It records
everything ``train`` passes it.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sknlica._torch import training
from sknlica._torch.networks import NoiseVariance
from sknlica._torch.training import (
    LEARNING_RATE_DECAY,
    TRAIN_SCORE,
    VALIDATION_SCORE,
    Objective,
    TrainingRows,
    TrainingSettings,
    clip_gradient_norm,
    is_finite,
    make_optimizer,
    mean_feature_variance,
    optimizer_step,
    state_to_cpu,
    train,
    training_tensor,
)

F64 = torch.float64


class Tiny(nn.Module):
    """Two parameters and a fixed noise variance (``train`` records sigma^2)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([3.0, -1.0], dtype=F64))
        self.noise = NoiseVariance(0.5, learn=False, floor=0.0)


class Scripted(Objective):
    """``||weight - mean(batch)||^2`` with scripted scores and faults.

    ``scores[t]`` is epoch ``t``'s training score (and ``validation[t]`` its
    validation score when given); ``fail_in`` / ``interrupt_in`` make every
    loss of that 1-based epoch non-finite / raise ``KeyboardInterrupt``.
    """

    def __init__(self, scores, validation=None, *, fail_in=None, interrupt_in=None):
        self.scores = list(scores)
        self.validation = None if validation is None else list(validation)
        self.fail_in = fail_in
        self.interrupt_in = interrupt_in
        self.begun, self.entries, self.losses = [], [], []
        self.rows_seen, self.batches, self.scored_weights = [], [], []
        self.optimizers = []
        self.learning_rates = []  # at the start of each epoch
        self.steps_hooked = []

    @property
    def epoch(self):  # 1-based epoch in progress
        return len(self.begun)

    def begin_epoch(self, epoch):
        self.begun.append(epoch)
        self.losses.append([])
        self.learning_rates.append(
            [g["lr"] for opt in self.optimizers for g in opt.param_groups]
        )

    def loss(self, model, batch, rows):
        if self.epoch == self.interrupt_in:
            raise KeyboardInterrupt
        self.rows_seen.append(rows)
        self.batches.append(batch)
        loss = (model.weight - batch.mean(0)).square().sum()
        if self.epoch == self.fail_in:
            loss = loss * math.nan
        self.losses[-1].append(float(loss.detach()))
        return loss

    def before_step(self, optimizer):
        self.steps_hooked.append(optimizer)

    def epoch_scores(self, model, rows, validation, train_objective):
        t = len(self.scored_weights)
        self.scored_weights.append(model.weight.detach().clone())
        scores = {TRAIN_SCORE: self.scores[t], "train_objective_seen": train_objective}
        if validation is not None:
            scores[VALIDATION_SCORE] = self.validation[t]
        return scores

    def end_epoch(self, entry):
        self.entries.append(entry)


def _data(n_rows=10, seed=0):
    return torch.randn(
        n_rows, 2, generator=torch.Generator().manual_seed(seed), dtype=F64
    )


def _settings(**params):
    defaults = {
        "max_iter": 20,
        "batch_size": 4,
        "tol": 0.0,
        "n_iter_no_change": 3,
        "ema_decay": 0.0,
    }
    return TrainingSettings(**{**defaults, **params})


def _train(objective, *, data=None, validation=None, lr=0.1, seed=0, **params):
    """``train`` on :class:`Tiny` with SGD; the objective sees the optimizer."""
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    objective.optimizers = [optimizer]
    data = _data() if data is None else data
    run = train(
        model,
        objective,
        [optimizer],
        TrainingRows(data),
        validation,
        torch.Generator().manual_seed(seed),
        _settings(**params),
    )
    return run, model, optimizer


# --------------------------------------------------------------- stopping
def test_early_stopping_after_n_iter_no_change_epochs_without_improvement():
    # Improves in epochs 1-3, then three epochs without improvement: stop at 6.
    objective = Scripted([1.0, 2.0, 3.0, 3.0, 2.5, 1.0, 9.0, 9.0])
    run, _, _ = _train(objective, n_iter_no_change=3)
    assert run.converged
    assert len(run.history) == 6 and objective.epoch == 6
    assert run.best_epoch == 3 and run.score == 3.0
    assert run.failed_epoch is None and not run.interrupted


def test_improvements_within_tol_do_not_count_but_are_kept():
    # Each epoch gains 1e-4 < tol: only the first epoch counts as progress,
    # yet the best (last) score is the one kept.
    objective = Scripted([1.0 + 1e-4 * t for t in range(10)])
    run, _, _ = _train(objective, tol=1e-3, n_iter_no_change=3)
    assert run.converged and len(run.history) == 4
    assert run.best_epoch == 4
    assert run.score == pytest.approx(1.0003)


def test_max_iter_ends_an_improving_run_unconverged():
    objective = Scripted([float(t) for t in range(10)])
    run, _, _ = _train(objective, max_iter=5)
    assert not run.converged and len(run.history) == 5
    assert run.best_epoch == 5 and run.has_model


def test_validation_scores_are_monitored_when_given():
    # Training scores keep rising; the validation scores peak at epoch 2.
    objective = Scripted(
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], validation=[0.0, 5.0, 1.0, 1.0, 1.0, 1.0]
    )
    run, _, _ = _train(objective, validation=_data(3, seed=1), n_iter_no_change=3)
    assert run.best_epoch == 2 and run.score == 5.0
    assert run.converged and len(run.history) == 5
    assert all(VALIDATION_SCORE in entry for entry in run.history)


# ----------------------------------------------------------- learning rate
def test_learning_rate_halves_after_every_half_patience_without_improvement():
    # n_iter_no_change = 4: halve after every 2 epochs without improvement.
    # Epochs: 1 up, 2-3 flat (halve), 4 up (reset), 5-6 flat (halve),
    # 7-8 flat (halve, and stop: 4 in a row).
    objective = Scripted([1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 9.0])
    run, _, optimizer = _train(objective, n_iter_no_change=4, lr=0.8)
    assert LEARNING_RATE_DECAY == 0.5
    rates = [rates[0] for rates in objective.learning_rates]
    assert rates == [0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.2, 0.2]
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert run.converged and len(run.history) == 8


def test_learning_rate_halves_every_epoch_without_improvement_at_patience_one():
    objective = Scripted([1.0, 0.0, 0.0, 0.0])
    run, _, optimizer = _train(objective, n_iter_no_change=1, lr=1.0)
    # max(1, 1 // 2) = 1: one flat epoch halves the rate, and stops the run.
    assert len(run.history) == 2 and run.converged
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_every_group_of_every_optimizer_is_scaled():
    model = Tiny()
    extra = nn.Parameter(torch.zeros(1, dtype=F64))
    first = make_optimizer(
        "sgd", [model.weight], [extra], learning_rate=0.4, noise_learning_rate=0.2
    )
    second = torch.optim.Adam([nn.Parameter(torch.zeros(1, dtype=F64))], lr=0.1)
    training.scale_learning_rates([first, second], LEARNING_RATE_DECAY)
    assert [g["lr"] for g in first.param_groups] == [0.2, 0.1]
    assert second.param_groups[0]["lr"] == 0.05


# ------------------------------------------------------- the kept epoch
def test_the_best_epochs_parameters_are_restored():
    objective = Scripted([1.0, 5.0, 2.0, 3.0, 4.0, 0.0])
    run, model, _ = _train(objective, n_iter_no_change=3, max_iter=6)
    assert run.best_epoch == 2
    # The parameters moved every epoch, so restoring is visible.
    weights = objective.scored_weights
    assert not torch.equal(weights[1], weights[-1])
    assert torch.equal(model.weight.detach(), weights[1])


def test_with_averaging_the_scored_and_kept_parameters_are_the_average():
    objective = Scripted([1.0, 5.0, 2.0, 3.0, 4.0])
    run, model, _ = _train(objective, ema_decay=0.9, n_iter_no_change=3, max_iter=5)
    assert run.best_epoch == 2
    assert torch.equal(model.weight.detach(), objective.scored_weights[1])
    # The average differs from the raw iterate it lags behind.
    raw = Scripted([1.0, 5.0, 2.0, 3.0, 4.0])
    _train(raw, ema_decay=0.0, n_iter_no_change=3, max_iter=5)
    assert not torch.equal(objective.scored_weights[1], raw.scored_weights[1])
    # Averaging changes what is scored, never the steps taken.
    assert objective.losses == raw.losses


def test_a_non_finite_loss_ends_the_run_and_keeps_the_best_model():
    objective = Scripted([1.0, 2.0, 3.0, 4.0], fail_in=3)
    run, model, _ = _train(objective)
    assert run.failed_epoch == 3
    assert len(run.history) == 2 and run.best_epoch == 2 and run.has_model
    assert not run.converged and not run.interrupted
    assert torch.equal(model.weight.detach(), objective.scored_weights[1])
    assert is_finite(model)


def test_non_finite_parameters_after_a_finite_loss_end_the_run():
    class Exploding(Scripted):
        def before_step(self, optimizer):
            # The last of epoch 2's three steps: every loss of the epoch is
            # finite, the parameters after it are not.
            if self.epoch == 2 and len(self.losses[-1]) == 3:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad.fill_(math.inf)

    objective = Exploding([1.0, 2.0, 3.0])
    run, model, _ = _train(objective)
    assert all(math.isfinite(v) for v in objective.losses[1])  # the loss was fine
    assert run.failed_epoch == 2 and run.best_epoch == 1
    assert is_finite(model)
    assert torch.equal(model.weight.detach(), objective.scored_weights[0])


def test_a_non_finite_first_epoch_leaves_no_model():
    objective = Scripted([1.0, 2.0], fail_in=1)
    run, _, _ = _train(objective)
    assert run.failed_epoch == 1 and run.history == []
    assert run.best_epoch == 0 and not run.has_model and run.score == -math.inf


def test_keyboard_interrupt_sets_interrupted_and_keeps_the_best_model():
    objective = Scripted([2.0, 1.0, 3.0], interrupt_in=3)
    run, model, _ = _train(objective)
    assert run.interrupted and not run.converged and run.failed_epoch is None
    assert len(run.history) == 2 and run.best_epoch == 1
    assert torch.equal(model.weight.detach(), objective.scored_weights[0])


def test_keyboard_interrupt_in_the_first_epoch_leaves_no_model():
    objective = Scripted([2.0], interrupt_in=1)
    run, model, _ = _train(objective)
    assert run.interrupted and not run.has_model and run.history == []


# ------------------------------------------------ schedules and history
def test_begin_epoch_receives_the_models_total_epoch_count():
    objective = Scripted([1.0, 2.0, 3.0])
    _train(objective, max_iter=3, epochs_before=5)
    assert objective.begun == [5, 6, 7]


def test_history_epochs_continue_from_entries_before():
    objective = Scripted([1.0, 2.0, 3.0])
    run, _, _ = _train(objective, max_iter=3, entries_before=4)
    assert [entry["epoch"] for entry in run.history] == [5, 6, 7]
    assert objective.entries == run.history  # end_epoch saw every entry


def test_history_entries_hold_the_epochs_losses_scores_and_times():
    objective = Scripted([1.0, 2.0, 3.0])
    run, _, _ = _train(objective, max_iter=3, batch_size=4)
    seconds = [entry["seconds"] for entry in run.history]
    assert seconds == sorted(seconds) and seconds[0] >= 0
    for entry, losses in zip(run.history, objective.losses, strict=True):
        # 10 rows in batches of 4: three steps; the objective is minus the
        # mean step loss, and epoch_scores is told the same value.
        assert len(losses) == 3
        assert entry["train_objective"] == pytest.approx(-np.mean(losses), rel=1e-12)
        assert entry["train_objective_seen"] == entry["train_objective"]
        assert entry["noise_variance"] == 0.5
    assert [entry[TRAIN_SCORE] for entry in run.history] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("track_rows", [True, False])
def test_track_rows_passes_row_positions_or_none(track_rows):
    data = _data(10)
    index = torch.tensor([9, 7, 5, 3, 1, 0, 2])  # 7 training rows, not in order
    rows = TrainingRows(data, index)
    objective = Scripted([1.0, 2.0])
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = _settings(max_iter=2, batch_size=3, track_rows=track_rows)
    generator = torch.Generator().manual_seed(0)
    train(model, objective, [optimizer], rows, None, generator, settings)
    assert len(objective.rows_seen) == 2 * 3  # ceil(7 / 3) steps per epoch
    if not track_rows:
        assert objective.rows_seen == [None] * 6
        return
    for epoch in range(2):
        positions = torch.cat(objective.rows_seen[3 * epoch : 3 * epoch + 3])
        # Every training row once per epoch, shuffled ...
        assert sorted(positions.tolist()) == list(range(7))
        batches = torch.cat(objective.batches[3 * epoch : 3 * epoch + 3])
        # ... and each position names the row its batch holds.
        assert torch.equal(batches, data[index[positions]])
    first, second = (torch.cat(objective.rows_seen[i : i + 3]) for i in (0, 3))
    assert not torch.equal(first, second)  # a fresh shuffle each epoch


def test_batch_size_larger_than_the_data_is_one_step():
    objective = Scripted([1.0])
    _train(objective, max_iter=1, batch_size=1000)
    assert len(objective.losses[0]) == 1
    assert objective.batches[0].shape == (10, 2)


def test_same_generator_same_run():
    runs = [_train(Scripted([1.0, 2.0, 3.0]), max_iter=3, seed=4)[1] for _ in range(2)]
    other = _train(Scripted([1.0, 2.0, 3.0]), max_iter=3, seed=5)[1]
    assert torch.equal(runs[0].weight, runs[1].weight)
    assert not torch.equal(runs[0].weight, other.weight)


# ------------------------------------------------------------ TrainingRows
def test_training_rows_without_an_index_are_all_rows():
    data = _data(6)
    rows = TrainingRows(data)
    assert len(rows) == 6 and rows.shape == (6, 2)
    assert rows.dtype == F64 and rows.device.type == "cpu"
    positions = torch.tensor([4, 0, 4])
    assert torch.equal(rows.take(positions), data[[4, 0, 4]])


def test_training_rows_with_an_index_gather_through_it():
    data = _data(6)
    rows = TrainingRows(data, torch.tensor([5, 2, 3]))
    assert len(rows) == 3 and rows.shape == (3, 2)
    taken = rows.take(torch.tensor([0, 2]))
    assert torch.equal(taken, data[[5, 3]])
    # A copy: writing to it leaves the data alone.
    taken.zero_()
    assert not torch.equal(data[[5, 3]], taken)


def test_training_tensor_shares_the_callers_memory_on_the_cpu():
    X = np.random.default_rng(0).normal(size=(5, 3))
    tensor = training_tensor(X, torch.device("cpu"))
    assert tensor.data_ptr() == X.ctypes.data
    X.setflags(write=False)  # read-only: still shared, and no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shared = training_tensor(X, torch.device("cpu"))
    assert shared.data_ptr() == X.ctypes.data
    reversed_view = training_tensor(X[::-1], torch.device("cpu"))
    assert torch.equal(reversed_view, torch.from_numpy(X[::-1].copy()))


def test_mean_feature_variance():
    X = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]], dtype=F64)
    # Oracle: numpy's population variance per feature, averaged.
    variance = X.var(dim=0, unbiased=False)
    assert mean_feature_variance(variance) == pytest.approx(np.var(X.numpy(), 0).mean())
    assert mean_feature_variance(torch.ones(4, 3, dtype=F64).var(dim=0)) == 1.0


# --------------------------------------------------------------- optimizers
def test_adam_gets_one_group_with_every_parameter():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer(
        "adam", [a], [b], learning_rate=0.01, noise_learning_rate=0.5
    )
    assert isinstance(optimizer, torch.optim.Adam)
    (group,) = optimizer.param_groups
    assert group["params"] == [a, b] and group["lr"] == 0.01


def test_sgd_gives_the_noise_its_own_learning_rate():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer(
        "sgd", [a], [b], learning_rate=0.01, noise_learning_rate=0.5
    )
    assert isinstance(optimizer, torch.optim.SGD)
    assert [(g["params"], g["lr"]) for g in optimizer.param_groups] == [
        ([a], 0.01),
        ([b], 0.5),
    ]
    # Without a noise learning rate the noise steps at the main one.
    default = make_optimizer(
        "sgd", [a], [b], learning_rate=0.01, noise_learning_rate=None
    )
    assert [g["lr"] for g in default.param_groups] == [0.01, 0.01]


@pytest.mark.parametrize("which", ["parameters", "noise"])
def test_sgd_skips_empty_groups(which):
    a = nn.Parameter(torch.zeros(2))
    parameters, noise = ([], [a]) if which == "parameters" else ([a], [])
    optimizer = make_optimizer(
        "sgd", parameters, noise, learning_rate=0.01, noise_learning_rate=0.5
    )
    (group,) = optimizer.param_groups
    assert group["params"] == [a]
    assert group["lr"] == (0.5 if which == "parameters" else 0.01)


def test_optimizer_step_with_two_optimizers_steps_them_in_turn():
    # L(a, b) = (a - 1)^2 + (b - 2)^2 + a b: b's gradient depends on a, so a
    # fresh loss after a's step is visible in b's step.
    class Coupled(Objective):
        def __init__(self):
            self.calls, self.hooked = [], []

        def loss(self, model, batch, rows):
            a, b = model.a, model.b
            self.calls.append((float(a.detach()), float(b.detach())))
            return (a - 1) ** 2 + (b - 2) ** 2 + a * b

        def before_step(self, optimizer):
            self.hooked.append(optimizer)

    model = nn.Module()
    model.a = nn.Parameter(torch.tensor(0.5, dtype=F64))
    model.b = nn.Parameter(torch.tensor(-1.0, dtype=F64))
    lr = 0.1
    first = torch.optim.SGD([model.a], lr=lr)
    second = torch.optim.SGD([model.b], lr=lr)
    objective = Coupled()
    loss = optimizer_step(model, objective, [first, second], torch.zeros(1, 1))
    # Oracle: two gradient steps worked out by hand.
    a0, b0 = 0.5, -1.0
    a1 = a0 - lr * (2 * (a0 - 1) + b0)
    b1 = b0 - lr * (2 * (b0 - 2) + a1)  # at the updated a, gradient zeroed
    assert float(model.a.detach()) == pytest.approx(a1, rel=1e-14)
    assert float(model.b.detach()) == pytest.approx(b1, rel=1e-14)
    assert objective.calls == [(a0, b0), (pytest.approx(a1), b0)]
    assert objective.hooked == [first, second]
    # The first (pre-step) loss is returned, detached.
    assert float(loss) == pytest.approx((a0 - 1) ** 2 + (b0 - 2) ** 2 + a0 * b0)
    assert not loss.requires_grad


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_clipping_matches_torch(scale, dtype):
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 20), (64,), (2, 64), (2,)]
    grads = [scale * torch.randn(s, generator=generator, dtype=dtype) for s in shapes]
    ours = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    for p, q, g in zip(ours, theirs, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    ours[1].grad = None  # parameters without a gradient are skipped
    theirs[1].grad = None
    clip_gradient_norm(torch.optim.SGD(ours, lr=1.0), 10.0)
    torch.nn.utils.clip_grad_norm_(theirs, 10.0)
    for p, q in zip(ours, theirs, strict=True):
        if q.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad)
    total = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in ours if p.grad is not None])
    )
    assert float(total) <= 10.0 * (1 + 1e-5)


def test_gradient_clipping_leaves_small_and_missing_gradients_alone():
    p = nn.Parameter(torch.zeros(3, dtype=F64))
    clip_gradient_norm(torch.optim.SGD([p], lr=1.0), 1.0)  # no gradient: no-op
    assert p.grad is None
    p.grad = torch.tensor([0.1, -0.2, 0.3], dtype=F64)
    before = p.grad.clone()
    clip_gradient_norm(torch.optim.SGD([p], lr=1.0), 1.0)
    assert torch.equal(p.grad, before)  # not rescaled by ~1
    # A NaN norm leaves the gradients alone (the step then fails the
    # finiteness check) ...
    p.grad = torch.tensor([math.nan, 1.0, 0.0], dtype=F64)
    clip_gradient_norm(torch.optim.SGD([p], lr=1.0), 1.0)
    assert math.isnan(float(p.grad[0])) and p.grad[1:].tolist() == [1.0, 0.0]
    # ... and so does an infinite one, where torch would scale by 1 / inf
    # and silently zero every finite entry.
    p.grad = torch.tensor([math.inf, 1.0, 0.0], dtype=F64)
    clip_gradient_norm(torch.optim.SGD([p], lr=1.0), 1.0)
    assert p.grad.tolist() == [math.inf, 1.0, 0.0]


def test_gradient_clipping_survives_a_float32_norm_overflow():
    # Every entry finite, the float32 norm infinite (1e20^2 overflows): the
    # norm is recomputed in float64 and the gradients rescaled to the cap.
    p = nn.Parameter(torch.zeros(4, dtype=torch.float32))
    p.grad = torch.tensor([1e20, -1e20, 3e19, 0.0], dtype=torch.float32)
    expected = p.grad.double() / torch.linalg.vector_norm(p.grad.double())
    clip_gradient_norm(torch.optim.SGD([p], lr=1.0), 1.0)
    assert torch.all(torch.isfinite(p.grad))
    torch.testing.assert_close(p.grad.double(), expected, rtol=1e-5, atol=0)


# ------------------------------------------------------------------ helpers
def test_is_finite():
    model = Tiny()
    assert is_finite(model)
    with torch.no_grad():
        model.weight[1] = math.nan
    assert not is_finite(model)


def test_state_to_cpu_copies_nested_tensors():
    tensor = torch.ones(2, requires_grad=True)
    state = {"a": [tensor, (tensor, 3)], "b": {"c": tensor}, "d": "text"}
    copy = state_to_cpu(state)
    assert isinstance(copy["a"], list) and isinstance(copy["a"][1], tuple)
    assert copy["a"][1][1] == 3 and copy["d"] == "text"
    for value in (copy["a"][0], copy["a"][1][0], copy["b"]["c"]):
        assert torch.equal(value, tensor.detach())
        assert value.data_ptr() != tensor.data_ptr() and not value.requires_grad
        assert value.device.type == "cpu"


# ------------------------------------------------------------ extend
def _extend(objective, max_iter, *, first=3, **params):
    """``first`` epochs by ``train``, then :func:`training.extend` to
    ``max_iter``: a screened restart continued."""
    run, model, optimizer = _train(objective, max_iter=first, **params)
    data = _data()
    extended = training.extend(
        run,
        objective,
        TrainingRows(data),
        None,
        torch.Generator().manual_seed(1),
        _settings(max_iter=max_iter, **params),
    )
    return run, extended, model


def test_extend_continues_the_epochs_schedule_and_history():
    objective = Scripted([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    first, run, _ = _extend(objective, 6)
    assert objective.begun == [0, 1, 2, 3, 4, 5]
    assert [entry["epoch"] for entry in run.history] == [1, 2, 3, 4, 5, 6]
    seconds = [entry["seconds"] for entry in run.history]
    assert seconds == sorted(seconds)
    assert run.best_epoch == 6 and run.score == 6.0 and not run.converged
    assert run.optimizers is first.optimizers  # one optimiser state throughout


def test_extend_keeps_the_first_parts_best_when_the_rest_is_worse():
    objective = Scripted([1.0, 5.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    _, run, model = _extend(objective, 8, n_iter_no_change=3)
    # Epochs 4-6 never beat epoch 2 (score 5), and the continued run stops
    # after its own three epochs without improvement.
    assert run.best_epoch == 2 and run.score == 5.0
    assert len(run.history) == 6 and run.converged
    assert torch.equal(model.weight.detach(), objective.scored_weights[1])


def test_extend_returns_a_finished_run_as_it_is():
    converged = Scripted([3.0, 2.0, 1.0, 0.0])
    first, run, _ = _extend(converged, 10, first=10, n_iter_no_change=3)
    assert first.converged and run is first
    interrupted = Scripted([1.0, 2.0], interrupt_in=2)
    first, run, _ = _extend(interrupted, 10)
    assert first.interrupted and run is first and interrupted.epoch == 2
    used = Scripted([1.0, 2.0, 3.0])
    first, run, _ = _extend(used, 3)
    assert run is first and used.epoch == 3


def test_extend_counts_a_failure_in_the_total_epochs():
    objective = Scripted([1.0, 2.0, 3.0, 4.0, 5.0], fail_in=5)
    _, run, model = _extend(objective, 6)
    assert run.failed_epoch == 5 and run.best_epoch == 4 and is_finite(model)
