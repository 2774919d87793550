"""Test doubles: estimators whose training loss can be made to fail on cue.

``hooked(Estimator)`` is a subclass whose training objective wraps the real
one: every minibatch loss passes through ``Hooked.before_loss`` (which counts
steps, records torch's thread count and raises ``KeyboardInterrupt`` at step
``interrupt_at``) and ``Hooked.after_loss`` (which turns the loss NaN from
step ``fail_at`` on, or always with ``fail``); ``epochs_begun`` and
``kl_weights`` record the epoch schedule the objective was driven with,
``entries`` a copy of every history entry as the epoch ended.
"""

import math

import torch

from sknlica._torch.training import Objective


class _HookedObjective(Objective):
    def __init__(self, inner: Objective, owner) -> None:
        self.inner = inner
        self.owner = owner

    def __getattr__(self, name):
        # Everything else (scores, the centre) is the wrapped objective's.
        return getattr(self.inner, name)

    def begin_epoch(self, epoch):
        self.inner.begin_epoch(epoch)
        self.owner.epochs_begun.append(epoch)
        self.owner.kl_weights.append(getattr(self.inner, "kl_weight", None))

    def loss(self, model, batch, rows):
        self.owner.before_loss()
        return self.owner.after_loss(self.inner.loss(model, batch, rows))

    def before_step(self, optimizer):
        self.inner.before_step(optimizer)

    def epoch_scores(self, model, rows, validation, train_objective):
        return self.inner.epoch_scores(model, rows, validation, train_objective)

    def end_epoch(self, entry):
        self.inner.end_epoch(entry)
        self.owner.entries.append(dict(entry))


def hooked(Estimator):
    """``Estimator`` with controllable training losses (see the module doc)."""

    class Hooked(Estimator):
        steps = 0
        fail_at = math.inf
        interrupt_at = math.inf
        fail = False
        seen_threads = None

        def _make_objective(self, *args, **kwargs):
            if not hasattr(self, "epochs_begun"):
                self.epochs_begun, self.kl_weights, self.entries = [], [], []
            return _HookedObjective(super()._make_objective(*args, **kwargs), self)

        def before_loss(self):
            self.steps += 1
            self.seen_threads = torch.get_num_threads()
            if self.steps >= self.interrupt_at:
                raise KeyboardInterrupt

        def after_loss(self, loss):
            if self.fail or self.steps >= self.fail_at:
                return loss * math.nan
            return loss

    Hooked.__name__ = Hooked.__qualname__ = Estimator.__name__
    return Hooked
