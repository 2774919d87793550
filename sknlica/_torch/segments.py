"""The conditional prior ``z | u ~ N(mu_u, diag lambda_u)``, by reparametrisation.

With a discrete auxiliary variable ``u`` (a segment), write ``z = mu_u +
lambda_u^(1/2) * eps`` with ``eps ~ N(0, I)``.  For the rows of one segment
the model is then the standard model of the rest of the engine with the
decoder ``eps -> g(mu_u + lambda_u^(1/2) * eps)``:

    p(x | u) = int N(x; g(mu_u + lambda_u^(1/2) eps), Psi) N(eps; 0, I) deps,

exactly (the change of variables has Jacobian ``prod lambda_u^(1/2)``,
which cancels between the prior density and ``dz``).  So every integration
rule, the adaptive small-noise rule, both gradients, the evaluation and the
VAE bounds apply unchanged, segment by segment, to a :func:`segment_view` of
the model; nodes over ``N(0, I)`` become nodes over ``N(mu_u, lambda_u)``
by the affine map, and a diagonal-Gaussian ``q(eps | x, u)`` is a
diagonal-Gaussian ``q(z | x, u)`` (the iVAE's KL term in closed form is the
KL between the standardised pair, which the map leaves unchanged).

:class:`SegmentedObjective` splits each minibatch by segment and trains the
inner objective on each segment's view; the fitted estimators evaluate
``log p(x | u)`` the same way, and ``log p(x)`` under the mixture of the
segment priors by a ``logsumexp`` over segments.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sknlica._torch.jacobians import decoder_jacobian
from sknlica._torch.polish import penalty_backward
from sknlica._torch.training import (
    TRAIN_SCORE,
    Objective,
    TrainingRows,
    WrappedObjective,
)
from sknlica._torch.vae_objectives import MONITOR_ROWS


class SegmentPrior(nn.Module):
    """Per-segment means and variances of ``z | u``, and the segments' weights.

    Parameters
    ----------
    counts : Tensor of shape (n_segments,)
        Training rows per segment: the weights ``pi_u`` of the marginal prior
        (the mixture of the segment priors) are ``counts / counts.sum()``.
    n_components : int
        Latent dimension.
    learn_means : bool
        Learn ``mu_u``; otherwise the means are fixed at zero (a buffer).
    """

    def __init__(self, counts, n_components, *, learn_means, dtype, device):
        super().__init__()
        shape = (len(counts), n_components)
        zeros = torch.zeros(shape, dtype=dtype, device=device)
        if learn_means:
            self.means = nn.Parameter(zeros.clone())
        else:
            self.register_buffer("means", zeros.clone())
        # Start at the standard prior: the unconditional model is a special
        # case, and the decoder's initialisation assumes unit-scale latents.
        self.log_variances = nn.Parameter(zeros.clone())
        weights = torch.as_tensor(counts, dtype=dtype, device=device)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))

    @property
    def n_segments(self) -> int:
        return self.means.shape[0]

    @property
    def variances(self) -> torch.Tensor:
        return torch.exp(self.log_variances)

    def shift_and_scale(self, segment: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``mu_u`` and ``lambda_u^(1/2)`` of one segment, shape ``(m,)`` each."""
        return self.means[segment], torch.exp(0.5 * self.log_variances[segment])

    def to_latent(self, eps: torch.Tensor, segment: int) -> torch.Tensor:
        """``z = mu_u + lambda_u^(1/2) * eps`` for standardised latents ``eps``."""
        shift, scale = self.shift_and_scale(segment)
        return shift + scale * eps


