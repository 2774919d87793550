"""``log p(x)``, ``E[z | x]`` and posterior draws of a fitted decoder, row by row.

Every row is first integrated over one fixed prior rule (the ``"auto"``
rule with a fixed seed, whatever trained the model), shared by all rows.
Rows whose posterior weights there have an effective sample size below
:data:`ESS_THRESHOLD` (:data:`HIGH_DIMENSION_ESS_THRESHOLD` from three
latents) -- the prior rule would be inaccurate for them, as at small noise --
are evaluated again by the posterior-adapted rule of
``adaptive.py``, started from their best prior node.  The choice is made per
row, so a row's result never depends on the other rows passed.

Both estimators score through :func:`evaluate`: a VAE passes its encoder's
``q(z | x)`` as well, which joins the adaptive rule's defensive mixture and
may start its mode search (see ``adaptive.ENCODER_COMPONENT_FRACTIONS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from sknlica._torch.adaptive import (
    COMPONENT_FRACTIONS,
    AdaptiveEstimate,
    EncoderProposal,
    ProposalNormals,
    ProposalStart,
    adaptive_chunked,
    adaptive_resample,
    find_mode,
    prior_start,
    proposal_fractions,
    proposal_normals,
)
from sknlica._torch.chunks import DECODE_NODES, PAIRWISE_ELEMENTS, chunk_rows
from sknlica._torch.gaussian import latent_log_joint, pairwise_log_joint_parts
from sknlica._torch.integration import (
    auto_rule,
    evaluation_generator,
    grid_box_log_mass,
    prior_rule,
)
from sknlica._torch.likelihood import prior_rule_pass

#: Rows whose posterior weights over the prior evaluation nodes have an
#: effective sample size below this switch to the adaptive rule.  Measured on
#: the report's relu and tanh generators (m = 2, n = 10, sigma 0.1-1, the
#: 16,384-node grid): every row with ESS >= 30 had |error| <= 0.014 nats
#: (mean <= 0.01); the rows with errors up to 3 nats all had ESS < 30.
ESS_THRESHOLD = 30.0

#: The threshold for ``m >= 3`` latents.  Measured on wine (m = 5, diagonal
#: noise, the MLE; 36 held-out rows against ``benchmarks/_honesty.py``): the
#: rows the 16,384-node prior rule kept with ESS 30-100 were up to 0.26 nats
#: low and -0.021 nats/row on average; refining below 100: 0.15 at worst,
#: +0.002 on average.  At m = 2 (the report's generator, sigma^2 = 1) it
#: changed scores by 1e-4 nats/row for 1.5x the scoring time, so m <= 2 keeps
#: :data:`ESS_THRESHOLD`.  (QMC points cover a posterior less evenly as m
#: grows, so the same ESS leaves a larger bias.)
HIGH_DIMENSION_ESS_THRESHOLD = 100.0


def ess_threshold_for(n_components: int) -> float:
    """The ESS below which a row of a model with ``n_components`` latents is
    refined: :data:`ESS_THRESHOLD`, or :data:`HIGH_DIMENSION_ESS_THRESHOLD`
    for three latents or more."""
    return ESS_THRESHOLD if n_components <= 2 else HIGH_DIMENSION_ESS_THRESHOLD


#: A row is refined when its posterior weights put more than this on the
#: prior rule's outer layer (:func:`outer_nodes`), whatever its ESS: its
#: posterior runs past the grid's box, which truncates it.  Measured on a
#: linear-Gaussian model with a closed form (m = 3, n = 6, sigma^2 = 1,
#: 20,000 rows; the 16,384-node rule is a 25^3 grid ending at |z| = 2.88),
#: without this check 18 rows were refined and the posterior means were off
#: by up to 0.47 (``log p(x)`` by up to 0.94 nats) on the 7% of rows with
#: more than 0.03 of their weight there; refining above 0.02 (11% of the
#: rows) left 0.035 and 0.018 at worst, above 0.01 (19%) 0.016 and 0.016;
#: scoring the 20,000 rows took 3.9 s instead of 2.3 s
#: (``benchmarks/bench_evaluation_edge.py``).  At m = 2 the evaluation grid
#: reaches |z| = 6.8 and no row of the report's settings is affected.
EDGE_WEIGHT = 0.02


def outer_nodes(nodes: torch.Tensor) -> torch.Tensor:
    """Boolean mask of a grid's outer layer: the nodes farthest out in the
    max-norm (to a relative 1e-6: the two ends of an axis can differ in the
    last bits, in float32 too; the next layer lies a grid spacing inside)."""
    reach = nodes.abs().amax(dim=1)
    return reach >= reach.max() * (1 - 1e-6)


#: Nodes of the shared prior rule of every fitted model's score (the MLE's
#: ``n_eval_nodes`` default; the VAE always uses it).
EVALUATION_NODES = 16384

#: Mode searches per low-ESS row (:func:`~sknlica._torch.adaptive.spread_best_nodes`),
#: one Laplace component at each mode.  Measured on breast_cancer, m = 5:
#: one row's best prior node led to a mode 3.4 nats below the best one
#: (reached from its 9th best node), and the score missed 2.3 nats.
EVALUATION_STARTS = 4

#: Proposal nodes per row when the adaptive rule evaluates a row; 1,024 met
#: the 0.01 nats target in tests/test_adaptive.py, 2x for margin.
ADAPTIVE_EVAL_NODES = 2048

#: A row whose adaptive estimate rests on fewer effective proposal nodes
#: than this is evaluated once more, from :data:`RETRY_STARTS` mode searches
#: with :data:`RETRY_NODE_FACTOR` times the nodes: a low ESS means the
#: mixture missed or misweighted part of the posterior (multimodal at m = 5
#: on real data).  Measured on digits (m = 5, diagonal noise, the MLE; 360
#: held-out rows against ``benchmarks/_honesty.py``): without the retry the
#: rows 0.7-3.8 nats off all had ESS < 30, every row with ESS >= 100 was
#: within 0.13, and the mean error was -0.037 nats/row; retrying below 50
#: (83 rows) gave -0.013, below 100 (204 rows) -0.007, the worst row 0.42
#: both times (one the reference itself moved by 0.38 between seeds), for
#: 1.7x the scoring time.  At small noise on the report's generator
#: (unimodal posteriors, sigma^2 = 0.018) the lowest ESS was 317: no row
#: retries.
RETRY_ESS = 100.0
RETRY_STARTS = 8
RETRY_NODE_FACTOR = 4


def decode_nodes(
    decoder: Callable, nodes: torch.Tensor, *, chunk: int = DECODE_NODES
) -> torch.Tensor:
    """Apply ``decoder`` to ``nodes`` in chunks; accept torch or numpy outputs."""
    # A module runs in its own dtype (a float32 fit's decoder_ takes float32).
    param = (
        next(decoder.parameters(), None)
        if isinstance(decoder, torch.nn.Module)
        else None
    )
    inputs = nodes if param is None else nodes.to(dtype=param.dtype)
    outputs = []
    for start in range(0, nodes.shape[0], chunk):
        out = decoder(inputs[start : start + chunk])
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(np.asarray(out))
        outputs.append(out.to(dtype=nodes.dtype, device=nodes.device))
    return torch.cat(outputs)


class DecodedRule(NamedTuple):
    """A prior rule's nodes, log-weights and the decoder's means at the nodes."""

    nodes: torch.Tensor
    log_weights: torch.Tensor
    g: torch.Tensor
    #: For a grid, the mask of the nodes on its box's outer layer
    #: (:func:`outer_nodes`), which :func:`evaluate` checks; ``None``: no box.
    edge: torch.Tensor | None = None


@torch.no_grad()
def decoded_evaluation_rule(
    decoder: Callable,
    n_components: int,
    n_nodes: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> DecodedRule:
    """The fixed ``"auto"`` rule of ``n_nodes`` nodes, decoded once.

    A grid's weights sum to the prior's mass in its box
    (:func:`~sknlica._torch.integration.grid_box_log_mass`), not to one:
    renormalised, the grid overestimated every row whose posterior lies
    inside the box by the mass it misses (0.008 nats at m = 3, 16,384
    nodes), and the rows it truncates are refined (:data:`EDGE_WEIGHT`).
    """
    nodes, log_weights = prior_rule(
        "auto",
        n_components,
        n_nodes,
        generator=evaluation_generator(),
        dtype=dtype,
        device=device,
    )
    edge = None
    if auto_rule(n_components, n_nodes) == "grid":
        log_weights = log_weights + grid_box_log_mass(n_components, n_nodes)
        edge = outer_nodes(nodes)
    return DecodedRule(nodes, log_weights, decode_nodes(decoder, nodes), edge)


def evaluation_normals(
    n_components: int,
    n_nodes: int,
    *,
    dtype: torch.dtype,
    device,
    generator: torch.Generator | None = None,
    fractions: tuple[float, ...] = COMPONENT_FRACTIONS,
) -> ProposalNormals:
    """The adaptive rule's proposal normals (fixed seed by default) and counts."""
    normals, counts = proposal_normals(
        n_components,
        n_nodes,
        fractions=fractions,
        generator=generator or evaluation_generator(),
    )
    return ProposalNormals(normals.to(dtype=dtype, device=device), counts)


