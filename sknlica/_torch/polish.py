"""The convergent phase of maximum likelihood: full-batch L-BFGS on a frozen estimate.

Minibatch Adam stops where its gradient noise balances its progress, short
of the maximum it targets (on linear-Gaussian data 0.01 nats per row below
probabilistic PCA's closed form).  Here the log-likelihood estimate of the
training rows is made a deterministic, smooth function of the parameters,
and a quasi-Newton method converges on it:

* rows the prior rule integrates well (effective sample size of their
  posterior weights at least :data:`ESS_THRESHOLD`) use one fixed node set
  over the prior;
* every other row gets its own adaptive Gauss-Hermite rule: the shared
  tensor-product Gauss-Hermite nodes of N(0, I) mapped through the row's
  Laplace approximation (the Gauss-Newton mode of ``adaptive.py`` and the
  Cholesky factor of its covariance), built at the current parameters and
  then *frozen*.  The rule is exact when the posterior is Gaussian (a linear
  decoder) and a smooth function of the parameters in any case.  (A frozen
  importance-sampling proposal was tried first: L-BFGS exploited its fixed
  nodes, and a linear fit ended 0.045 nats below PCA's maximum.)

:func:`polish` runs L-BFGS with a strong-Wolfe line search in rounds of up
to :data:`ROUND_ITERATIONS` iterations; after each round the rules are
rebuilt at the parameters it reached (the posterior modes move with the
decoder) before its end value is measured, so a round's start and end
values, and the training scores the rounds are ranked by, are estimates of
the same quality.
It stops when a round improves the training log-likelihood by at most
``tol`` (converged), when the held-out score has not improved by more than
``tol`` for :data:`PATIENCE` rounds (early stopping, as the epochs do), or
at ``max_iter`` iterations.  Full-batch passes run in row chunks with the
gradients accumulated, so memory stays flat in the number of rows.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sknlica._torch.adaptive import find_mode, prior_start, proposal_factor
from sknlica._torch.chunks import ADAPTIVE_POINTS, PAIRWISE_ELEMENTS, chunk_rows
from sknlica._torch.evaluation import decode_nodes
from sknlica._torch.gaussian import (
    cholesky_normal_log_density,
    effective_sample_size,
    latent_log_joint,
    pairwise_log_joint_parts,
)
from sknlica._torch.integration import gauss_hermite_rule
from sknlica._torch.likelihood import GRADIENTS
from sknlica._torch.mle_objectives import ModeCache
from sknlica._torch.training import (
    TRAIN_SCORE,
    VALIDATION_SCORE,
    TrainingRows,
    TrainingRun,
    is_finite,
)

#: Rows whose ESS over the prior nodes is below this get a frozen adaptive
#: proposal (the evaluation's threshold: rows above it had errors of at most
#: 0.014 nats in ``evaluation.py``'s measurements).
ESS_THRESHOLD = 30.0

#: Gauss-Hermite nodes per adaptive row (8 per axis for m = 2).
PROPOSAL_NODES = 64

#: Widening of the Laplace covariance the row rules are built on.
PROPOSAL_SCALE = 1.0

#: L-BFGS iterations between proposal refreshes (and held-out scores).
ROUND_ITERATIONS = 10

#: Curvature pairs L-BFGS keeps.
HISTORY_SIZE = 20

#: Rounds without a held-out improvement of more than ``tol`` before stopping.
PATIENCE = 1

#: ``FrozenLikelihood`` modes: which rows get adaptive proposals.
ADAPTIVE_ROWS = ("none", "low_ess", "all")


@dataclass
class FrozenProposals:
    """Each adaptive row's Laplace approximation: mode and Cholesky factor.

    The row's nodes are ``mode + factor @ u_j`` for the shared
    Gauss-Hermite nodes ``u_j`` of N(0, I) (adaptive Gauss-Hermite
    quadrature): exact when the posterior is Gaussian with that covariance,
    as for a linear decoder.
    """

    rows: torch.Tensor
    mode: torch.Tensor
    factor: torch.Tensor

    def log_weights(self, chunk: slice, x, rule, decoder, noise_variance):
        """``log w_j + log p(x, z_j) - log N(z_j; mode, L L^T)``, ``(B, K)``;
        logsumexp over ``j`` is the rule's ``log p(x)``."""
        nodes, log_weights = rule
        mode, factor = self.mode[chunk], self.factor[chunk]
        z = mode[:, None, :] + torch.einsum("bij,kj->bki", factor, nodes)
        log_q = cholesky_normal_log_density(z, mode, factor)
        return log_weights + latent_log_joint(x, z, decoder, noise_variance) - log_q