class ShiftedDecoder(nn.Module):
    """``eps -> g(mu_u + lambda_u^(1/2) * eps)``: one segment's decoder."""

    def __init__(self, decoder: nn.Module, prior: SegmentPrior, segment: int):
        super().__init__()
        self.decoder = decoder
        self.prior = prior
        self.segment = segment

    def forward(self, eps: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.prior.to_latent(eps, self.segment))

    def jacobian(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``g`` at ``eps`` ``(B, m)`` and its Jacobian in ``eps``: the
        decoder's at ``z``, times ``lambda_u^(1/2)`` (the chain rule through
        the affine map, so forward mode never runs through it)."""
        shift, scale = self.prior.shift_and_scale(self.segment)
        g, jacobian = decoder_jacobian(self.decoder, shift + scale * eps)
        return g, jacobian * scale


class MLESegmentView(nn.Module):
    """An ``MLEModel`` seen from one segment: the shifted decoder, the noise."""

    def __init__(self, model: nn.Module, segment: int):
        super().__init__()
        self.decoder = ShiftedDecoder(model.decoder, model.prior, segment)
        self.noise = model.noise


class VAESegmentView(nn.Module):
    """A ``VAEModel`` seen from one segment.

    The encoder reads ``x`` with the segment's one-hot code appended and
    returns the iVAE's ``q(z | x, u)``, in ``z`` (as the reference code's
    encoder does); :meth:`encode` standardises it to the posterior of
    ``eps`` the bounds use (a diagonal Gaussian stays one under the affine
    map), and :meth:`decode` maps ``eps`` through the segment's prior
    first.  In ``z`` the linear start's encoder (the linear model's
    posterior under the pooled prior) is close to every segment's
    posterior; in ``eps`` it was off by ``lambda_u^(-1/2)``, up to 100
    times, and one-epoch fits of small data from it fell below the Gaussian
    baseline (2 of 20; none in ``z``).
    """

    def __init__(self, model: nn.Module, segment: int):
        super().__init__()
        self.model = model
        self.segment = segment
        self.decoder = ShiftedDecoder(model.decoder, model.prior, segment)
        self.noise = model.noise

    @property
    def amortized(self) -> bool:
        return self.model.amortized

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = x.new_zeros((x.shape[0], self.model.prior.n_segments))
        code[:, self.segment] = 1.0
        mean, log_var = self.model.encode(torch.cat([x, code], dim=1))
        # The encoder speaks of z; the bounds of eps = (z - mu_u) / lambda_u^(1/2).
        shift, scale = self.model.prior.shift_and_scale(self.segment)
        return (mean - shift) / scale, log_var - 2 * torch.log(scale)

    def decode(self, eps: torch.Tensor):
        return self.model.decode(self.model.prior.to_latent(eps, self.segment))


def segment_view(model: nn.Module, segment: int) -> nn.Module:
    """The view of ``model`` (an ``MLEModel`` or ``VAEModel`` with a prior)
    on which the unconditional machinery computes ``log p(x | u = segment)``."""
    if hasattr(model, "encoder"):
        return VAESegmentView(model, segment)
    return MLESegmentView(model, segment)


def segment_positions(codes: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``(segment, positions)`` for each segment present in ``codes``."""
    return [
        (int(segment), (codes == segment).nonzero().squeeze(1))
        for segment in torch.unique(codes)
    ]