class Evaluation(NamedTuple):
    """Per-row results of :func:`evaluate`."""

    #: ``log p(x_i)``, shape ``(B,)``.
    log_marginal: torch.Tensor
    #: ``E[z | x_i]``, shape ``(B, m)``; ``None`` unless asked for.
    posterior_mean: torch.Tensor | None
    #: ESS of each row's posterior weights over the prior rule, shape ``(B,)``.
    ess: torch.Tensor
    #: Rows below the ESS threshold, or whose encoder claims more mass
    #: than the prior rule found (evaluated adaptively when refined).
    low_ess: torch.Tensor
    #: :func:`~sknlica._torch.adaptive.prior_start` of the ``low_ess`` rows.
    start: ProposalStart


@torch.no_grad()
def evaluate(
    x: torch.Tensor,
    rule: DecodedRule,
    decoder: Callable,
    noise_variance: torch.Tensor,
    *,
    with_mean: bool = True,
    refine: bool = True,
    n_adaptive_nodes: int = ADAPTIVE_EVAL_NODES,
    ess_threshold: float | None = None,
    generator: torch.Generator | None = None,
    centre: torch.Tensor | None = None,
    encoder: EncoderProposal | None = None,
    check_modes: bool = True,
    check_edge: bool = True,
    retry_ess: float = RETRY_ESS,
) -> Evaluation:
    """Per-row ``log p(x)`` (and ``E[z | x]``), refining low-ESS rows adaptively.

    Rows whose ESS is below ``ess_threshold`` (``math.inf``: every row;
    ``None``: :func:`ess_threshold_for` the rule's dimension) are flagged
    and, unless ``refine=False``, evaluated again by the adaptive rule with
    ``n_adaptive_nodes`` proposal nodes per row, drawn from
    ``generator`` (a fixed seed by default).  ``encoder`` (each row's
    amortised posterior, shape ``(B, m)`` each) joins that rule's mixture, and
    its mean starts one more mode search.  A row at or above the ESS
    threshold is refined too when a Gaussian approximation claims more mass
    than the prior rule found (by :data:`MASS_MARGIN`): the
    encoder's, or without one (and ``check_modes``) the Laplace
    approximation at the mode reached from the row's best node; and (given
    ``check_edge`` and a grid rule) when its posterior weights put more
    than :data:`EDGE_WEIGHT` on the grid's outer layer.  A refined
    row whose importance weights have an ESS below ``retry_ess`` (``0``:
    never) is evaluated again with :data:`RETRY_STARTS` mode searches and
    :data:`RETRY_NODE_FACTOR` times the nodes (multimodal posteriors).
    """
    nodes, log_weights, g, edge = rule
    first_pass = prior_rule_pass(
        x,
        g,
        log_weights,
        noise_variance,
        nodes=nodes if with_mean else None,
        with_ess=True,
        with_best=encoder is None and check_modes,
        edge=edge if check_edge else None,
        centre=centre,
    )
    log_marginal, mean, ess, best, edge_weight = first_pass
    if ess_threshold is None:
        ess_threshold = ess_threshold_for(nodes.shape[1])
    low_ess = ess < ess_threshold
    if edge_weight is not None:
        low_ess |= edge_weight > EDGE_WEIGHT
    if encoder is not None:
        encoder = _finite_encoder(encoder)
        low_ess |= _encoder_sees_more(x, decoder, noise_variance, encoder, log_marginal)
    elif check_modes:
        high = (~low_ess).nonzero().squeeze(1)
        low_ess[high] = _mode_sees_more(
            x[high], nodes[best[high]], decoder, noise_variance, log_marginal[high]
        )
    rows = low_ess.nonzero().squeeze(1)
    start, row_encoder = _adaptive_starts(
        x, rows, rule, noise_variance, centre, encoder, EVALUATION_STARTS
    )
    if refine and len(rows):
        estimate = _adaptive_estimate(
            x[rows],
            decoder,
            noise_variance,
            start,
            n_adaptive_nodes,
            generator,
            row_encoder,
        )
        if retry_ess > 0:
            # A low ESS, or every search at a different mode (there may be
            # more).
            saturated = estimate.n_modes >= start.point.shape[1]
            retry = ((estimate.ess < retry_ess) | saturated).nonzero()[:, 0]
            if len(retry):
                retry_start, retry_encoder = _adaptive_starts(
                    x, rows[retry], rule, noise_variance, centre, encoder, RETRY_STARTS
                )
                retried = _adaptive_estimate(
                    x[rows[retry]],
                    decoder,
                    noise_variance,
                    retry_start,
                    RETRY_NODE_FACTOR * n_adaptive_nodes,
                    generator,
                    retry_encoder,
                )
                for part, retried_part in zip(estimate, retried, strict=True):
                    part[retry] = retried_part
        log_marginal[rows] = estimate.log_marginal
        if with_mean:
            # A row so far from the model that every proposal weight
            # underflows keeps its prior-rule posterior mean, which does not
            # need the row's (overflowing) norm.
            usable = torch.isfinite(estimate.posterior_mean).all(dim=1)
            mean[rows[usable]] = estimate.posterior_mean[usable]
    return Evaluation(log_marginal, mean, ess, low_ess, start)


