"""A finite-difference check of an accumulated gradient, for deterministic
objectives (the frozen estimates of the L-BFGS polish)."""

from __future__ import annotations

import pytest


def assert_matches_finite_differences(
    value, parameters, gradients, *, samples=4, step=1e-6, atol=1e-6
):
    """Central differences of ``value()`` at about ``samples`` entries of each
    parameter against ``gradients`` (the parameters are restored)."""
    for parameter, grad in zip(parameters, gradients, strict=True):
        flat = parameter.data.view(-1)
        for index in range(0, flat.numel(), max(1, flat.numel() // samples)):
            original = float(flat[index])
            flat[index] = original + step
            upper = value()
            flat[index] = original - step
            lower = value()
            flat[index] = original
            numeric = (upper - lower) / (2 * step)
            assert float(grad.view(-1)[index]) == pytest.approx(numeric, abs=atol)


def frozen_value(frozen, model, penalty=None):
    """A frozen objective's value at ``model``, its gradients discarded."""
    value = frozen.backward(model, penalty)
    model.zero_grad(set_to_none=True)
    return value
