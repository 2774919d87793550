"""The maximum-likelihood training objectives, one per ``integration`` option.

Each is an :class:`~sknlica._torch.training.Objective` whose minibatch loss
is minus the mean estimated ``log p(x)`` of the batch rows, and which owns
the state its estimate needs across steps:

* :class:`PriorRuleObjective` (``"grid"``, ``"gauss_hermite"``, ``"qmc"``,
  ``"monte_carlo"``): nodes over the prior from a node sampler;
* :class:`AdaptiveObjective` (``"adaptive"``): posterior-adapted importance
  sampling for every row, with each row's last posterior mode cached to
  warm-start the next epoch's mode search;
* :class:`AutoObjective` (``"auto"``): the prior rule, switching the rows
  whose ESS is low to the adaptive estimate once the validation rows show
  that the prior rule's gradient has become inaccurate (small noise), with
  hysteresis.

All score an epoch the same way: the validation rows' ``log p(x)`` by the
fixed evaluation rule of ``evaluation.py``.
"""

from __future__ import annotations

import math

import torch

from sknlica._torch.adaptive import (
    AdaptiveNodeSampler,
    adapted_proposal,
    importance_log_weights,
    prior_start,
)
from sknlica._torch.evaluation import (
    ESS_THRESHOLD,
    decoded_evaluation_rule,
    evaluate,
    evaluation_normals,
)
from sknlica._torch.gaussian import (
    effective_sample_size,
    latent_log_joint,
    pairwise_log_joint,
)
from sknlica._torch.integration import PriorNodeSampler, prior_rule
from sknlica._torch.likelihood import GRADIENTS, prior_rule_pass
from sknlica._torch.training import TRAIN_SCORE, VALIDATION_SCORE, Objective

#: The per-epoch validation score uses this many times ``n_nodes`` fixed nodes
#: (at most ``n_eval_nodes``): accurate enough to stop on, far cheaper than
#: the evaluation rule.
VALIDATION_NODE_FACTOR = 4

#: Proposal nodes per low-ESS row in the per-epoch validation score while
#: training is adaptive: 256 measured 0.011-0.017 nats/row mean error against
#: dense quadrature (``benchmarks/results/adaptive.md``), plenty to stop on,
#: at an eighth of the cost of the evaluation's 2,048.
VALIDATION_ADAPTIVE_NODES = 256

#: Proposal nodes per row and step of adaptive training.  The estimate is
#: unbiased for p(x) at any size; 64 keeps a step's decoder work
#: (batch_size * 64 points) moderate.
ADAPTIVE_TRAIN_NODES = 64

#: Gauss-Newton steps per training step.  Fewer than for evaluation: any
#: fixed proposal keeps the estimate unbiased, and the mode search dominated
#: the step's cost at 8 steps.
ADAPTIVE_TRAIN_NEWTON_STEPS = 3

#: Gauss-Newton steps per training step when every row's search starts from
#: its previous epoch's mode (warm start) instead of the best prior node.
ADAPTIVE_WARM_NEWTON_STEPS = 1

#: ``"auto"`` counts a validation row as low-ESS when the ESS of its
#: posterior weights over the validation nodes (4,096 grid nodes by default)
#: is below this.  Lower than the evaluation's threshold: measured at the
#: true model of the report's relu generator (m = 2, n = 20, 500 rows, 4,096
#: grid nodes, against a dense 600 x 600 grid), at sigma^2 = 1 half the rows
#: have ESS 12-25, yet the grid's mean error is 0.001 nats/row and no row has
#: ESS < 5.  At sigma^2 = 0.1, 0.04, 0.01, 56%, 63%, 70% of the rows have
#: ESS < 5, and the grid's mean error (0.15, 0.52, 3.2) comes almost all from
#: them (rows with ESS >= 5: 0.010, 0.021, 0.089).
AUTO_SWITCH_ESS = 5.0

#: Fraction of low-ESS validation rows at which ``"auto"`` switches its
#: low-ESS training rows to the adaptive estimate; it switches back below
#: half of it.  In ``benchmarks/bench_adaptive.py`` the fraction stays 0 in
#: every epoch of the sigma^2 = 1 default fit and passes 0.1 after epoch 12 of
#: the sigma^2 = 0.04 fit (sigma^2 = 0.40 then); switching at 0.02 instead
#: gave the same gaps (0.200 and 0.162 against 0.202 and 0.153, seeds 0 and
#: 1, measured before parameter averaging).
AUTO_SWITCH_FRACTION = 0.1

