"""The MLE training objectives: losses against closed forms, state they own."""

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from sknlica._torch import adaptive
from sknlica._torch.gaussian import pairwise_log_joint
from sknlica._torch.likelihood import prior_rule_pass
from sknlica._torch.mle_objectives import (
    AUTO_CHECK_ROWS,
    AUTO_RECHECK_EPOCHS,
    AUTO_SWITCH_FRACTION,
    AUTO_SWITCH_GRADIENT_ERROR,
    MIXED_ESS_THRESHOLD,
    AdaptiveObjective,
    AutoObjective,
    ModeCache,
    PriorRuleObjective,
    make_mle_objective,
)
from sknlica._torch.models import MLEModel
from sknlica._torch.networks import NoiseVariance


def _linear_training_model(integration, s2=0.01, n_rows=60):
    """An objective, a linear-decoder ``MLEModel``, its data and exact log p(x)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 2)) * 3, rng.normal(size=6)
    X = rng.normal(size=(n_rows, 2)) @ a.T + b
    X += np.sqrt(s2) * rng.normal(size=X.shape)
    linear = torch.nn.Linear(2, 6, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(a))
        linear.bias.copy_(torch.tensor(b))
    objective = make_mle_objective(
        integration,
        n_components=2,
        n_nodes=1024,
        n_eval_nodes=16384,
        grid_half_width=None,
        gradient="autograd",
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
        device=torch.device("cpu"),
    )
    noise = NoiseVariance(s2, learn=False, floor=0.0, dtype=torch.float64, device="cpu")
    exact = multivariate_normal(b, a @ a.T + s2 * np.eye(6)).logpdf(X)
    return objective, MLEModel(linear, noise), torch.tensor(X), exact


def _cache(objective) -> ModeCache:
    return objective.estimate.modes


@pytest.mark.parametrize("integration", ["auto", "adaptive"])
def test_training_loss_with_warm_starts_matches_closed_form(integration):
    objective, model, x, exact = _linear_training_model(integration)
    if integration == "auto":
        objective.switched = True  # what "auto" does once the noise is small
    rows = torch.arange(len(x)).flip(0)  # positions need not follow x's order
    estimates = []
    for _ in range(8):  # a cold start, then warm starts from the cached modes
        loss = objective.loss(model, x, rows)
        estimates.append(-float(loss.detach()))
        assert torch.all(torch.isfinite(_cache(objective).modes))
    # All rows share each step's normals and, the decoder being linear, have
    # the same whitened posterior: a step's error is common to its rows
    # (measured -0.048 to 0.024 nats), and averages out over steps (-0.005).
    errors = np.array(estimates) - exact.mean()
    assert np.abs(errors).max() <= 0.1 and abs(errors.mean()) <= 0.02
    # The cached modes are the linear-Gaussian posterior modes of their rows.
    a, b = model.decoder.weight.detach(), model.decoder.bias.detach()
    precision = a.T @ a / 0.01 + torch.eye(2, dtype=torch.float64)
    modes = torch.linalg.solve(precision, a.T @ (x - b).T / 0.01).T
    np.testing.assert_allclose(_cache(objective).modes[rows], modes, atol=1e-6)
    if integration == "auto":
        # Without the switch, the prior grid's estimate is far off here.
        objective.switched = False
        loss = objective.loss(model, x, rows)
        assert abs(-float(loss.detach()) - exact.mean()) > 0.5


def test_warm_start_keeps_the_better_of_cache_and_prior_node():
    _, model, x, _ = _linear_training_model("adaptive", n_rows=8)
    cache = ModeCache()
    noise = model.noise()
    point = torch.zeros(8, 2, dtype=torch.float64)
    rows = torch.arange(8)
    # Empty cache: the prior start is kept and the search is not warm.
    start, warm = cache.better_start(x, point, rows, model.decoder, noise)
    assert not warm and torch.equal(start, point)
    # Half the rows cached at their true modes, half at a far-off point.
    good, _ = adaptive.find_mode(x, model.decoder, noise, point, n_steps=8)
    cache.modes[:4] = good[:4]
    cache.modes[4:] = 50.0
    start, warm = cache.better_start(x, point, rows, model.decoder, noise)
    assert warm
    torch.testing.assert_close(start[:4], good[:4])
    torch.testing.assert_close(start[4:], point[4:])


def test_auto_switch_needs_a_measured_gradient_error():
    objective, *_ = _linear_training_model("auto")
    many_low = 2 * AUTO_SWITCH_FRACTION
    errors = [
        0.5 * AUTO_SWITCH_GRADIENT_ERROR,  # low ESS, accurate: stays on the grid
        AUTO_SWITCH_GRADIENT_ERROR,  # inaccurate: switches
        0.6 * AUTO_SWITCH_GRADIENT_ERROR,  # between half and the threshold: stays
        0.4 * AUTO_SWITCH_GRADIENT_ERROR,  # accurate again: back to the grid
    ]
    states = []
    for error in errors:
        objective.end_epoch(
            {"low_ess_fraction": many_low, "validation_gradient_error": error}
        )
        states.append(objective.trains_adaptively)
    assert states == [False, True, True, False]


def _exact_gradient(model, x):
    """Gradient of the rows' mean closed-form log p(x) under the linear model."""
    weight, bias = model.decoder.weight, model.decoder.bias
    with torch.enable_grad():
        covariance = weight @ weight.T + model.noise() * torch.eye(6, dtype=x.dtype)
        normal = torch.distributions.MultivariateNormal(bias, covariance)
        value = normal.log_prob(x).mean()
        gradients = torch.autograd.grad(value, [weight, bias])
    return torch.cat([g.flatten() for g in gradients])


