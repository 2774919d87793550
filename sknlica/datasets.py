"""Synthetic data for nonlinear ICA with Gaussian latents.

:func:`make_nonlinear_ica` reproduces the data-generating process of the
original report: Gaussian latents are pushed through one random affine layer
and an elementwise activation, and isotropic Gaussian noise is added on top.
:func:`make_nonstationary_ica` is the identifiable case of time-contrastive
learning and the iVAE: Gaussian sources whose variances (and optionally
means) change from segment to segment, mixed by a deep invertible network.
"""

from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
from scipy.special import erf, expit
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import (
    Interval,
    InvalidParameterError,
    StrOptions,
    validate_params,
)

__all__ = [
    "LayeredMixing",
    "NonlinearMixing",
    "make_nonlinear_ica",
    "make_nonstationary_ica",
]

# torch.nn.LeakyReLU's default negative slope, so numpy and torch agree.
_LEAKY_SLOPE = 0.01


def _relu(x):
    return np.maximum(x, 0.0)


def _leaky_relu(x):
    return np.where(x >= 0.0, x, _LEAKY_SLOPE * x)


def _gelu(x):
    # Exact erf form, as torch.nn.GELU(approximate="none").
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _identity(x):
    return x


_ACTIVATIONS = {
    "relu": _relu,
    "sigmoid": expit,
    "tanh": np.tanh,
    "leaky_relu": _leaky_relu,
    "gelu": _gelu,
    "identity": _identity,
}


def _torch_activation_module(name):
    """The torch module of activation ``name``: the table the networks use."""
    from sknlica._torch.networks import ACTIVATIONS

    return ACTIVATIONS[name]()


def _is_torch_tensor(obj):
    # If torch was never imported, obj cannot be a tensor: keeps torch lazy.
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