#: ``"auto"`` switches only where the prior rule misleads the fit: the
#: gradient of the training rule's mean ``log p(x)`` over validation rows the
#: switch would integrate adaptively (training-rule ESS below
#: :data:`MIXED_ESS_THRESHOLD`) must differ from the adaptive estimate's by
#: at least this fraction of the latter's norm; it switches back below half
#: of it.  Low ESS alone is not inaccuracy, and a wrong value is not a wrong
#: gradient: at sigma^2 = 1 with n = 100 features (relu, m = 2, 5,000 rows)
#: 13-41% of the validation rows have ESS < 5 and the training grid's value
#: is 0.06-0.14 nats/row off, a nearly constant offset -- its gradient stays
#: within 2-9%, and a fit on the grid alone reaches the
#: same held-out gap (0.254 against 0.256) in a third of the time.  At
#: sigma^2 = 0.04 (n = 20) the error passes 25% between epochs 30 and 40
#: (the ESS rule switched at 18), with the same gaps (0.103-0.106 and 0.096
#: against 0.102 and 0.103, seeds 0 and 1) in less time.  The check is
#: local: on digits (m = 2, isotropic) the error stays at 1-2% and the fit
#: keeps the grid, though
#: adaptive training found optima 0.5 and 1.4 nats/row better on held-out
#: rows (seeds 0, 1) in twice the time.
AUTO_SWITCH_GRADIENT_ERROR = 0.25

#: Validation rows (at most) on which the training rule is checked, and
#: proposal nodes per row of the adaptive estimate it is checked against.
#: With 64 rows and 256 nodes the check cost about 0.12 s an epoch at n =
#: 100 (the default took 1.13-1.24x the grid's time for the same fit); with
#: 32 and 128, 1.05-1.07x.  The errors that decide lie far from the
#: threshold (2-9% where the grid is right, 25-100% where it is not); at
#: sigma^2 = 0.04 the smaller check switched at epoch 32 instead of 39 (gaps
#: 0.106 and 0.096 against 0.103 and 0.096, seeds 0 and 1).
AUTO_CHECK_ROWS = 32
AUTO_CHECK_NODES = 128

#: Once switched, ``"auto"`` checks the training rule
#: (:meth:`AutoObjective.rule_accuracy`) every this many epochs, not every
#: epoch: with the conditional prior the check runs once per segment, and on
#: the square identifiability data (40 segments, m = n = 5) it cost 0.6 s of
#: the 4.2 s of an adaptive epoch, while the errors it measured (1.5-3.3 in
#: all 45 epochs of seed 0) stayed far above the threshold for switching
#: back (0.125).  Checked every fifth epoch, seeds 0-4 gave the same fits in
#: 200.5 s instead of 239.7 s.  Before the switch it checks every epoch, so
#: the switch itself is never late.
AUTO_RECHECK_EPOCHS = 5

#: Once ``"auto"`` has switched, minibatch rows whose ESS over the training
#: nodes is below this are integrated adaptively, the others by the prior rule
#: (the evaluation's threshold).
MIXED_ESS_THRESHOLD = 30.0