def _adaptive_starts(x, rows, rule, noise_variance, centre, encoder, n_starts):
    """The mode-search starts of ``x[rows]`` (``n_starts`` spread best nodes,
    and the encoder's mean when there is one) and their encoder proposals."""
    start = _prior_starts(x[rows], rule, noise_variance, centre, n_starts)
    if encoder is None:
        return start, None
    encoder = EncoderProposal(*(part[rows] for part in encoder))
    # The encoder's mean is one more start of the mode search.
    points = torch.cat([start.point, encoder.mean[:, None, :]], dim=1)
    return start._replace(point=points), encoder


def _adaptive_estimate(
    x, decoder, noise_variance, start, n_nodes, generator, encoder
) -> AdaptiveEstimate:
    """:func:`~sknlica._torch.adaptive.adaptive_chunked` with the proposal
    normals for ``start``'s searches (and ``encoder``)."""
    proposal = evaluation_normals(
        start.point.shape[2],
        n_nodes,
        dtype=x.dtype,
        device=x.device,
        generator=generator,
        fractions=proposal_fractions(start.point.shape[1], encoder is not None),
    )
    return adaptive_chunked(
        x, decoder, noise_variance, start, proposal, encoder=encoder
    )


#: An encoder mean beyond this (in any latent) is an extrapolation, not a
#: posterior: the prior puts mass ``exp(-5e5)`` there, and decoding it can
#: overflow in float32 (rows near the float limit gave means of 1e36).
ENCODER_MEAN_LIMIT = 1e3