def _rule_accuracy(objective, model, x):
    """rule_accuracy on all of ``x`` (fewer rows than AUTO_CHECK_ROWS), and the
    training rule's per-row log p(x), ESS and gradient."""
    nodes, log_weights = objective.sampler.fixed_rule()
    with torch.no_grad():
        accuracy = objective.rule_accuracy(model, x)
        first = prior_rule_pass(
            x, model.decoder(nodes), log_weights, model.noise(), with_ess=True
        )
    with torch.enable_grad():
        joint = pairwise_log_joint(x, model.decoder(nodes), log_weights, model.noise())
        value = torch.logsumexp(joint, dim=1).mean()
        gradients = torch.autograd.grad(
            value, [model.decoder.weight, model.decoder.bias]
        )
    return accuracy, first, torch.cat([g.flatten() for g in gradients])


@pytest.mark.parametrize(
    ("s2", "inaccurate"),
    [(0.01, True), (0.3, False)],  # sharp posteriors; wide ones (ESS < 30 still)
)
def test_rule_accuracy_against_the_closed_form(s2, inaccurate):
    objective, model, x, exact = _linear_training_model(
        "auto", s2=s2, n_rows=AUTO_CHECK_ROWS
    )
    accuracy, first, rule_gradient = _rule_accuracy(objective, model, x)
    # Every row has low ESS over the training grid: the ESS alone would switch.
    assert bool((first.ess < MIXED_ESS_THRESHOLD).all())
    true_value_error = np.abs(first.log_marginal.numpy() - exact).mean()
    exact_gradient = _exact_gradient(model, x)
    true_gradient_error = float(
        (rule_gradient - exact_gradient).norm() / exact_gradient.norm()
    )
    # The adaptive reference is accurate: the measured errors are the true ones.
    assert accuracy["validation_rule_error"] == pytest.approx(
        true_value_error, abs=0.02
    )
    assert accuracy["validation_gradient_error"] == pytest.approx(
        true_gradient_error, abs=0.05
    )
    if inaccurate:
        assert true_gradient_error > 2 * AUTO_SWITCH_GRADIENT_ERROR
    else:
        assert true_gradient_error < AUTO_SWITCH_GRADIENT_ERROR / 4


@pytest.mark.parametrize("switched", [False, True])
def test_rule_accuracy_is_measured_when_it_could_change_the_switch(switched):
    objective, model, x, _ = _linear_training_model("auto", s2=0.01)
    objective.switched = switched
    with torch.no_grad():
        scores = objective.epoch_scores(model, None, x, -1.0)
        polish_scores = objective.validation_scores(model, x, refine=switched)
    assert scores["low_ess_fraction"] >= AUTO_SWITCH_FRACTION
    assert scores["validation_gradient_error"] > AUTO_SWITCH_GRADIENT_ERROR
    # The polish's scores never switch anything: nothing is measured there.
    assert "validation_gradient_error" not in polish_scores
    # Wide posteriors: too few low-ESS rows to switch, nothing is measured.
    objective, model, x, _ = _linear_training_model("auto", s2=25.0)
    with torch.no_grad():
        scores = objective.epoch_scores(model, None, x, -1.0)
    assert scores["low_ess_fraction"] < AUTO_SWITCH_FRACTION
    assert "validation_gradient_error" not in scores


def test_once_switched_the_rule_is_checked_every_few_epochs():
    objective, model, x, _ = _linear_training_model("auto", s2=0.01)
    checked, states = [], []
    for _ in range(1 + 2 * AUTO_RECHECK_EPOCHS):
        with torch.no_grad():
            scores = objective.epoch_scores(model, None, x, -1.0)
        checked.append("validation_gradient_error" in scores)
        objective.end_epoch(scores)
        states.append(objective.trains_adaptively)
    # Checked before the switch (which it causes), then every
    # AUTO_RECHECK_EPOCHS epochs; an epoch without a check keeps the switch.
    pause = [False] * (AUTO_RECHECK_EPOCHS - 1)
    assert checked == [True, *pause, True, *pause, True]
    assert all(states)
    # Between checks the fraction alone still switches back.
    objective.end_epoch({"low_ess_fraction": 0.0})
    assert not objective.trains_adaptively


def test_registry_builds_the_objective_for_each_rule():
    for integration, kind in [
        ("auto", AutoObjective),
        ("adaptive", AdaptiveObjective),
        ("grid", PriorRuleObjective),
        ("qmc", PriorRuleObjective),
        ("monte_carlo", PriorRuleObjective),
        ("gauss_hermite", PriorRuleObjective),
    ]:
        objective, *_ = _linear_training_model(integration)
        assert type(objective) is kind


def test_auto_switch_has_hysteresis():
    objective, *_ = _linear_training_model("auto")
    assert not objective.trains_adaptively
    fractions = [
        0.0,
        AUTO_SWITCH_FRACTION,
        0.7 * AUTO_SWITCH_FRACTION,
        0.4 * AUTO_SWITCH_FRACTION,
    ]
    states = []
    for fraction in fractions:
        objective.end_epoch(
            {"low_ess_fraction": fraction, "validation_gradient_error": 1.0}
        )
        states.append(objective.trains_adaptively)
    # On at the threshold, still on between half of it and it, off below half.
    assert states == [False, True, True, False]
    # Without validation rows there is no fraction and nothing changes.
    objective.switched = True
    objective.end_epoch({"train_log_likelihood": -1.0})
    assert objective.trains_adaptively
