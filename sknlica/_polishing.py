"""The L-BFGS polish after the epochs, shared by both estimators.

Each estimator says what is polished (:meth:`PolishMixin._frozen_objective`:
the MLE's frozen likelihood, the VAE's IWAE bound with fixed draws) and how
a polished model is scored on the held-out rows
(:meth:`PolishMixin._polish_scorer`); this mixin decides whether and for how
long to polish (``max_polish_iter``), runs :func:`~sknlica._torch.polish.polish`
in float64 and reports the iterations.
"""

from __future__ import annotations

import copy

import torch

from sknlica._torch.polish import PolishSettings, polish
from sknlica._torch.segments import SegmentedFrozen
from sknlica._torch.training import TrainingRun, WeightPenalty

#: Most L-BFGS iterations of the polish when ``max_polish_iter="auto"``
#: polishes; it runs at most as many iterations as the fit ran epochs, so
#: that (an iteration costing about one full pass, as an epoch does) it at
#: most about doubles the fit's cost, however short ``max_iter`` is.
AUTO_POLISH_ITER = 200

#: ``max_polish_iter="auto"`` polishes only fits on at most this many
#: training rows.  An epoch there is a few minibatch steps, too few for Adam
#: to converge in ``max_iter`` epochs (real data sets of a few hundred rows:
#: diabetes with ``noise="diagonal"``, ``m = 5``, 0.83 nats/row behind
#: factor analysis without the polish, 2.3 ahead with it); on more rows an
#: epoch takes many steps, and a full-batch pass, and the polish's per-row
#: state, grow with the rows.
AUTO_POLISH_MAX_ROWS = 10_000


class PolishMixin:
    """``max_polish_iter`` for an estimator: the L-BFGS phase after the epochs."""

    def _frozen_objective(self, rows, *, generator, centre, denominator=None):
        """The deterministic objective :func:`polish` minimises, on float64
        ``rows`` (of one segment, averaging over ``denominator`` rows, with
        the conditional prior)."""
        raise NotImplementedError

    def _polish_scorer(self, objective, rows, validation, centre):
        """``(model, refine) -> dict`` of held-out history entries."""
        raise NotImplementedError

    def _polish(self, run, objective, rows, validation, *, generator, centre):
        """Full-batch L-BFGS on :meth:`_frozen_objective`, after the epochs or,
        with ``solver="lbfgs"``, instead of them.

        It runs in float64 whatever the data's dtype: a full-batch line
        search compares sums over all rows, which float32 resolves only to
        about 1e-7 relative, and fits of the same data in different units
        then took different steps.
        """
        budget = self._polish_budget(run, len(rows))
        if not budget or run.interrupted or run.failed_epoch is not None:
            return
        if self.solver != "lbfgs" and not run.has_model:
            return
        model = run.model
        centre = None if centre is None else centre.double()
        if next(model.parameters()).dtype != torch.float64:
            model = copy.deepcopy(model).double()
        if validation is not None:
            validation = validation.double()
        rows = rows.as_dtype(torch.float64)
        if rows.groups is None:
            frozen = self._frozen_objective(rows, generator=generator, centre=centre)
        else:
            # The conditional prior: each segment's rows on its view.
            frozen = SegmentedFrozen(
                rows,
                lambda part, denominator: self._frozen_objective(
                    part, generator=generator, centre=centre, denominator=denominator
                ),
            )
        scorer = (
            None
            if validation is None
            else self._polish_scorer(objective, rows, validation, centre)
        )
        # On the model polished (a float64 copy for float32 fits).
        penalty = (
            WeightPenalty(model.decoder, self.alpha, len(rows)) if self.alpha else None
        )
        polish(
            model,
            frozen,
            run,
            scorer,
            PolishSettings(max_iter=budget, tol=self.tol),
            penalty=penalty,
        )
        if model is not run.model:
            # load_state_dict casts back to the model's dtype.
            run.model.load_state_dict(model.state_dict())

    def _polish_budget(self, run: TrainingRun, n_rows: int) -> int:
        """L-BFGS iterations for this fit: ``max_iter`` with ``solver="lbfgs"``;
        with ``max_polish_iter="auto"``, on at most
        :data:`AUTO_POLISH_MAX_ROWS` training rows, as many as the epochs run
        (at most :data:`AUTO_POLISH_ITER`) when the decoder is linear or the
        epochs ended at ``max_iter``, else none (and none with
        ``prior="conditional"``)."""
        if self.solver == "lbfgs":
            return self.max_iter
        if self.max_polish_iter != "auto":
            return self.max_polish_iter
        if self.prior == "conditional":
            # "auto" does not polish the conditional model.
            return 0
        if n_rows > AUTO_POLISH_MAX_ROWS:
            return 0
        linear = not tuple(self.hidden_layer_sizes)
        epochs = len(run.history)
        ran_out = not run.converged and epochs == self.max_iter
        return min(AUTO_POLISH_ITER, epochs) if linear or ran_out else 0

    def _store_iterations(self, iterations: int) -> None:
        self.n_polish_iter_ = iterations

    def _nonconvergence_message(self, iterations: int) -> str:
        name = type(self).__name__
        if self.solver == "lbfgs":
            return (
                f"{name} reached max_iter={self.max_iter} L-BFGS iterations "
                "without converging; consider increasing max_iter."
            )
        if iterations and self.max_polish_iter == "auto":
            return (
                f"{name} did not converge: {self.n_iter_} epochs "
                f"(max_iter={self.max_iter}), then {iterations} L-BFGS "
                "iterations (max_polish_iter='auto' runs at most as many as "
                f"the epochs, up to {AUTO_POLISH_ITER}); consider increasing "
                "max_iter, or an explicit max_polish_iter."
            )
        if iterations:
            return (
                f"{name}'s L-BFGS polish reached {iterations} iterations "
                f"(max_polish_iter={self.max_polish_iter!r}) without converging; "
                "consider a larger max_polish_iter."
            )
        return super()._nonconvergence_message(iterations)