#: A row is refined when a Gaussian approximation's mass exceeds the prior
#: rule's ``log p(x)`` by more than this (nats), whatever its ESS: the
#: encoder's, ``log p(x, mu) + (m/2) log(2 pi) + sum log s``, or the Laplace
#: mass at the mode reached from the best node.  The ESS misses posteriors
#: that lie between or beyond the rule's nodes: on the overcomplete
#: conditional model (m = 3, n = 20, sigma^2 = 0.01) one held-out row had ESS
#: 30.3 over nodes far from its posterior, and the prior rule scored it 108
#: nats too low.
MASS_MARGIN = 1.0


#: Rows per chunk of the mass checks: a mode search holds a few ``(rows, n,
#: m)`` Jacobians and ``(rows, 6, n)`` candidates at a time.
MASS_CHECK_ROWS = 2048


def _gaussian_mass(x, points, decoder, noise_variance, half_log_det_covariance):
    """``log p(x, z) + (m/2) log(2 pi) + (1/2) log det C`` at ``points``: the
    mass a Gaussian of covariance ``C`` there claims for ``p(x)``."""
    joint = latent_log_joint(x, points[:, None, :], decoder, noise_variance)[:, 0]
    return (
        joint
        + 0.5 * points.shape[1] * math.log(2 * math.pi)
        + (half_log_det_covariance)
    )


def _encoder_sees_more(x, decoder, noise_variance, encoder, log_marginal):
    """Rows where the encoder's Gaussian claims more mass than the rule found."""
    flags = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for first in range(0, len(x), MASS_CHECK_ROWS):
        chunk = slice(first, first + MASS_CHECK_ROWS)
        mass = _gaussian_mass(
            x[chunk],
            encoder.mean[chunk],
            decoder,
            noise_variance,
            torch.log(encoder.std[chunk]).sum(1),
        )
        flags[chunk] = mass > log_marginal[chunk] + MASS_MARGIN
    return flags


