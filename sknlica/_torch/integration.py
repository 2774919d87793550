"""Integration rules over the standard-normal prior: nodes and log-weights.

Every rule returns ``(nodes, log_weights)`` with ``nodes`` of shape
``(n_nodes, n_components)`` and ``log_weights`` of shape ``(n_nodes,)`` whose
exponentials sum to one, so that for any integrand ``h``

    E_{z ~ N(0, I)}[h(z)] ~= sum_j exp(log_weights[j]) * h(nodes[j]).

The weights are kept in log space throughout: Gauss-Hermite weights of a
100-point rule already span 1e-170 to 1e-1, and tensor products multiply them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.special import logsumexp

#: Half-width of the report's uniform grid, ``[-2.5, 2.5]^m``.
REPORT_GRID_HALF_WIDTH = 2.5

#: Default grid half-width is ``GRID_WIDTH_FACTOR * sqrt(k)`` for ``k`` nodes
#: per axis: wider boxes as the spacing shrinks, balancing truncation of the
#: prior's tails against discretisation.  Measured on the report's generators
#: (benchmarks/bench_integration_rules.py) the best half-width was about 2.5,
#: 3.5 and 4.5-5 at k = 16, 32 and 64; this rule tracks it.
GRID_WIDTH_FACTOR = 0.6

#: Nodes per axis from which the prior-weighted grid beats randomised QMC.
#: Measured (benchmarks/bench_integration_rules.py, relu to gelu, m = 1-3):
#: at 16+ per axis the grid is best or close to it (m=2, 256 nodes, relu: 0.047
#: vs 0.14 nats; m=3, 4,096 nodes: 0.068 vs 0.15); at ~8-10 per axis the two
#: are comparable or QMC wins (m=3, 1,000 nodes: 0.52 vs 0.36).
GRID_MIN_PER_AXIS = 16

#: Seed of every node set and draw used at evaluation (scores, transforms,
#: posterior samples' starts): fixed, so that evaluation is deterministic and
#: every row is evaluated on the same nodes (subset invariance).
EVALUATION_SEED = 0

Rule = tuple[torch.Tensor, torch.Tensor]


def nodes_per_axis(n_nodes: int, n_components: int) -> int:
    """Grid rules spend ``round(n_nodes ** (1 / m))`` nodes on each axis."""
    return max(1, round(n_nodes ** (1.0 / n_components)))


def check_grid_budget(name: str, n_components: int, n_nodes: int) -> None:
    """Refuse a tensor-product rule that would get one node per axis.

    With one node per axis every node sits at the same place along that
    axis, so the estimated likelihood does not depend on ``z`` there.
    ``"auto"`` never does this (it switches to QMC), so only an explicit
    ``"grid"`` or ``"gauss_hermite"`` is checked.
    """
    if name not in ("grid", "gauss_hermite"):
        return
    per_axis = nodes_per_axis(n_nodes, n_components)
    if per_axis < 2:
        raise ValueError(
            f"integration={name!r} with n_nodes={n_nodes} and n_components="
            f"{n_components} gets round(n_nodes ** (1 / n_components)) = "
            f"{per_axis} node per axis, so the estimated likelihood would not "
            f"depend on z. Pass n_nodes >= {2**n_components} (two nodes per "
            "axis), or integration='qmc' (or 'auto'), whose accuracy needs no "
            "per-axis count."
        )


def gauss_hermite_1d(order: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and log-weights of the ``order``-point Gauss-Hermite rule for N(0, 1).

    Nodes are the eigenvalues of the Jacobi matrix of the probabilists' Hermite
    polynomials (Golub-Welsch).  Weights come from the Christoffel function
    ``w_i = 1 / sum_{j<order} p_j(x_i)^2`` with ``p_j`` orthonormal, evaluated by
    the three-term recurrence with running rescaling, so they never underflow
    (plain ``hermegauss`` returns zeros beyond about 700 points).
    """
    if order == 1:
        return np.zeros(1), np.zeros(1)
    off_diagonal = np.sqrt(np.arange(1, order, dtype=np.float64))
    nodes = eigh_tridiagonal(np.zeros(order), off_diagonal, eigvals_only=True)
    previous = np.zeros_like(nodes)
    current = np.ones_like(nodes)
    sum_squares = np.ones_like(nodes)
    log_scale = np.zeros_like(nodes)  # current = p_j * exp(-log_scale)
    for j in range(order - 1):
        previous, current = current, (nodes * current - math.sqrt(j) * previous)
        current /= math.sqrt(j + 1)
        sum_squares += current**2
        big = np.abs(current) > 1e100
        if np.any(big):
            factor = np.where(big, np.abs(current), 1.0)
            current /= factor
            previous /= factor
            sum_squares /= factor**2
            log_scale += np.log(factor)
    log_weights = -(np.log(sum_squares) + 2 * log_scale)
    return nodes, log_weights - logsumexp(log_weights)