@dataclass(frozen=True, eq=False, repr=False)
class NonlinearMixing:
    """Noiseless nonlinear mixing ``Z -> act(Z @ weights.T + bias)``.

    This is the ground-truth decoder of :func:`make_nonlinear_ica`. It maps
    latents to the noiseless observations and can be used as an oracle decoder,
    both with numpy arrays and with (differentiable) torch tensors.

    Parameters
    ----------
    weights : array-like of shape (n_features, n_components)
        Mixing matrix ``W``. Stored as a read-only float64 copy.
    bias : array-like of shape (n_features,)
        Bias ``b`` added before the activation. Stored as a read-only float64
        copy.
    activation : {"relu", "sigmoid", "tanh", "leaky_relu", "gelu", "identity"}
        Elementwise activation. ``"leaky_relu"`` uses negative slope 0.01 and
        ``"gelu"`` the exact erf form, matching torch's defaults.
    noise_variance : float, default=0.0
        Variance of the isotropic Gaussian noise added to the mixing output in
        the data-generating process. Recorded for reference; ``__call__`` is
        always noiseless.

    Attributes
    ----------
    n_components : int
        Number of latent dimensions (columns of ``weights``).
    n_features : int
        Number of observed dimensions (rows of ``weights``).

    See Also
    --------
    make_nonlinear_ica : Sample data from this mixing.

    Examples
    --------
    >>> import numpy as np
    >>> from sknlica.datasets import NonlinearMixing
    >>> mixing = NonlinearMixing(
    ...     weights=np.array([[1.0, 0.0], [1.0, -1.0], [0.0, 2.0]]),
    ...     bias=np.zeros(3),
    ...     activation="relu",
    ... )
    >>> mixing
    NonlinearMixing(n_features=3, n_components=2, activation='relu', noise_variance=0.0)
    >>> mixing(np.array([[1.0, 2.0]]))
    array([[1., 0., 4.]])
    """

    weights: np.ndarray
    bias: np.ndarray
    activation: str
    noise_variance: float = 0.0

    def __post_init__(self):
        weights = np.array(self.weights, dtype=np.float64)
        bias = np.array(self.bias, dtype=np.float64)
        if weights.ndim != 2:
            raise ValueError(
                "Expected weights of shape (n_features, n_components), got an "
                f"array of shape {weights.shape}; pass a 2-D matrix."
            )
        if bias.shape != (weights.shape[0],):
            raise ValueError(
                f"Expected bias of shape ({weights.shape[0]},) to match the "
                f"{weights.shape[0]} rows of weights, got shape {bias.shape}; "
                "pass one bias per observed feature."
            )
        if not (np.isfinite(weights).all() and np.isfinite(bias).all()):
            raise ValueError(
                "Expected finite weights and bias, got NaN or infinite entries; "
                "replace them with finite numbers."
            )
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"Expected activation in {sorted(_ACTIVATIONS)}, got "
                f"{self.activation!r}; pick one of those names."
            )
        noise_variance = float(self.noise_variance)
        if not (np.isfinite(noise_variance) and noise_variance >= 0):
            raise ValueError(
                "Expected a finite noise_variance >= 0, got "
                f"{self.noise_variance!r}; pass 0 for noiseless data."
            )
        # Read-only so the frozen dataclass is frozen all the way down.
        weights.setflags(write=False)
        bias.setflags(write=False)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "noise_variance", noise_variance)

    @property
    def n_components(self) -> int:
        """Number of latent dimensions."""
        return self.weights.shape[1]

    @property
    def n_features(self) -> int:
        """Number of observed dimensions."""
        return self.weights.shape[0]

    def __repr__(self):
        return (
            f"{type(self).__name__}(n_features={self.n_features}, "
            f"n_components={self.n_components}, activation={self.activation!r}, "
            f"noise_variance={self.noise_variance!r})"
        )

    def __call__(self, Z):
        """Map latents to noiseless observations.

        Parameters
        ----------
        Z : array-like or torch.Tensor of shape (n_samples, n_components)
            Latent points. A torch tensor must have a floating dtype.

        Returns
        -------
        X : ndarray or torch.Tensor of shape (n_samples, n_features)
            ``act(Z @ weights.T + bias)``. A float64 ndarray for array-like
            input; for a tensor, a tensor of the same dtype and device computed
            with torch ops, so gradients flow back to ``Z``.

        Examples
        --------
        >>> import numpy as np
        >>> from sknlica.datasets import NonlinearMixing
        >>> mixing = NonlinearMixing(np.eye(2), np.ones(2), "identity")
        >>> mixing(np.array([[1.0, -1.0]]))
        array([[2., 0.]])
        """
        if _is_torch_tensor(Z):
            return self._call_torch(Z)
        Z = np.asarray(Z, dtype=np.float64)
        self._check_latent_shape(Z.shape)
        return _ACTIVATIONS[self.activation](Z @ self.weights.T + self.bias)

    def _call_torch(self, Z):
        import torch

        if not Z.is_floating_point():
            raise TypeError(
                f"Expected a floating-point tensor, got dtype {Z.dtype}; "
                "convert it with Z.double() or Z.float()."
            )
        self._check_latent_shape(tuple(Z.shape))
        # torch.tensor copies, which avoids torch's warning on read-only arrays.
        weights = torch.tensor(self.weights, dtype=Z.dtype, device=Z.device)
        bias = torch.tensor(self.bias, dtype=Z.dtype, device=Z.device)
        return _torch_activation_module(self.activation)(Z @ weights.T + bias)

    def _check_latent_shape(self, shape):
        if len(shape) != 2 or shape[1] != self.n_components:
            raise ValueError(
                f"Expected latents of shape (n_samples, {self.n_components}), got "
                f"shape {shape}; pass a 2-D array with one column per latent "
                "(use Z.reshape(-1, 1) for a single latent)."
            )

    def to_torch_module(self, dtype=None, device=None):
        """Return an equivalent ``torch.nn.Module``.

        The module is ``nn.Sequential(nn.Linear(n_components, n_features),
        activation)`` with this mixing's weights and bias copied in. Useful as
        an oracle decoder.

        Parameters
        ----------
        dtype : torch.dtype, default=None
            Parameter dtype; ``None`` means ``torch.float64``.
        device : torch.device or str, default=None
            Parameter device; ``None`` means torch's default device.

        Returns
        -------
        module : torch.nn.Sequential
            Module mapping ``(n_samples, n_components)`` tensors to
            ``(n_samples, n_features)`` tensors. Its parameters require grad as
            usual; call ``module.requires_grad_(False)`` to freeze them.

        Examples
        --------
        >>> import numpy as np
        >>> import torch
        >>> from sknlica.datasets import NonlinearMixing
        >>> mixing = NonlinearMixing(np.eye(2), np.zeros(2), "tanh")
        >>> module = mixing.to_torch_module()
        >>> module
        Sequential(
          (0): Linear(in_features=2, out_features=2, bias=True)
          (1): Tanh()
        )
        >>> module(torch.zeros(1, 2, dtype=torch.float64))
        tensor([[0., 0.]], dtype=torch.float64, grad_fn=<TanhBackward0>)
        """
        import torch
        from torch import nn

        dtype = torch.float64 if dtype is None else dtype
        device = torch.get_default_device() if device is None else device
        # skip_init avoids drawing a throw-away init from torch's global RNG.
        linear = nn.utils.skip_init(
            nn.Linear, self.n_components, self.n_features, dtype=dtype, device=device
        )
        with torch.no_grad():
            linear.weight.copy_(torch.tensor(self.weights, dtype=dtype))
            linear.bias.copy_(torch.tensor(self.bias, dtype=dtype))
        return nn.Sequential(linear, _torch_activation_module(self.activation))