def _mode_sees_more(x, best_nodes, decoder, noise_variance, log_marginal):
    """Rows whose Laplace mass at the mode reached from their best prior node
    exceeds the prior rule's ``log p(x)`` by :data:`MASS_MARGIN`."""
    # Preallocated, filled chunk by chunk: see likelihood.prior_rule_pass.
    flags = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for first in range(0, len(x), MASS_CHECK_ROWS):
        chunk = slice(first, first + MASS_CHECK_ROWS)
        mode, precision = find_mode(
            x[chunk], decoder, noise_variance, best_nodes[chunk]
        )
        mass = _gaussian_mass(
            x[chunk], mode, decoder, noise_variance, -0.5 * torch.logdet(precision)
        )
        flags[chunk] = mass > log_marginal[chunk] + MASS_MARGIN
    return flags


def _finite_encoder(encoder: EncoderProposal) -> EncoderProposal:
    """The prior ``N(0, I)`` in place of the encoder's output on rows where it
    overflowed or extrapolated (:data:`ENCODER_MEAN_LIMIT`), so that every
    component of the mixture stays a density that can be decoded."""
    usable = (
        torch.isfinite(encoder.std)
        & (encoder.std > 0)
        & (encoder.mean.abs() <= ENCODER_MEAN_LIMIT)
    ).all(1, keepdim=True)
    return EncoderProposal(
        torch.where(usable, encoder.mean, 0.0), torch.where(usable, encoder.std, 1.0)
    )


def _prior_starts(
    x, rule: DecodedRule, noise_variance, centre, n_points: int
) -> ProposalStart:
    """:func:`prior_start` of every row with ``(B, n_points, m)`` points, in
    chunks into preallocated outputs."""
    nodes, log_weights, g, _ = rule
    m = nodes.shape[1]
    start = ProposalStart(
        x.new_empty((len(x), n_points, m)),
        x.new_empty((len(x), m)),
        x.new_empty((len(x), m, m)),
    )
    step = chunk_rows(g.shape[0], PAIRWISE_ELEMENTS)
    for first in range(0, len(x), step):
        chunk = slice(first, first + step)
        parts = prior_start(
            x[chunk], nodes, g, log_weights, noise_variance, centre, n_points
        )
        for out, part in zip(start, parts, strict=True):
            out[chunk] = part
    return start


@torch.no_grad()
def resample_posterior(
    x: torch.Tensor,
    rule: DecodedRule,
    decoder: Callable,
    noise_variance: torch.Tensor,
    n_samples: int,
    *,
    generator: torch.Generator,
    centre: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-resampled posterior draws ``(B, S, m)`` and their spread ``(B,)``.

    Each row resamples the prior rule's nodes by its posterior weights, or,
    for low-ESS rows, the adaptive rule's nodes; the spread (mean posterior
    variance over the latent axes) is a natural MCMC step size.
    """
    nodes, log_weights, g, _ = rule
    z, spread = [], []
    # In row chunks: the rows x nodes weights are the largest temporary.
    for chunk in x.split(chunk_rows(g.shape[0], PAIRWISE_ELEMENTS)):
        cross, _ = pairwise_log_joint_parts(
            chunk, g, log_weights, noise_variance, centre
        )
        weights = torch.softmax(cross, 1)
        picks = torch.multinomial(
            weights, n_samples, replacement=True, generator=generator
        )
        z.append(nodes[picks])
        moments = weights @ nodes.square() - (weights @ nodes).square()
        spread.append(moments.mean(1))
    z, spread = torch.cat(z), torch.cat(spread)
    evaluation = evaluate(
        x, rule, decoder, noise_variance, with_mean=False, refine=False, centre=centre
    )
    if evaluation.low_ess.any():
        rows = evaluation.low_ess.nonzero().squeeze(1)
        proposal = evaluation_normals(
            nodes.shape[1],
            ADAPTIVE_EVAL_NODES,
            dtype=x.dtype,
            device=x.device,
            fractions=proposal_fractions(evaluation.start.point.shape[1]),
        )
        z[rows], spread[rows] = adaptive_resample(
            x[rows],
            decoder,
            noise_variance,
            evaluation.start,
            proposal,
            n_samples,
            generator=generator,
        )
    return z, spread