def _as_tensors(nodes: np.ndarray, log_weights: np.ndarray) -> Rule:
    return torch.from_numpy(nodes.copy()), torch.from_numpy(log_weights.copy())


def _tensor_product(axis_nodes: np.ndarray, axis_log_weights: np.ndarray, m: int):
    grids = np.meshgrid(*([axis_nodes] * m), indexing="ij")
    log_grids = np.meshgrid(*([axis_log_weights] * m), indexing="ij")
    nodes = np.stack([g.ravel() for g in grids], axis=1)
    log_weights = np.sum([g.ravel() for g in log_grids], axis=0)
    return nodes, log_weights - logsumexp(log_weights)


def gauss_hermite_rule(n_components: int, n_nodes: int, **_) -> Rule:
    """Tensor-product Gauss-Hermite rule with ``round(n_nodes**(1/m))`` per axis."""
    axis_nodes, axis_log_weights = gauss_hermite_1d(
        nodes_per_axis(n_nodes, n_components)
    )
    return _as_tensors(*_tensor_product(axis_nodes, axis_log_weights, n_components))


def default_half_width(per_axis: int) -> float:
    """Grid half-width used when none is given: ``0.6 * sqrt(k)``."""
    return GRID_WIDTH_FACTOR * math.sqrt(per_axis)


def auto_rule(n_components: int, n_nodes: int) -> str:
    """The rule ``"auto"`` resolves to: the most accurate per node we measured.

    Prior-weighted midpoint grids converge spectrally for smooth decoders and
    at second order across relu kinks, and beat scrambled Sobol points by 10
    to 100x at equal node counts once they have :data:`GRID_MIN_PER_AXIS`
    nodes per axis; with fewer (large ``m`` or small budgets) randomised QMC
    wins.
    """
    per_axis = nodes_per_axis(n_nodes, n_components)
    return "grid" if per_axis >= GRID_MIN_PER_AXIS else "qmc"


def grid_rule(
    n_components: int, n_nodes: int, *, half_width: float | None = None, **_
) -> Rule:
    """Uniform midpoint grid on ``[-l, l]^m`` with the prior density in the weights.

    The report averaged ``phi(x; f(z))`` over its grid with equal weights, i.e.
    it integrated against a *uniform* prior on the box.  Here each node carries
    the weight ``phi(z; 0, I)`` (normalised over the grid), which makes the rule
    a midpoint approximation of the Gaussian-prior integral truncated to the
    box.  ``half_width=None`` uses :func:`default_half_width`; the report's
    grid is ``half_width=2.5``.
    """
    k = nodes_per_axis(n_nodes, n_components)
    if half_width is None:
        half_width = default_half_width(k)
    axis_nodes = -half_width + (np.arange(k) + 0.5) * (2 * half_width / k)
    axis_log_weights = -0.5 * axis_nodes**2
    return _as_tensors(*_tensor_product(axis_nodes, axis_log_weights, n_components))


def grid_box_log_mass(
    n_components: int, n_nodes: int, half_width: float | None = None
) -> float:
    """``log P(z in [-l, l]^m)`` under ``N(0, I)`` for :func:`grid_rule`'s box.

    Added to the grid's log-weights (which sum to one: the prior truncated
    to the box), it turns the rule into a midpoint approximation of the
    Gaussian-prior integral over the box, without the truncation's
    renormalisation: accurate for a posterior inside the box, an
    underestimate for one the box cuts off.
    """
    if half_width is None:
        half_width = default_half_width(nodes_per_axis(n_nodes, n_components))
    return n_components * math.log(math.erf(half_width / math.sqrt(2.0)))


def monte_carlo_rule(
    n_components: int, n_nodes: int, *, generator: torch.Generator | None = None, **_
) -> Rule:
    """Independent draws from N(0, I), each weighted ``1 / n_nodes``."""
    nodes = torch.randn(n_nodes, n_components, generator=generator, dtype=torch.float64)
    return nodes, torch.full((n_nodes,), -math.log(n_nodes), dtype=torch.float64)