class MLEObjective(Objective):
    """Per-epoch scores shared by the MLE objectives.

    ``history_`` gets ``train_log_likelihood`` (the epoch's mean training
    objective) and, with validation rows, ``validation_log_likelihood``,
    ``low_ess_fraction`` (of rows with ESS below :data:`AUTO_SWITCH_ESS`) and
    ``adaptive_training`` (whether this epoch trained adaptively, in which
    case low-ESS validation rows are refined adaptively too).
    """

    def __init__(
        self,
        *,
        n_components: int,
        validation_nodes: int,
        centre: torch.Tensor | None = None,
    ) -> None:
        self.n_components = n_components
        self.validation_nodes = validation_nodes
        #: Centre of the distance expansion: the training mean (fitted state).
        self.centre = centre

    @property
    def trains_adaptively(self) -> bool:
        return False

    def epoch_scores(self, model, rows, validation, train_objective) -> dict:
        scores = {TRAIN_SCORE: train_objective}
        if validation is not None:
            # Refining every epoch would triple the default fit time at
            # sigma^2 = 1 (7.9 s -> 21.7 s), where about half the rows have
            # ESS < 30 though the grid is accurate for them: refine only
            # while training adaptively.
            scores.update(
                self.validation_scores(model, validation, self.trains_adaptively)
            )
        return scores

    def validation_rule(self, model, validation):
        """The fixed evaluation rule of the validation score, decoded by
        ``model`` in ``validation``'s dtype and device."""
        return decoded_evaluation_rule(
            model.decoder,
            self.n_components,
            self.validation_nodes,
            dtype=validation.dtype,
            device=validation.device,
        )

    def validation_scores(self, model, validation, refine: bool, centre=None) -> dict:
        """``validation_log_likelihood``, ``low_ess_fraction`` and
        ``adaptive_training`` (= ``refine``: low-ESS rows refined adaptively).

        ``centre`` replaces the objective's (e.g. in another dtype)."""
        rule = self.validation_rule(model, validation)
        evaluation = evaluate(
            validation,
            rule,
            model.decoder,
            model.noise(),
            with_mean=False,
            refine=refine,
            n_adaptive_nodes=VALIDATION_ADAPTIVE_NODES,
            # Ranking epochs needs neither the multimodal retry nor the
            # stricter threshold of m >= 3 (both would add adaptive work to
            # every epoch that trains adaptively).
            ess_threshold=ESS_THRESHOLD,
            retry_ess=0.0,
            centre=self.centre if centre is None else centre,
            # The mode and edge checks only flag rows for refinement.
            check_modes=refine,
            check_edge=refine,
        )
        low = evaluation.ess < AUTO_SWITCH_ESS
        return {
            VALIDATION_SCORE: float(evaluation.log_marginal.mean()),
            "low_ess_fraction": float(low.double().mean()) if len(low) else 0.0,
            "adaptive_training": refine,
        }


class PriorRuleObjective(MLEObjective):
    """``log p(x)`` over a prior rule's nodes, by autograd or the analytic gradient."""

    def __init__(self, sampler: PriorNodeSampler, gradient: str, **scoring) -> None:
        super().__init__(**scoring)
        self.sampler = sampler
        self.gradient = GRADIENTS[gradient]

    def loss(self, model, batch, rows):
        nodes, log_weights = self.sampler.draw()
        g = model.decoder(nodes)
        return -self.gradient(batch, g, log_weights, model.noise(), self.centre).mean()


class ModeCache:
    """Each training row's latest posterior mode (NaN until first visited)."""

    def __init__(self) -> None:
        self.modes: torch.Tensor | None = None

    def better_start(self, x, point, rows, decoder, noise_variance):
        """Better (in ``log p(x, z)``) of each row's cached mode and ``point``,
        and whether every row had a cached mode."""
        needed = int(rows.max()) + 1
        if self.modes is None or self.modes.shape[0] < needed:
            grown = x.new_full((needed, point.shape[1]), math.nan)
            if self.modes is not None:
                grown[: self.modes.shape[0]] = self.modes
            self.modes = grown
        cached = self.modes[rows]
        known = ~torch.isnan(cached).any(dim=1)
        if not known.any():
            return point, False
        candidates = torch.stack([point, torch.where(known[:, None], cached, point)], 1)
        values = latent_log_joint(x, candidates, decoder, noise_variance)
        values = torch.nan_to_num(values, nan=-math.inf)
        best = candidates[torch.arange(len(rows)), values.argmax(dim=1)]
        return best, bool(known.all())

    def store(self, rows, modes) -> None:
        self.modes[rows] = modes


class AdaptiveEstimate:
    """Per-row adaptive estimate of ``log p(x)`` for training, with a mode cache.

    The proposal is built without gradients and held fixed: p(x) = E_q[p(x,
    z) / q(z)] for any fixed q, so the estimate's gradient is the
    likelihood's, whatever the mode search converged to.  A row seen in an
    earlier epoch starts from the better of its cached mode and its best
    prior node, and takes fewer Gauss-Newton steps.
    """

    def __init__(self, sampler: AdaptiveNodeSampler) -> None:
        self.sampler = sampler
        self.modes = ModeCache()

    def log_marginal(self, model, batch, start, rows) -> torch.Tensor:
        noise = model.noise()
        point, mean, covariance = start
        n_steps = ADAPTIVE_TRAIN_NEWTON_STEPS
        if rows is not None:
            with torch.no_grad():
                point, warm = self.modes.better_start(
                    batch, point, rows, model.decoder, noise.detach()
                )
            if warm:
                n_steps = ADAPTIVE_WARM_NEWTON_STEPS
        nodes, log_q, mode, _ = adapted_proposal(
            batch,
            model.decoder,
            noise.detach(),
            (point, mean, covariance),
            self.sampler.draw(),
            n_steps=n_steps,
        )
        if rows is not None:
            self.modes.store(rows, mode)
        log_w = importance_log_weights(batch, nodes, log_q, model.decoder, noise)
        return torch.logsumexp(log_w, dim=1)