class FrozenLikelihood:
    """The training rows' log-likelihood estimate, deterministic in the parameters.

    Parameters
    ----------
    rows : TrainingRows
        The training rows (standardised as they are taken).
    rule : tuple of Tensor
        Fixed prior nodes ``(K, m)`` and their log-weights ``(K,)``.
    adaptive : {"none", "low_ess", "all"}
        Which rows get frozen adaptive proposals at :meth:`refresh`: none
        (a prior rule was asked for), those with an ESS below
        :data:`ESS_THRESHOLD` (``"auto"``), or all (``"adaptive"``).
    gradient : str
        ``"autograd"`` or ``"analytic"``, for the prior-rule rows.
    centre : Tensor or None
        Centre of the distance expansion (the training mean).
    n_proposal_nodes : int, default=PROPOSAL_NODES
        Gauss-Hermite nodes per adaptive row (``round(K ** (1/m))`` per axis).
    denominator : int or None, default=None
        Rows the loss is averaged over; ``None``: ``len(rows)``.  A
        segment's part of :class:`~sknlica._torch.segments.SegmentedFrozen`
        divides by all the training rows.
    """

    def __init__(
        self,
        rows: TrainingRows,
        rule: tuple[torch.Tensor, torch.Tensor],
        *,
        adaptive: str,
        gradient: str = "autograd",
        centre: torch.Tensor | None = None,
        n_proposal_nodes: int = PROPOSAL_NODES,
        denominator: int | None = None,
    ) -> None:
        if adaptive not in ADAPTIVE_ROWS:
            raise ValueError(
                f"adaptive must be one of {ADAPTIVE_ROWS}, got {adaptive!r}"
            )
        self.rows = rows
        self.denominator = len(rows) if denominator is None else denominator
        self.nodes, self.log_weights = rule
        self.adaptive = adaptive
        self.gradient = GRADIENTS[gradient]
        self.centre = centre
        self.row_rule = tuple(
            part.to(dtype=rows.dtype, device=rows.device)
            for part in gauss_hermite_rule(self.nodes.shape[1], n_proposal_nodes)
        )
        self.proposals: FrozenProposals | None = None
        self.prior_rows = torch.arange(len(rows), device=rows.device)
        #: Each row's last mode, to warm-start the next refresh's search.
        self._modes = ModeCache()

    @property
    def needs_refresh(self) -> bool:
        """Whether :meth:`refresh` can change the estimate."""
        return self.adaptive != "none"

    @property
    def n_adaptive(self) -> int:
        """Rows with a frozen adaptive proposal."""
        return 0 if self.proposals is None else len(self.proposals.rows)

    def _row_chunks(self, per_row: int, positions: torch.Tensor, limit: int):
        step = chunk_rows(per_row, limit)
        return positions.split(step)

    @torch.no_grad()
    def refresh(self, model) -> None:
        """Choose the adaptive rows and freeze their proposals at ``model``."""
        if not self.needs_refresh:
            return
        noise = model.noise()
        g = decode_nodes(model.decoder, self.nodes)
        everything = torch.arange(len(self.rows), device=self.rows.device)
        adaptive_rows = (
            everything
            if self.adaptive == "all"
            else self._low_ess_rows(everything, g, noise)
        )
        keep = torch.ones(len(self.rows), dtype=torch.bool, device=everything.device)
        keep[adaptive_rows] = False
        self.prior_rows = everything[keep]
        m = self.nodes.shape[1]
        n = len(adaptive_rows)
        proposals = FrozenProposals(
            adaptive_rows, g.new_empty((n, m)), g.new_empty((n, m, m))
        )
        step = chunk_rows(len(self.nodes), PAIRWISE_ELEMENTS)
        for first in range(0, n, step):
            chunk = slice(first, first + step)
            positions = adaptive_rows[chunk]
            x = self.rows.take(positions)
            point = prior_start(
                x, self.nodes, g, self.log_weights, noise, self.centre
            ).point
            point, _ = self._modes.better_start(
                x, point, positions, model.decoder, noise
            )
            mode, precision = find_mode(x, model.decoder, noise, point)
            self._modes.store(positions, mode)
            proposals.mode[chunk] = mode
            proposals.factor[chunk] = proposal_factor(precision, PROPOSAL_SCALE)
        self.proposals = proposals

    def _low_ess_rows(self, positions, g, noise) -> torch.Tensor:
        """The ``positions`` whose posterior weights over the prior nodes have
        an ESS below :data:`ESS_THRESHOLD`."""
        low = []
        for chunk in self._row_chunks(len(self.nodes), positions, PAIRWISE_ELEMENTS):
            joint, _ = pairwise_log_joint_parts(
                self.rows.take(chunk), g, self.log_weights, noise, self.centre
            )
            log_posterior = joint - torch.logsumexp(joint, dim=1, keepdim=True)
            low.append(chunk[effective_sample_size(log_posterior) < ESS_THRESHOLD])
        return torch.cat(low)

    def backward(self, model, penalty: Callable | None = None) -> float:
        """Minus the mean estimate over the rows (plus ``penalty()``); its
        gradient is accumulated into the parameters' ``.grad``."""
        n_rows = self.denominator
        total = 0.0
        if len(self.prior_rows):
            # Decode the nodes once; each chunk's backward stops at g and
            # sigma^2 (leaves), and one backward through the decoder follows.
            g = model.decoder(self.nodes)
            noise = model.noise()
            g_leaf = g.detach().requires_grad_(True)
            noise_leaf = noise.detach().requires_grad_(noise.requires_grad)
            for positions in self._row_chunks(
                len(self.nodes), self.prior_rows, PAIRWISE_ELEMENTS
            ):
                x = self.rows.take(positions)
                log_marginal = self.gradient(
                    x, g_leaf, self.log_weights, noise_leaf, self.centre
                )
                loss = -log_marginal.sum() / n_rows
                loss.backward()
                total += float(loss.detach())
            outputs, grads = [g], [g_leaf.grad]
            if noise.requires_grad and noise_leaf.grad is not None:
                outputs.append(noise)
                grads.append(noise_leaf.grad)
            torch.autograd.backward(outputs, grads)
        if self.n_adaptive:
            step = chunk_rows(len(self.row_rule[0]), ADAPTIVE_POINTS)
            for first in range(0, self.n_adaptive, step):
                chunk = slice(first, first + step)
                x = self.rows.take(self.proposals.rows[chunk])
                log_w = self.proposals.log_weights(
                    chunk, x, self.row_rule, model.decoder, model.noise()
                )
                loss = -torch.logsumexp(log_w, dim=1).sum() / n_rows
                loss.backward()
                total += float(loss.detach())
        return total + penalty_backward(penalty)