def sobol_uniforms(
    n_components: int, n_nodes: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Scrambled Sobol points in ``(0, 1)^m``, seeded from ``generator``."""
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    engine = torch.quasirandom.SobolEngine(n_components, scramble=True, seed=seed)
    return engine.draw(n_nodes, dtype=torch.float64)


def uniforms_to_normal(uniforms: torch.Tensor) -> torch.Tensor:
    """Map ``(0, 1)`` to N(0, 1) by the inverse CDF, away from the endpoints."""
    tiny = torch.finfo(torch.float64).eps
    return torch.special.ndtri(uniforms.clamp(tiny, 1 - tiny))


def qmc_rule(
    n_components: int, n_nodes: int, *, generator: torch.Generator | None = None, **_
) -> Rule:
    """Scrambled Sobol points through the normal inverse CDF, equal weights."""
    nodes = uniforms_to_normal(sobol_uniforms(n_components, n_nodes, generator))
    return nodes, torch.full((n_nodes,), -math.log(n_nodes), dtype=torch.float64)


RULES: dict[str, Callable[..., Rule]] = {
    "monte_carlo": monte_carlo_rule,
    "qmc": qmc_rule,
    "grid": grid_rule,
    "gauss_hermite": gauss_hermite_rule,
}


def evaluation_generator() -> torch.Generator:
    """A fresh generator seeded with :data:`EVALUATION_SEED`."""
    return torch.Generator().manual_seed(EVALUATION_SEED)


def prior_rule(
    name: str,
    n_components: int,
    n_nodes: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    half_width: float | None = None,
) -> Rule:
    """Nodes and log-weights of rule ``name`` (a key of :data:`RULES` or "auto")."""
    if name == "auto":
        name = auto_rule(n_components, n_nodes)
    nodes, log_weights = RULES[name](
        n_components, n_nodes, generator=generator, half_width=half_width
    )
    return nodes.to(dtype=dtype, device=device), log_weights.to(
        dtype=dtype, device=device
    )


class ShiftedSobol:
    """Scrambled Sobol points through the normal inverse CDF, shifted every draw.

    Each :meth:`draw` applies a fresh uniform random shift modulo 1
    (Cranley-Patterson rotation) before the inverse CDF: every draw is still
    a randomised QMC rule, unbiased for expectations under N(0, I), while a
    model trained on the draws cannot overfit one point set.
    """

    def __init__(
        self, n_components: int, n_nodes: int, generator: torch.Generator
    ) -> None:
        self.uniforms = sobol_uniforms(n_components, n_nodes, generator)
        self.generator = generator

    def draw(self) -> torch.Tensor:
        """Standard-normal points, shape ``(n_nodes, n_components)``, float64."""
        shift = torch.rand(
            self.uniforms.shape[1], generator=self.generator, dtype=torch.float64
        )
        return uniforms_to_normal(torch.remainder(self.uniforms + shift, 1.0))


class PriorNodeSampler:
    """Serve nodes for training: fixed for deterministic rules, fresh for random.

    ``"monte_carlo"`` redraws every step; ``"qmc"`` shifts one scrambled Sobol
    set every step (:class:`ShiftedSobol`); grid rules are deterministic.
    """

    def __init__(
        self,
        name: str,
        n_components: int,
        n_nodes: int,
        *,
        generator: torch.Generator,
        dtype: torch.dtype,
        device: torch.device | str,
        half_width: float | None = None,
    ) -> None:
        if name == "auto":
            name = auto_rule(n_components, n_nodes)
        self.name = name
        self.n_components = n_components
        self.n_nodes = n_nodes
        self.generator = generator
        self.dtype = dtype
        self.device = device
        self._sobol = (
            ShiftedSobol(n_components, n_nodes, generator) if name == "qmc" else None
        )
        self._fixed = (
            prior_rule(
                name,
                n_components,
                n_nodes,
                dtype=dtype,
                device=device,
                half_width=half_width,
            )
            if name in ("grid", "gauss_hermite")
            else None
        )

    def fixed_rule(self) -> Rule:
        """A fixed rule of the kind served: the rule itself for grid rules, a
        draw from the evaluation seed for random ones (the training
        generator is not touched)."""
        if self._fixed is not None:
            return self._fixed
        return prior_rule(
            self.name,
            self.n_components,
            self.n_nodes,
            generator=evaluation_generator(),
            dtype=self.dtype,
            device=self.device,
        )

    def draw(self) -> Rule:
        if self._fixed is not None:
            return self._fixed
        if self._sobol is not None:
            nodes = self._sobol.draw()
            log_weights = torch.full(
                (self.n_nodes,), -math.log(self.n_nodes), dtype=torch.float64
            )
        else:
            nodes, log_weights = monte_carlo_rule(
                self.n_components, self.n_nodes, generator=self.generator
            )
        return (
            nodes.to(dtype=self.dtype, device=self.device),
            log_weights.to(dtype=self.dtype, device=self.device),
        )
