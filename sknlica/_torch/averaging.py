"""Exponential moving average of a module's parameters (Polyak averaging).

Minibatch steps leave the parameters jittering around where the objective
would take them; the average of the recent iterates sits closer.  The
effect grows as the noise variance shrinks, because the likelihood's
curvature grows as ``1 / sigma^2`` while Adam's step size does not
(``benchmarks/bench_small_noise.py``).  The estimators evaluate, select and
keep the averaged parameters; the optimiser keeps stepping the raw ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class ParameterAverage:
    """Exponential moving average of the trainable parameters of ``module``.

    After ``t`` updates the average moves towards the current parameters by
    ``1 - min(decay, (1 + t) / (10 + t))`` (the ``num_updates`` rule of
    TensorFlow's ``ExponentialMovingAverage``), so that it forgets the
    initialisation quickly: early on it spans about the last 11% of the
    steps, later the last ``1 / (1 - decay)`` steps.

    Parameters
    ----------
    module : torch.nn.Module
        Its parameters with ``requires_grad`` are averaged; buffers are not.
    decay : float
        In ``[0, 1)``; 0 makes the average the current parameters.

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(1, 1, bias=False)
    >>> _ = torch.nn.init.zeros_(layer.weight)
    >>> average = ParameterAverage(layer, decay=0.998)
    >>> _ = torch.nn.init.ones_(layer.weight)  # an optimiser step
    >>> average.update()  # first update: weight 1 - 1/10 on the new value
    >>> with average.applied():
    ...     print(round(layer.weight.item(), 4))
    0.9
    >>> layer.weight.item()
    1.0
    """

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(
                f"decay must be in [0, 1), got {decay!r}; 0.998 averages over "
                "about the last 500 steps."
            )
        self.parameters = [p for p in module.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.parameters]
        self.decay = float(decay)
        self.n_updates = 0

    def weight(self) -> float:
        """Weight of the current parameters in the next update."""
        return 1.0 - min(self.decay, (1 + self.n_updates) / (10 + self.n_updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current parameters."""
        weight = self.weight()
        self.n_updates += 1
        if self.average:
            torch._foreach_lerp_(
                self.average, [p.detach() for p in self.parameters], weight
            )

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the module holds the averaged parameters."""
        with torch.no_grad():
            current = [p.detach().clone() for p in self.parameters]
            for parameter, average in zip(self.parameters, self.average, strict=True):
                parameter.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, saved in zip(self.parameters, current, strict=True):
                    parameter.copy_(saved)