class SegmentedObjective(WrappedObjective):
    """An objective trained segment by segment on :func:`segment_view` s.

    The minibatch loss is the row-weighted mean of the inner loss on each
    segment's rows, so it stays minus the mean ``log p(x_i | u_i)`` (or its
    bound) over the batch; the per-epoch scores are the row-weighted means
    of the inner scores of each segment's rows.

    Parameters
    ----------
    objective : Objective
        The unconditional objective (its per-row state, such as cached
        modes, stays valid: a row's segment never changes).
    train_codes : Tensor of int64, shape (n_training_rows,)
        Segment of each training row, by position among the training rows.
    validation_codes : Tensor of int64 or None
        Segment of each validation row.
    """

    def __init__(self, objective: Objective, train_codes, validation_codes=None):
        super().__init__(objective)
        self.train_codes = train_codes
        self.validation_codes = validation_codes

    def loss(self, model, batch, rows):
        if rows is None:
            raise ValueError("Training with segments needs the rows' positions.")
        total = 0.0
        for segment, positions in segment_positions(self.train_codes[rows]):
            inner = self.objective.loss(
                segment_view(model, segment), batch[positions], rows[positions]
            )
            total = total + inner * len(positions)
        return total / batch.shape[0]

    def validation_scores(self, model, validation, refine: bool, centre=None) -> dict:
        """The inner objective's held-out scores (the MLE's), segment by
        segment on each segment's validation rows and view, row-weighted:
        the L-BFGS polish's monitor."""
        parts = [
            (
                self.objective.validation_scores(
                    segment_view(model, segment), validation[positions], refine, centre
                ),
                0,
                len(positions),
            )
            for segment, positions in segment_positions(self.validation_codes)
        ]
        return _combined_scores(parts, None)

    def epoch_scores(self, model, rows, validation, train_objective) -> dict:
        # The monitored training rows: evenly spaced, as many in all as the
        # VAE monitors without segments (the MLE's scores do not read them).
        stride = max(1, len(rows) // MONITOR_ROWS)
        monitored = torch.arange(0, len(rows), stride, device=rows.device)
        monitored_codes = self.train_codes[monitored]
        validation_groups = (
            {} if validation is None else dict(segment_positions(self.validation_codes))
        )
        monitored_groups = dict(segment_positions(monitored_codes))
        parts = []
        for segment in sorted(set(monitored_groups) | set(validation_groups)):
            positions = monitored_groups.get(segment, monitored[:0])
            sub_rows = rows.subset(monitored[positions])
            held = validation_groups.get(segment)
            scores = self.objective.epoch_scores(
                segment_view(model, segment),
                sub_rows,
                None if held is None else validation[held],
                train_objective,
            )
            parts.append((scores, len(positions), 0 if held is None else len(held)))
        return _combined_scores(parts, train_objective)


class SegmentedFrozen:
    """A frozen objective of the conditional model, summed over segments.

    One frozen objective of the unconditional machinery (the MLE's
    :class:`~sknlica._torch.polish.FrozenLikelihood`, the VAE's
    :class:`~sknlica._torch.vae_polish.FrozenBound`) per segment, on that
    segment's training rows and evaluated on its :func:`segment_view`; each
    divides by all the training rows, so the sum is minus the mean
    ``log p(x_i | u_i)`` (or its bound) that :func:`~sknlica._torch.polish.polish`
    minimises.  A row's frozen adaptive rule lives in its segment's part, in
    that segment's standardised latents.

    Parameters
    ----------
    rows : TrainingRows
        The training rows, with their segments as ``groups``.
    make_frozen : callable
        ``make_frozen(segment_rows, denominator=n)``: the frozen objective
        of one segment's rows, averaging over ``n`` rows.
    """

    def __init__(self, rows: TrainingRows, make_frozen) -> None:
        if rows.groups is None:
            raise ValueError("SegmentedFrozen needs rows with groups (segments).")
        self.parts = [
            (segment, make_frozen(rows.subset(positions), denominator=len(rows)))
            for segment, positions in segment_positions(rows.groups)
        ]

    @property
    def n_adaptive(self) -> int:
        """Rows with a frozen adaptive rule, over all segments."""
        return sum(part.n_adaptive for _, part in self.parts)

    def refresh(self, model) -> None:
        """Rebuild each segment's rules at its view of ``model``."""
        for segment, part in self.parts:
            part.refresh(segment_view(model, segment))

    def backward(self, model, penalty=None) -> float:
        """Minus the mean over all rows (plus ``penalty()``); its gradient is
        accumulated into the parameters' ``.grad``, the priors' included."""
        total = sum(
            part.backward(segment_view(model, segment)) for segment, part in self.parts
        )
        return total + penalty_backward(penalty)


def _combined_scores(parts, train_objective) -> dict:
    """Row-weighted means of per-segment scores: validation entries by the
    segments' validation rows, the others by their monitored rows."""
    combined: dict = {}
    keys = {key for scores, _, _ in parts for key in scores}
    for key in keys:
        validation_entry = key.startswith("validation") or key == "low_ess_fraction"
        pairs = [
            (scores[key], n_validation if validation_entry else n_monitored)
            for scores, n_monitored, n_validation in parts
            if key in scores
        ]
        # A segment without rows of a kind says nothing about that kind.
        pairs = [(value, weight) for value, weight in pairs if weight] or pairs
        values = [value for value, _ in pairs]
        if all(isinstance(value, bool) for value in values):
            combined[key] = any(values)
            continue
        total = sum(weight for _, weight in pairs)
        combined[key] = (
            sum(value * weight for value, weight in pairs) / total
            if total
            else math.nan
        )
    if train_objective is not None:
        combined.setdefault(TRAIN_SCORE, train_objective)
    return combined