def _check_range(value, name):
    """Validate a ``(low, high)`` tuple of finite reals with ``low <= high``."""
    ok = (
        len(value) == 2
        and all(isinstance(v, Real) and np.isfinite(v) for v in value)
        and value[0] <= value[1]
    )
    if not ok:
        raise InvalidParameterError(
            f"The {name!r} parameter of make_nonlinear_ica must be a (low, high) "
            f"tuple of finite reals with low <= high. Got {value!r} instead; "
            "pass e.g. (0.0, 1.0)."
        )
    return float(value[0]), float(value[1])


@validate_params(
    {
        "n_samples": [Interval(Integral, 1, None, closed="left")],
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "n_features": [Interval(Integral, 1, None, closed="left")],
        "activation": [StrOptions(set(_ACTIVATIONS))],
        "noise_variance": [Interval(Real, 0, None, closed="left")],
        "weight_range": [tuple],
        "bias_range": [tuple],
        "random_state": ["random_state"],
        "return_mixing": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def make_nonlinear_ica(
    n_samples: int = 1000,
    n_components: int = 2,
    n_features: int = 20,
    *,
    activation: str = "relu",
    noise_variance: float = 1.0,
    weight_range: tuple = (0.0, 3.0),
    bias_range: tuple = (0.0, 1.0),
    random_state=None,
    return_mixing: bool = False,
):
    """Generate data from a one-layer nonlinear ICA model with Gaussian latents.

    The data-generating process is::

        Z ~ N(0, I)                          shape (n_samples, n_components)
        W ~ Uniform[weight_range)            shape (n_features, n_components)
        b ~ Uniform[bias_range)              shape (n_features,)
        X = act(Z @ W.T + b) + sqrt(noise_variance) * N(0, I)

    Parameters
    ----------
    n_samples : int, default=1000
        Number of samples (rows).
    n_components : int, default=2
        Number of latent dimensions.
    n_features : int, default=20
        Number of observed dimensions.
    activation : {"relu", "sigmoid", "tanh", "leaky_relu", "gelu", \
"identity"}, default="relu"
        Elementwise activation. ``"leaky_relu"`` uses negative slope 0.01 and
        ``"gelu"`` the exact erf form, matching torch's defaults.
    noise_variance : float, default=1.0
        Variance of the isotropic Gaussian observation noise; 0 gives
        noiseless data, ``X == mixing(Z)``.
    weight_range : tuple of (float, float), default=(0.0, 3.0)
        ``(low, high)`` of the uniform distribution of the entries of ``W``.
        ``low == high`` gives constant weights.
    bias_range : tuple of (float, float), default=(0.0, 1.0)
        ``(low, high)`` of the uniform distribution of the entries of ``b``.
        Use ``(0.0, 0.0)`` for no bias.
    random_state : int, RandomState instance or None, default=None
        Seeds the generator. It is passed through
        :func:`sklearn.utils.check_random_state`, which draws one integer that
        seeds a single :class:`numpy.random.Generator`; ``W``, ``b``, ``Z`` and
        the noise are drawn from it in that order. Hence the same int gives
        identical arrays, and since the noise is drawn last, changing
        ``noise_variance`` leaves ``W``, ``b`` and ``Z`` unchanged. ``None``
        draws the seed from numpy's global RandomState, as in scikit-learn.
    return_mixing : bool, default=False
        If True, also return the ground-truth :class:`NonlinearMixing`.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
        Observations, float64.
    Z : ndarray of shape (n_samples, n_components)
        True latents, float64.
    mixing : NonlinearMixing
        The noiseless map ``Z -> act(Z @ W.T + b)``. Only returned if
        ``return_mixing=True``.

    See Also
    --------
    NonlinearMixing : The ground-truth decoder.

    Examples
    --------
    >>> from sknlica.datasets import make_nonlinear_ica
    >>> X, Z = make_nonlinear_ica(n_samples=100, n_components=2, n_features=5,
    ...                           random_state=0)
    >>> X.shape, Z.shape
    ((100, 5), (100, 2))
    >>> X, Z, mixing = make_nonlinear_ica(n_samples=100, noise_variance=0.0,
    ...                                   random_state=0, return_mixing=True)
    >>> bool((X == mixing(Z)).all())
    True
    """
    w_low, w_high = _check_range(weight_range, "weight_range")
    b_low, b_high = _check_range(bias_range, "bias_range")
    seed = check_random_state(random_state).randint(np.iinfo(np.int32).max)
    rng = np.random.default_rng(seed)

    # Documented draw order: W, b, Z, noise. Do not reorder.
    weights = rng.uniform(w_low, w_high, size=(n_features, n_components))
    bias = rng.uniform(b_low, b_high, size=n_features)
    Z = rng.standard_normal((n_samples, n_components))
    mixing = NonlinearMixing(weights, bias, activation, float(noise_variance))
    X = mixing(Z)
    if noise_variance > 0:
        X += np.sqrt(noise_variance) * rng.standard_normal((n_samples, n_features))

    if return_mixing:
        return X, Z, mixing
    return X, Z


#: Negative slope of the leaky ReLU between the layers of
#: :class:`LayeredMixing`, as in the TCL and iVAE experiments.
MIXING_LEAKY_SLOPE = 0.2


@dataclass(frozen=True, eq=False, repr=False)
class LayeredMixing:
    """Noiseless deep mixing: leaky ReLUs between random matrices.

    ``x = A_L f(A_(L-1) ... f(A_1 s))`` with ``f`` a leaky ReLU.  The
    ground-truth decoder of :func:`make_nonstationary_ica`: with square
    orthogonal (or full-column-rank) matrices and slope ``0.2`` it is
    invertible on its image.  Works on numpy arrays and (differentiably) on
    torch tensors, so it serves as an oracle decoder of
    :func:`sknlica.marginal_log_likelihood`.

    Parameters
    ----------
    matrices : tuple of ndarray
        ``A_1`` of shape ``(n_features, n_components)``, then square
        ``(n_features, n_features)`` matrices.
    negative_slope : float, default=0.2
        Slope of the leaky ReLU applied before every matrix but the first.
    noise_variance : float, default=0.0
        The noise variance of the data-generating process (for reference).

    Examples
    --------
    >>> import numpy as np
    >>> from sknlica.datasets import LayeredMixing
    >>> mixing = LayeredMixing((np.eye(2), -np.eye(2)))
    >>> mixing(np.array([[1.0, -1.0]]))
    array([[-1. ,  0.2]])
    """

    matrices: tuple
    negative_slope: float = MIXING_LEAKY_SLOPE
    noise_variance: float = 0.0

    def __post_init__(self):
        matrices = tuple(np.array(a, dtype=np.float64) for a in self.matrices)
        if not matrices or any(a.ndim != 2 for a in matrices):
            raise ValueError(
                "Expected a non-empty sequence of 2-D matrices, got shapes "
                f"{[np.shape(a) for a in self.matrices]}."
            )
        for before, after in zip(matrices[:-1], matrices[1:]):
            if after.shape[1] != before.shape[0]:
                raise ValueError(
                    f"Consecutive matrices do not chain: {before.shape} then "
                    f"{after.shape}; each matrix needs as many columns as the "
                    "previous one has rows."
                )
        for a in matrices:
            a.setflags(write=False)
        object.__setattr__(self, "matrices", matrices)

    @property
    def n_components(self) -> int:
        """Number of sources (columns of the first matrix)."""
        return self.matrices[0].shape[1]

    @property
    def n_features(self) -> int:
        """Number of observed dimensions (rows of the last matrix)."""
        return self.matrices[-1].shape[0]

    def __repr__(self):
        return (
            f"{type(self).__name__}(n_features={self.n_features}, "
            f"n_components={self.n_components}, n_layers={len(self.matrices)})"
        )

    def __call__(self, S):
        """Map sources ``S`` of shape ``(n_samples, n_components)`` to the
        noiseless observations (a tensor for a tensor, else float64)."""
        if _is_torch_tensor(S):
            import torch

            h = S @ torch.tensor(self.matrices[0].T, dtype=S.dtype, device=S.device)
            for a in self.matrices[1:]:
                h = torch.nn.functional.leaky_relu(h, self.negative_slope)
                h = h @ torch.tensor(a.T, dtype=S.dtype, device=S.device)
            return h
        h = np.asarray(S, dtype=np.float64) @ self.matrices[0].T
        for a in self.matrices[1:]:
            h = np.where(h >= 0, h, self.negative_slope * h) @ a.T
        return h


def _random_orthonormal(rng, n_rows, n_columns):
    """A matrix with orthonormal columns (Haar-distributed when square)."""
    q, r = np.linalg.qr(rng.standard_normal((n_rows, n_columns)))
    return q * np.sign(np.diag(r))


@validate_params(
    {
        "n_segments": [Interval(Integral, 1, None, closed="left")],
        "n_per_segment": [Interval(Integral, 1, None, closed="left")],
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "n_features": [Interval(Integral, 1, None, closed="left"), None],
        "n_layers": [Interval(Integral, 1, None, closed="left")],
        "noise_variance": [Interval(Real, 0, None, closed="left")],
        "source_means": ["boolean"],
        "random_state": ["random_state"],
        "return_mixing": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def make_nonstationary_ica(
    n_segments: int = 40,
    n_per_segment: int = 500,
    n_components: int = 5,
    n_features: int | None = None,
    *,
    n_layers: int = 2,
    noise_variance: float = 0.01,
    source_means: bool = False,
    random_state=None,
    return_mixing: bool = False,
):
    """Nonstationary Gaussian sources through a deep mixing: the identifiable case.

    The process of time-contrastive learning (Hyvarinen & Morioka, 2016) and
    of the iVAE (Khemakhem et al., 2020)::

        u = segment label, n_per_segment rows for each of n_segments
        s_k | u ~ N(m_k(u), v_k(u))      independently, k = 1..n_components
        x = A_L f(... A_2 f(A_1 s)) + sqrt(noise_variance) * N(0, I)

    with ``sqrt(v_k(u))`` uniform on [0.01, 3), ``m_k(u)`` zero or (with
    ``source_means=True``) uniform on [-3, 3), ``f`` the leaky ReLU of slope
    0.2 between the ``n_layers`` matrices, ``A_1`` with orthonormal columns
    (a random orthogonal matrix when square) and the others random
    orthogonal matrices.  ``n_layers=1`` is a linear mixing.

    Parameters
    ----------
    n_segments : int, default=40
        Number of segments (distinct values of the auxiliary variable).
    n_per_segment : int, default=500
        Rows per segment.
    n_components : int, default=5
        Number of sources.
    n_features : int, default=None
        Observed dimension, at least ``n_components``; ``None`` means
        ``n_components`` (the square case of the TCL and iVAE papers).
    n_layers : int, default=2
        Number of mixing matrices; ``n_layers - 1`` leaky ReLUs.
    noise_variance : float, default=0.01
        Variance of the isotropic observation noise.
    source_means : bool, default=False
        Give each segment nonzero source means as well as variances.
    random_state : int, RandomState instance or None, default=None
        Seeds everything; the draw order is: the source scales, the means
        (if any), the mixing matrices, the sources, the noise.
    return_mixing : bool, default=False
        Also return the ground truth: the :class:`LayeredMixing` and the
        per-segment source means and variances.

    Returns
    -------
    X : ndarray of shape (n_segments * n_per_segment, n_features)
        Observations, segment by segment.
    u : ndarray of shape (n_segments * n_per_segment,)
        Segment label of each row (0, 1, ...).
    S : ndarray of shape (n_segments * n_per_segment, n_components)
        The true sources.
    mixing : LayeredMixing
        Only with ``return_mixing=True``.
    segment_means, segment_variances : ndarray of shape (n_segments, n_components)
        ``m(u)`` and ``v(u)``; only with ``return_mixing=True``.

    Examples
    --------
    >>> from sknlica.datasets import make_nonstationary_ica
    >>> X, u, S = make_nonstationary_ica(4, 50, 3, random_state=0)
    >>> X.shape, u.shape, S.shape
    ((200, 3), (200,), (200, 3))
    """
    n_features = n_components if n_features is None else n_features
    if n_features < n_components:
        raise ValueError(
            f"n_features={n_features} is below n_components={n_components}: the "
            "mixing would not be invertible. Pass n_features >= n_components."
        )
    seed = check_random_state(random_state).randint(np.iinfo(np.int32).max)
    rng = np.random.default_rng(seed)
    # Documented draw order: scales, means, matrices, sources, noise.
    scales = rng.uniform(0.01, 3.0, size=(n_segments, n_components))
    means = (
        rng.uniform(-3.0, 3.0, size=(n_segments, n_components))
        if source_means
        else np.zeros((n_segments, n_components))
    )
    matrices = [_random_orthonormal(rng, n_features, n_components)]
    matrices += [
        _random_orthonormal(rng, n_features, n_features) for _ in range(n_layers - 1)
    ]
    mixing = LayeredMixing(tuple(matrices), noise_variance=float(noise_variance))
    u = np.repeat(np.arange(n_segments), n_per_segment)
    S = means[u] + scales[u] * rng.standard_normal((len(u), n_components))
    X = mixing(S)
    if noise_variance > 0:
        X += np.sqrt(noise_variance) * rng.standard_normal(X.shape)
    if return_mixing:
        return X, u, S, mixing, means, scales**2
    return X, u, S