class AdaptiveObjective(MLEObjective):
    """The adaptive estimate for every row, started from a fixed prior rule."""

    def __init__(self, start_rule, estimate: AdaptiveEstimate, **scoring) -> None:
        super().__init__(**scoring)
        self.start_rule = start_rule
        self.estimate = estimate

    @property
    def trains_adaptively(self) -> bool:
        return True

    def loss(self, model, batch, rows):
        nodes, log_weights = self.start_rule
        with torch.no_grad():
            g = model.decoder(nodes)
            start = prior_start(
                batch, nodes, g, log_weights, model.noise(), self.centre
            )
        return -self.estimate.log_marginal(model, batch, start, rows).mean()


class AutoObjective(PriorRuleObjective):
    """The prior rule, and the adaptive estimate for low-ESS rows once switched.

    The switch turns on when at least :data:`AUTO_SWITCH_FRACTION` of the
    validation rows have low ESS *and* the training rule's gradient on them
    is off by :data:`AUTO_SWITCH_GRADIENT_ERROR` (:meth:`rule_accuracy`); it
    turns off below half of either (hysteresis, so it does not flip at a
    threshold).  Each row's estimate is valid on its own, so mixing them row
    by row keeps the loss a sum of ``log p(x_i)`` estimates.  Without
    validation rows it never switches.  Once switched, the gradient is
    checked every :data:`AUTO_RECHECK_EPOCHS` epochs; in between only the
    fraction can switch it back.
    """

    def __init__(self, sampler, gradient, *, generator, **scoring) -> None:
        super().__init__(sampler, gradient, **scoring)
        self.generator = generator
        self.switched = False
        self.estimate: AdaptiveEstimate | None = None
        #: Epochs since the last :meth:`rule_accuracy` (counted in
        #: :meth:`end_epoch`: once per epoch, also when the epoch's scores
        #: are computed segment by segment).
        self.epochs_unchecked = AUTO_RECHECK_EPOCHS

    @property
    def trains_adaptively(self) -> bool:
        return self.switched

    def epoch_scores(self, model, rows, validation, train_objective) -> dict:
        """The epoch's scores and, whenever the fraction of low-ESS
        validation rows could change the switch, :meth:`rule_accuracy`'s
        (not in the L-BFGS polish, which scores through
        :meth:`validation_scores` and never switches)."""
        scores = super().epoch_scores(model, rows, validation, train_objective)
        fraction = scores.get("low_ess_fraction")
        threshold = AUTO_SWITCH_FRACTION / 2 if self.switched else AUTO_SWITCH_FRACTION
        due = not self.switched or self.epochs_unchecked >= AUTO_RECHECK_EPOCHS - 1
        if fraction is not None and fraction >= threshold and due:
            scores.update(self.rule_accuracy(model, validation))
        return scores

    def rule_accuracy(self, model, validation) -> dict:
        """The training rule against the adaptive estimate on the validation
        rows the switch would integrate adaptively (the first
        :data:`AUTO_CHECK_ROWS` of them), each row's search started from
        the validation rule's nodes.

        ``validation_rule_error``: mean ``|log p_rule(x) - log p_adaptive(x)|``
        per validation row (the other rows count zero);
        ``validation_gradient_error``: ``||grad_rule - grad_adaptive|| /
        ||grad_adaptive||`` of the checked rows' mean ``log p(x)`` over all
        trained parameters.
        """
        nodes, log_weights = (
            part.to(dtype=validation.dtype) for part in self.sampler.fixed_rule()
        )
        centre = self.centre
        with torch.enable_grad():
            g = model.decoder(nodes)
        with torch.no_grad():
            first = prior_rule_pass(
                validation,
                g.detach(),
                log_weights,
                model.noise(),
                with_ess=True,
                centre=centre,
            )
        switching = (first.ess < MIXED_ESS_THRESHOLD).nonzero().squeeze(1)
        x = validation[switching[:AUTO_CHECK_ROWS]]
        parameters = [p for p in model.parameters() if p.requires_grad]
        if not len(x) or not parameters:
            return {"validation_rule_error": 0.0, "validation_gradient_error": 0.0}
        with torch.no_grad():
            noise = model.noise()
            rule = self.validation_rule(model, x)
            start = prior_start(x, rule.nodes, rule.g, rule.log_weights, noise, centre)
            proposal = evaluation_normals(
                self.n_components,
                AUTO_CHECK_NODES,
                dtype=x.dtype,
                device=x.device,
            )
            z, log_q, *_ = adapted_proposal(x, model.decoder, noise, start, proposal)
        with torch.enable_grad():
            joint = pairwise_log_joint(x, g, log_weights, model.noise(), centre)
            by_rule = torch.logsumexp(joint, dim=1)
            by_proposal = torch.logsumexp(
                importance_log_weights(x, z, log_q, model.decoder, model.noise()),
                dim=1,
            )
            rule_gradient = _flat_gradient(by_rule.mean(), parameters)
            reference = _flat_gradient(by_proposal.mean(), parameters)
        value_error = torch.nan_to_num(
            (by_rule - by_proposal).detach().abs(), nan=math.inf
        )
        gradient_error = (rule_gradient - reference).norm() / reference.norm()
        return {
            "validation_rule_error": float(value_error.mean())
            * len(switching)
            / len(validation),
            "validation_gradient_error": float(
                torch.nan_to_num(gradient_error, nan=math.inf)
            ),
        }

    def end_epoch(self, entry: dict) -> None:
        fraction = entry.get("low_ess_fraction")
        if fraction is None:
            return
        error = entry.get("validation_gradient_error")
        self.epochs_unchecked = 0 if error is not None else self.epochs_unchecked + 1
        if not self.switched:
            self.switched = (
                fraction >= AUTO_SWITCH_FRACTION
                and error is not None
                and error >= AUTO_SWITCH_GRADIENT_ERROR
            )
        elif fraction < AUTO_SWITCH_FRACTION / 2 or (
            error is not None and error < AUTO_SWITCH_GRADIENT_ERROR / 2
        ):
            self.switched = False

    def loss(self, model, batch, rows):
        if not self.switched:
            return super().loss(model, batch, rows)
        nodes, log_weights = self.sampler.draw()
        g = model.decoder(nodes)
        noise = model.noise()
        joint = pairwise_log_joint(batch, g, log_weights, noise, self.centre)
        log_marginal = torch.logsumexp(joint, dim=1)
        with torch.no_grad():
            ess = effective_sample_size(joint - log_marginal[:, None])
            low = (ess < MIXED_ESS_THRESHOLD).nonzero().squeeze(1)
        if not len(low):
            return -log_marginal.mean()
        if self.estimate is None:
            self.estimate = AdaptiveEstimate(
                AdaptiveNodeSampler(
                    self.n_components,
                    ADAPTIVE_TRAIN_NODES,
                    generator=self.generator,
                    dtype=batch.dtype,
                    device=batch.device,
                )
            )
        start = prior_start(
            batch[low], nodes, g.detach(), log_weights, noise.detach(), self.centre
        )
        adaptive = self.estimate.log_marginal(
            model, batch[low], start, None if rows is None else rows[low]
        )
        return -log_marginal.index_put((low,), adaptive).mean()