def penalty_backward(penalty: Callable | None) -> float:
    """Accumulate the gradient of ``penalty()`` and return its value (0
    without one): the frozen objectives' last term."""
    if penalty is None:
        return 0.0
    extra = penalty()
    extra.backward()
    return float(extra.detach())


@dataclass
class PolishSettings:
    """How :func:`polish` runs."""

    max_iter: int
    tol: float
    round_iterations: int = ROUND_ITERATIONS
    history_size: int = HISTORY_SIZE
    patience: int = PATIENCE


def polish(
    model: torch.nn.Module,
    frozen: FrozenLikelihood,
    run: TrainingRun,
    score_validation: Callable | None,
    settings: PolishSettings,
    *,
    penalty: Callable | None = None,
) -> None:
    """Refine ``model`` by L-BFGS rounds on ``frozen``; update ``run`` in place.

    ``score_validation(model, refine)`` returns the held-out entries of a
    history entry (``None``: no held-out rows; the training estimate is
    monitored).  Each round appends one entry to ``run.history`` with
    ``phase="lbfgs"`` and the cumulative ``iterations``.  ``run.converged``
    says whether a stopping criterion held before ``settings.max_iter``
    iterations; ``model`` ends holding the best-scoring parameters (those it
    started with if no round improved on ``run.score``).
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    seconds_before = run.history[-1]["seconds"] if run.history else 0.0
    # Kept unless a round beats the score the parameters started with.
    best_state = copy.deepcopy(model.state_dict())
    score_key = VALIDATION_SCORE if score_validation is not None else TRAIN_SCORE
    iterations = counted = no_improvement = 0
    optimizer = None
    run.converged = False

    def closure():
        optimizer.zero_grad(set_to_none=True)
        return torch.tensor(frozen.backward(model, penalty))

    try:
        frozen.refresh(model)
        while iterations < settings.max_iter:
            budget = min(settings.round_iterations, settings.max_iter - iterations)
            if optimizer is None:
                # One optimiser for all rounds: a refresh moves the frozen
                # estimate only slightly, so the curvature pairs stay useful
                # (a fresh optimiser per round restarted from steepest
                # descent, and converged linearly on ill-conditioned fits).
                optimizer = torch.optim.LBFGS(
                    parameters,
                    lr=1.0,
                    max_iter=budget,
                    history_size=settings.history_size,
                    line_search_fn="strong_wolfe",
                    tolerance_grad=1e-9,
                    tolerance_change=1e-12,
                )
            optimizer.param_groups[0]["max_iter"] = budget
            model.train()
            # step() returns the loss at its first evaluation: this round's start.
            before = float(optimizer.step(closure))
            n_iter = int(optimizer.state[parameters[0]].get("n_iter", 0))
            iterations += max(1, n_iter - counted)
            counted = n_iter
            # Rebuild the rules at the parameters reached before measuring:
            # the round's start and end values are then estimates of the same
            # quality, and so are the training scores rounds are ranked by (a
            # value on the rules the round optimised is biased up by the
            # optimisation, and rows that changed kind, prior rule to
            # adaptive, moved it by up to 0.2 nats/row).  The rules serve the
            # next round.
            frozen.refresh(model)
            after = _objective_value(frozen, model, penalty)
            if not math.isfinite(after) or not is_finite(model):
                run.failed_epoch = len(run.history) + 1
                break
            model.eval()
            entry = {
                "epoch": len(run.history) + 1,
                "phase": "lbfgs",
                "iterations": iterations,
                "train_objective": -after,
                TRAIN_SCORE: -after,
                "adaptive_rows": frozen.n_adaptive,
            }
            with torch.no_grad():
                if score_validation is not None:
                    entry.update(score_validation(model, frozen.n_adaptive > 0))
                entry["noise_variance"] = float(model.noise().mean())
            entry["seconds"] = seconds_before + time.perf_counter() - start
            run.history.append(entry)
            score = entry[score_key]
            if score > run.score:
                best_state = copy.deepcopy(model.state_dict())
            no_improvement = (
                0 if score > run.score + settings.tol else no_improvement + 1
            )
            if score > run.score:
                run.score, run.best_epoch = score, len(run.history)
            if before - after <= settings.tol or no_improvement >= settings.patience:
                run.converged = True
                break
    except KeyboardInterrupt:
        run.interrupted = True
    model.load_state_dict(best_state)


def _objective_value(frozen: FrozenLikelihood, model, penalty) -> float:
    """The frozen estimate's loss at ``model``, gradients discarded."""
    value = frozen.backward(model, penalty)
    model.zero_grad(set_to_none=True)
    return value