def _flat_gradient(value: torch.Tensor, parameters) -> torch.Tensor:
    """The gradient of ``value`` with respect to ``parameters``, flattened
    (zeros for parameters it does not depend on)."""
    gradients = torch.autograd.grad(value, parameters, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).flatten()
            for g, p in zip(gradients, parameters, strict=True)
        ]
    )


def make_mle_objective(
    integration: str,
    *,
    n_components: int,
    n_nodes: int,
    n_eval_nodes: int,
    grid_half_width: float | None,
    gradient: str,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    centre: torch.Tensor | None = None,
) -> MLEObjective:
    """The objective for ``integration`` ("auto", "adaptive" or a prior rule).

    ``centre`` (the training mean, in the units trained in) centres the
    distance expansion of every prior-rule pass.
    """
    scoring = {
        "n_components": n_components,
        "validation_nodes": min(VALIDATION_NODE_FACTOR * n_nodes, n_eval_nodes),
        "centre": centre,
    }
    build = {"generator": generator, "dtype": dtype, "device": device}
    if integration == "adaptive":
        start_rule = prior_rule("auto", n_components, n_nodes, **build)
        sampler = AdaptiveNodeSampler(n_components, ADAPTIVE_TRAIN_NODES, **build)
        return AdaptiveObjective(start_rule, AdaptiveEstimate(sampler), **scoring)
    sampler = PriorNodeSampler(
        integration, n_components, n_nodes, half_width=grid_half_width, **build
    )
    if integration == "auto":
        return AutoObjective(sampler, gradient, generator=generator, **scoring)
    return PriorRuleObjective(sampler, gradient, **scoring)
