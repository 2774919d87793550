"""Shared scikit-learn plumbing of the nonlinear ICA estimators.

:class:`BaseNonlinearICA` owns everything that does not depend on how
``log p(x)`` is approximated: the shared parameters (``__init__``, their
constraints and their documentation), validation, seeding, dtype and device,
ONE ``_fit`` behind ``fit`` and ``partial_fit`` (restarts, warm starts,
fault handling, ``history_``), warnings that point at the caller's line,
``score_samples``, ``transform``, ``sample``, ``inverse_transform`` and
pickling.  It holds no numerics: the training loop is
:func:`sknlica._torch.training.train`, and a subclass fills in named steps:
``_build_model``, ``_make_objective`` and ``_parameter_blocks`` for
training, ``_log_likelihood_and_mean`` for inference.  The conditional
prior (``prior="conditional"``) is handled here too, by training and
evaluating each segment's view of the model (``sknlica._torch.segments``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import os
import sys
import warnings
from abc import ABCMeta, abstractmethod
from dataclasses import replace
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_array, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from sknlica._linear_start import (
    LINEAR_START_ROWS,
    fit_linear_factor_model,
    fit_segment_linear_model,
)
from sknlica._torch.evaluation import EVALUATION_NODES, decoded_evaluation_rule
from sknlica._torch.gaussian import gaussian_log_density
from sknlica._torch.linear_start import (
    carries_linear_map,
    start_decoder,
    start_segment_prior,
)
from sknlica._torch.networks import ACTIVATIONS, NoiseVariance, make_mlp
from sknlica._torch.segments import (
    SegmentedObjective,
    SegmentPrior,
    segment_positions,
    segment_view,
)
from sknlica._torch.standardisation import Standardisation
from sknlica._torch.training import (
    PenalisedObjective,
    TrainingRows,
    TrainingRun,
    TrainingSettings,
    WeightPenalty,
    extend,
    make_optimizer,
    mean_feature_variance,
    state_to_cpu,
    train,
    training_tensor,
)

#: Noise-variance floor when sigma^2 is learned, relative to the mean feature
#: variance of the training data (absolute when the features are constant).
NOISE_VARIANCE_FLOOR = 1e-6

#: A fit whose best log-likelihood is more than this many nats per feature
#: below the Gaussian with the data's mean and variance (which every model
#: contains, and near which a fresh model starts when ``noise_variance`` is
#: left at ``None``) has blown up: measured with ``learning_rate_init`` 1,
#: 10 and 100 at 11, 1e5 and 1e9 nats per row below it on the report's
#: generator, against 0.1-0.2 per feature for an untrained model.  Only
#: checked when the noise variance is learned and starts at the default.
EXPLOSION_MARGIN = 1.0

#: The conditional prior's means and log-variances step at this multiple of
#: ``learning_rate_init``: on ``make_nonstationary_ica`` data (m = 3, n = 20,
#: 20 segments, seed 1) the VAE's held-out MCC after 60 epochs was 0.846 at
#: the decoder's step size (weak MCC 0.993: unmixed only up to a linear map).
PRIOR_LEARNING_RATE_FACTOR = 10.0

#: ``partial_fit`` call ``k`` seeds its generator with a draw from
#: ``random_state`` plus this times the epochs already trained, so every call
#: gets its own stream, reproducibly for an integer seed.
PARTIAL_FIT_SEED_STRIDE = 7919

_DIVERGENCE_ADVICE = (
    "Try a smaller learning_rate_init, float64 input, or (if you set it) a "
    "larger initial noise_variance."
)

#: Documentation of the decoder's parameters, inserted where a subclass
#: docstring says ``{decoder_parameters}``.
DECODER_PARAMETERS_DOC = """\
    n_components : int, default=2
        Latent dimension ``m``.
    hidden_layer_sizes : tuple of int, default=(64,)
        Hidden layers of the decoder MLP; ``()`` gives ``g(z) = act(W z + b)``.
    activation : str, default="relu"
        One of "relu", "tanh", "sigmoid", "leaky_relu", "gelu", "identity".
        Hidden-layer activation (of the decoder, and of the VAE's encoder).
    output_activation : str, default="identity"
        One of the ``activation`` names.
        Applied after the decoder's last linear layer.  With
        ``hidden_layer_sizes=()`` and ``output_activation="relu"`` the decoder
        family is exactly the report's data-generating process."""

#: Documentation of the noise variance's parameters, inserted where a
#: subclass docstring says ``{noise_parameters}``.
NOISE_PARAMETERS_DOC = """\
    noise : {"isotropic", "diagonal"}, default="isotropic"
        ``"isotropic"``: one noise variance ``sigma^2`` for all features, the
        report's model.  ``"diagonal"``: one variance per feature, ``x | z ~
        N(g(z), diag(psi))``, the nonlinear analogue of
        :class:`~sklearn.decomposition.FactorAnalysis` (isotropic is that of
        probabilistic PCA); for data whose features have different noise
        levels.
    noise_variance : float, default=None
        Initial (or, with ``learn_noise_variance=False``, fixed) ``sigma^2``,
        in the data's units (for every feature, with ``noise="diagonal"``).
        ``None`` starts at the linear model's noise where ``init`` starts
        there, else at the data's mean feature variance (with
        ``"diagonal"``, at each feature's variance): a model that explains
        nothing.  Both scale with the data, so that the fit does not depend
        on the data's units.
    learn_noise_variance : bool, default=True
        Learn ``sigma^2 = floor + exp(s)``; the floor is ``1e-6`` times the
        mean feature variance of the training data (with ``"diagonal"``,
        each feature's own variance)."""

#: Documentation of the latent prior's parameters, inserted where a subclass
#: docstring says ``{prior_parameters}``.
PRIOR_PARAMETERS_DOC = """\
    prior : {"standard", "conditional"}, default="standard"
        ``"standard"``: ``z ~ N(0, I)``, the report's model (``y`` is
        ignored).  ``"conditional"``: the identifiable model of nonlinear ICA
        with an auxiliary variable (a segment label, a condition), ``z_k | u
        ~ N(mu_k(u), lambda_k(u))`` independently, one learned mean and
        variance vector per distinct value of ``u``; ``fit(X, y)`` then
        needs ``y = u`` (any discrete labels), and ``transform``,
        ``score_samples``, ``score`` and ``sample`` take it too (without it
        they use the marginal prior, the mixture of the segment priors with
        the training rows' weights).  The segment priors start at ``N(0,
        I)`` and step at 10 times ``learning_rate_init``.  See the user
        guide's identifiability page.
    prior_means : bool, default=True
        With ``prior="conditional"``, learn the segment means ``mu(u)``;
        ``False`` fixes them at zero (only the variances change with ``u``,
        as in time-contrastive learning).  Ignored by the standard prior."""

#: Documentation of the conditional prior's fitted attributes, inserted where
#: a subclass docstring says ``{prior_attributes}``.
PRIOR_ATTRIBUTES_DOC = """\
    segments_ : ndarray of shape (n_segments,)
        With ``prior="conditional"``: the distinct values of ``y`` seen in
        ``fit``, sorted; row ``k`` of the next three belongs to
        ``segments_[k]``.
    prior_means_ : ndarray of shape (n_segments, n_components)
        With ``prior="conditional"``: the means ``mu(u)`` of ``z | u``.
    prior_variances_ : ndarray of shape (n_segments, n_components)
        With ``prior="conditional"``: the variances ``lambda(u)`` of ``z | u``.
    prior_weights_ : ndarray of shape (n_segments,)
        With ``prior="conditional"``: the fraction of training rows in each
        segment, the weights of the marginal prior."""

#: Documentation of the parameters of the training loop, inserted where a
#: subclass docstring says ``{shared_parameters}``.
SHARED_PARAMETERS_DOC = """\
    alpha : float, default=0.0
        Strength of the L2 penalty on the decoder's weights (not its
        biases), with :class:`~sklearn.neural_network.MLPRegressor`'s
        meaning: ``0.5 * alpha * ||W||^2 / n_samples`` is added to the mean
        per-row loss.  It acts in the standard units training runs in, so
        its effect does not depend on the data's units.
    batch_size : int, default=128
        Minibatch size (clipped to the number of training rows).
    max_iter : int, default=200
        Maximum number of epochs.
    tol : float, default=1e-3
        Improvement in nats per sample of the monitored score below which an
        epoch counts as no improvement.
    early_stopping : bool, default=True
        Hold out ``validation_fraction`` of the data, monitor its
        log-likelihood (as :meth:`score` estimates it), and keep the best
        epoch's model.  When ``False`` the training log-likelihood is
        monitored.
    validation_fraction : float, default=0.1
        Fraction of rows held out when ``early_stopping=True``.
    n_iter_no_change : int, default=10
        Epochs without improvement of more than ``tol`` before stopping; the
        learning rate halves after every half of that.
    ema_decay : float, default=0.998
        Decay of the exponential moving average of the parameters (Polyak
        averaging) that ``fit`` scores every epoch, selects and keeps; ``0``
        keeps the raw iterates.  The average spans about the last ``1 / (1 -
        ema_decay)`` minibatch steps (500), fewer early in training; it
        removes the optimiser's jitter, which grows as ``sigma^2`` shrinks
        (see the user guide).  ``partial_fit`` does not average.
    init : {"auto", "linear", "random", "vae"}, default="auto"
        Where training starts (``"vae"``: :class:`NonlinearICAMLE` only).
        ``"linear"``: at the best linear model, ``g(z) = L z + mu`` with
        the loadings, mean and noise of probabilistic PCA (``noise="isotropic"``) or
        :class:`~sklearn.decomposition.FactorAnalysis` (``"diagonal"``)
        fitted on the training rows (at most 10,000 of them), embedded in
        the MLP exactly (relu, leaky_relu, gelu, identity; tanh and sigmoid
        nearly linear), and for the VAE the encoder at that model's
        posterior; it needs ``2 * n_components`` units in every hidden
        layer.  With ``prior="conditional"`` the linear model is linear
        nonstationary ICA instead: the loadings that jointly diagonalise
        the segments' whitened covariances (the rotation the standard prior
        cannot see), each segment's latent means and variances, and the
        noise of probabilistic PCA (a tenth of the weakest direction's
        variance when ``n_features == n_components`` leaves none).
        Training then leaves the linear model only as far as the
        monitored score improves: on small real data sets this is what
        makes the nonlinear model beat factor analysis (see the user
        guide).  ``"random"``: PyTorch's initialisation.  ``"auto"``:
        ``"linear"`` with ``noise="diagonal"`` or ``prior="conditional"``
        where the hidden layers are wide enough (for the MLE with the
        conditional prior: ``"vae"``, whose VAE starts there), else
        ``"random"`` (on the report's generator, isotropic noise, the random
        start is 0.007 nats/sample closer to the true model).  Measured on
        the identifiability benchmark (seeds 0-4, 60 epochs), the conditional
        VAE from the linear start against three random starts screened:
        MCC 0.968 against 0.963 (m = n = 5), 0.843 against 0.734 (four
        mixing layers), in one fit (see the user guide).  ``"vae"``: the
        MLE starts at the decoder, noise and segment priors of a
        :class:`NonlinearICAVAE` with the same model parameters (decoder,
        noise, prior, ``alpha``, ``max_iter`` in epochs, ``device``; its own
        optimiser defaults, and its default ``max_iter`` with
        ``solver="lbfgs"``) fitted on the training rows, kept as ``init_``:
        one fit from its linear start, or, where the hidden layers are too
        narrow for it, the best of three random starts trained to the end
        (the MLE stays in the basin of the VAE it starts from).
        ``partial_fit`` never fits one.  With ``n_init > 1`` every restart
        starts at the same linear model (or VAE); they differ in the other
        hidden units and the order of the minibatches.
    n_init : int or "auto", default="auto"
        Number of initialisations; the best (highest monitored score) is
        kept.  ``"auto"``: for :class:`NonlinearICAVAE` with
        ``prior="conditional"`` from a random start (``init="random"``, or
        hidden layers too narrow for the linear start), whose fits of the
        same data can land in a worse basin (on the identifiability
        benchmark, m = n = 5, one seed in five reached MCC 0.73 against 0.96
        for the others, and the held-out score ranks such a fit last), three
        initialisations *screened*: each trains 20 epochs and only the best
        by the monitored score trains on (of 60 epochs, about 1.7 times the
        cost of one fit); else one.
        An integer trains every initialisation to the end.
    warm_start : bool, default=False
        Continue from the previous fit's parameters (with fresh optimiser
        state; schedules such as a KL warm-up continue rather than restart).
    device : {"cpu", "cuda", "auto"}, default="cpu"
        Where training runs.  ``"cuda"`` falls back to the CPU with a warning
        when no GPU is present; fitted modules are always stored on the CPU.
    n_threads : int, default=None
        Torch intra-op threads used inside ``fit``, ``partial_fit`` and every
        inference method, restored afterwards; ``None`` keeps torch's setting.
        In ``GridSearchCV(n_jobs=k)`` on ``c`` cores, ``n_threads=c // k``
        avoids oversubscription (see the user guide's performance page).
    verbose : int, default=0
        Show a progress bar with the current score.
    random_state : int, RandomState instance or None, default=None
        Seeds initialisation, shuffling, the validation split and every
        training draw through a private ``torch.Generator``; global RNGs are
        untouched.  Evaluation uses fixed nodes and draws, independent of it."""

#: Documentation of the fitted attributes every estimator shares, inserted
#: where a subclass docstring says ``{shared_attributes}``.
SHARED_ATTRIBUTES_DOC = """\
    n_iter_ : int
        Epochs run (by ``partial_fit``: calls made; with
        ``NonlinearICAMLE(solver="lbfgs")``: L-BFGS iterations).
    converged_ : bool
        Whether a stopping rule fired before the iteration budget ran out
        (that of the L-BFGS polish, when there was one).
    best_epoch_ : int
        Entry of ``history_`` (1-based) whose parameters were kept.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during fit, when ``X`` has string column names."""


_DOC_BLOCKS = {
    "decoder_parameters": DECODER_PARAMETERS_DOC,
    "noise_parameters": NOISE_PARAMETERS_DOC,
    "prior_parameters": PRIOR_PARAMETERS_DOC,
    "prior_attributes": PRIOR_ATTRIBUTES_DOC,
    "shared_parameters": SHARED_PARAMETERS_DOC,
    "shared_attributes": SHARED_ATTRIBUTES_DOC,
}


class TrainingDivergedError(FloatingPointError):
    """Training produced a non-finite loss; the best finite model was kept."""


_INTERNAL_PREFIXES = tuple(
    str(Path(module.__file__).resolve().parent) + os.sep
    for module in (sys.modules[__package__], sklearn)
)


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first frame outside sknlica and sklearn.

    A fixed ``stacklevel`` breaks whenever a decorator or a helper is added
    between the public method and the warning; the user's own line is the
    first frame that is neither ours nor scikit-learn's (``_fit_context``
    wraps ``fit``).
    """
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_PREFIXES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


@contextlib.contextmanager
def torch_threads(n_threads: int | None):
    """Run the block with ``n_threads`` torch intra-op threads, then restore.

    ``None`` leaves torch's setting alone.  The setting is process-wide, so
    concurrent estimators in *threads* of one process share it; processes
    (loky, Dask and Ray workers) each have their own.
    """
    if n_threads is None:
        yield
        return
    if not isinstance(n_threads, Integral) or n_threads < 1:
        raise ValueError(
            f"n_threads should be None or a positive integer, got {n_threads!r}."
        )
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def uses_torch_threads(method):
    """Decorate a public method so it runs under the estimator's ``n_threads``."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch_threads(getattr(self, "n_threads", None)):
            return method(self, *args, **kwargs)

    return wrapper


def check_count(name: str, value, least: int) -> None:
    """Raise a clear ``ValueError`` unless ``value`` is an integer >= ``least``."""
    if not isinstance(value, Integral) or value < least:
        raise ValueError(f"{name} should be an integer >= {least}, got {value!r}.")


def _partial_fit_applies(estimator) -> bool:
    # Restarts pick the best of several complete fits, which needs all the
    # data at once; incremental training has a single run.
    if getattr(estimator, "solver", None) == "lbfgs":
        raise AttributeError(
            "partial_fit is unavailable with solver='lbfgs' (full-batch "
            "iterations need all the data at once); use solver='adam' for "
            "incremental training."
        )
    if getattr(estimator, "prior", "standard") == "conditional":
        raise AttributeError(
            "partial_fit is unavailable with prior='conditional' (each row's "
            "segment and the segments' weights are fixed by fit); use fit."
        )
    if estimator._n_initialisations() != 1:
        raise AttributeError(
            "partial_fit is unavailable with n_init > 1 (restarts compare whole "
            "fits); set n_init=1 for incremental training."
        )
    return True


class BaseNonlinearICA(
    ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator, metaclass=ABCMeta
):
    """Common base of :class:`NonlinearICAMLE` and :class:`NonlinearICAVAE`.

    A subclass's ``__init__`` takes its own parameters plus ``**shared``,
    assigns its own and passes ``shared`` here; its signature is then
    completed with the shared parameters (``__init_subclass__``), so that
    ``get_params``, ``clone`` and the documentation see every parameter.
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "hidden_layer_sizes": ["array-like"],
        "activation": [StrOptions(set(ACTIVATIONS))],
        "output_activation": [StrOptions(set(ACTIVATIONS))],
        "noise": [StrOptions({"isotropic", "diagonal"})],
        "noise_variance": [Interval(Real, 0, None, closed="neither"), None],
        "learn_noise_variance": ["boolean"],
        "prior": [StrOptions({"standard", "conditional"})],
        "prior_means": ["boolean"],
        "solver": [StrOptions({"adam", "sgd"})],
        "learning_rate_init": [Interval(Real, 0, None, closed="neither")],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "noise_learning_rate": [Interval(Real, 0, None, closed="neither"), None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "ema_decay": [Interval(Real, 0, 1, closed="left")],
        "init": [StrOptions({"auto", "linear", "random"})],
        "n_init": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "warm_start": ["boolean"],
        "device": [StrOptions({"cpu", "cuda", "auto"})],
        "n_threads": [Interval(Integral, 1, None, closed="left"), None],
        "verbose": ["verbose"],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        n_components=2,
        *,
        hidden_layer_sizes=(64,),
        activation="relu",
        output_activation="identity",
        noise="isotropic",
        noise_variance=None,
        learn_noise_variance=True,
        prior="standard",
        prior_means=True,
        solver="adam",
        learning_rate_init=3e-3,
        noise_learning_rate=None,
        alpha=0.0,
        batch_size=128,
        max_iter=200,
        tol=1e-3,
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=10,
        ema_decay=0.998,
        init="auto",
        n_init="auto",
        warm_start=False,
        device="cpu",
        n_threads=None,
        verbose=0,
        random_state=None,
    ):
        self.n_components = n_components
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.output_activation = output_activation
        self.noise = noise
        self.noise_variance = noise_variance
        self.learn_noise_variance = learn_noise_variance
        self.prior = prior
        self.prior_means = prior_means
        self.solver = solver
        self.learning_rate_init = learning_rate_init
        self.noise_learning_rate = noise_learning_rate
        self.alpha = alpha
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.ema_decay = ema_decay
        self.init = init
        self.n_init = n_init
        self.warm_start = warm_start
        self.device = device
        self.n_threads = n_threads
        self.verbose = verbose
        self.random_state = random_state

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__.__signature__ = _merged_signature(cls.__init__)
        if cls.__doc__:
            for marker, text in _DOC_BLOCKS.items():
                cls.__doc__ = cls.__doc__.replace(f"    {{{marker}}}", text)

    #: Parameters that shape the trained model.  A warm start or a later
    #: ``partial_fit`` continues the fitted model, so it refuses a change of
    #: any of them; inference reads them from the fitted model, never from
    #: the current parameters (``set_params`` without a refit).
    _architecture_parameters: tuple[str, ...] = (
        "n_components",
        "hidden_layer_sizes",
        "activation",
        "output_activation",
        "noise",
        "learn_noise_variance",
        "prior",
        "prior_means",
    )

    # ------------------------------------------------------------------ hooks
    #: The trained module (a class from ``sknlica._torch.models``); its parts
    #: are stored as ``<part>_`` fitted attributes.
    _model_class: type[torch.nn.Module]

    @abstractmethod
    def _build_model(
        self,
        n_features,
        *,
        noise_variance,
        scale,
        dtype,
        device,
        generator,
        n_segments=0,
    ):
        """A fresh ``_model_class`` instance, in standard units: its noise
        variance starts at ``noise_variance`` with a floor relative to
        ``scale``, the data's mean feature variance; ``n_segments`` is the
        number of segments of a conditional prior (the base attaches the
        prior itself)."""

    @abstractmethod
    def _make_objective(self, model, *, n_features, centre, generator, dtype, device):
        """The :class:`~sknlica._torch.training.Objective` to train; ``centre``
        is the training mean in standard units."""

    @abstractmethod
    def _parameter_blocks(self, model) -> list[tuple[list, list]]:
        """``(parameters, noise_parameters)`` per optimiser, in stepping order."""

    def _store_extra(self, model) -> None:
        """Fitted attributes beyond the model's parts and ``noise_variance_``."""

    def _polish(
        self, run: TrainingRun, objective, rows, validation, *, generator, centre
    ):
        """A convergent phase after the epochs, updating ``run`` (none here);
        ``centre`` is the training mean in standard units."""

    @abstractmethod
    def _log_likelihood_and_mean(self, x: torch.Tensor, model, with_mean: bool):
        """``(log p(x), latent mean or None)`` of validated rows under
        ``model`` (the inference model, or a segment's view of it, whose
        latents are then the standardised ``eps``), as tensors."""

    def _n_evaluation_nodes(self) -> int:
        """Nodes of the prior rule that scores the fitted model."""
        return EVALUATION_NODES

    def _evaluation_parts(self, x: torch.Tensor, model):
        """``model``'s decoder (the inference model's, or a segment's view),
        sigma^2, the decoded evaluation rule and the centre of the distance
        expansion (the training mean: fitted state)."""
        decoder = model.decoder
        noise = torch.tensor(self.noise_variance_, dtype=x.dtype)
        rule = decoded_evaluation_rule(
            decoder,
            self._fitted_n_components,
            self._n_evaluation_nodes(),
            dtype=x.dtype,
        )
        centre = self._standardisation_.mean.to(x.dtype)
        return decoder, noise, rule, centre

    def _latent_mean(self, x: torch.Tensor, model) -> torch.Tensor:
        """The latent mean alone (what ``transform`` needs); subclasses whose
        mean costs less than the log-likelihood override it."""
        return self._log_likelihood_and_mean(x, model, True)[1]

    # ------------------------------------------------------------- utilities
    @property
    def _n_features_out(self):
        return self._fitted_n_components

    @property
    def _fitted_n_components(self) -> int:
        return self._architecture_["n_components"]

    def _architecture(self) -> dict:
        """The current values of the parameters that shape the model."""
        architecture = {
            name: _comparable(getattr(self, name))
            for name in self._architecture_parameters
        }
        if not self.learn_noise_variance:
            # A fixed sigma^2 is part of the model, not a starting point.
            architecture["noise_variance"] = self.noise_variance
        return architecture

    def _check_same_architecture(self, incremental: bool) -> None:
        fitted, current = self._architecture_, self._architecture()
        changed = [name for name in current if fitted.get(name) != current[name]]
        if not changed:
            return
        how = "partial_fit" if incremental else "fit with warm_start=True"
        restart = (
            "fit (or clone) the estimator to train a new model"
            if incremental
            else "set warm_start=False to train a new model"
        )
        differences = ", ".join(
            f"{name}={current[name]!r} (fitted: {fitted.get(name)!r})"
            for name in changed
        )
        raise ValueError(
            f"{how} continues the fitted model, but {differences} changed the "
            f"model's shape since it was fitted. Restore the fitted value, or "
            f"{restart}."
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        # The conditional prior needs the auxiliary variable in fit.
        tags.target_tags.required = self.prior == "conditional"
        return tags

    @staticmethod
    def _torch_dtype(X) -> torch.dtype:
        return torch.float32 if X.dtype == np.float32 else torch.float64

    def _resolve_device(self) -> torch.device:
        if self.device == "cpu":
            return torch.device("cpu")
        if torch.cuda.is_available():
            return torch.device("cuda")
        if self.device == "cuda":
            warn_at_caller(
                "device='cuda' was requested but CUDA is not available; "
                "falling back to the CPU.",
                UserWarning,
            )
        return torch.device("cpu")

    def _validate(self, X, *, reset: bool):
        return validate_data(
            self,
            X,
            reset=reset,
            dtype=[np.float64, np.float32],
            ensure_min_samples=2 if reset else 1,
        )

    def _to_tensor(self, X) -> torch.Tensor:
        # torch.tensor copies, so read-only or memory-mapped inputs are safe;
        # it refuses negative strides (a reversed view), which a copy removes.
        return torch.tensor(np.ascontiguousarray(X), dtype=self._torch_dtype(X))

    @staticmethod
    def _seed(rng: np.random.RandomState, offset: int = 0) -> torch.Generator:
        seed = int(rng.randint(np.iinfo(np.int32).max)) + offset
        return torch.Generator().manual_seed(seed)

    def _check_params(self, X) -> None:
        sizes = self.hidden_layer_sizes
        if not all(isinstance(s, Integral) and s >= 1 for s in sizes):
            raise ValueError(
                "hidden_layer_sizes should be a sequence of positive integers, "
                f"got {sizes!r}. Use () for a decoder without hidden layers."
            )
        if self.init == "linear" and not self._carries_linear_start():
            raise ValueError(
                f"init='linear' needs at least 2 * n_components = "
                f"{2 * self.n_components} units in every hidden layer (of the "
                f"decoder, and of the VAE's encoder), got {self._hidden_widths()}. "
                "Widen the hidden layers, or use init='random' (or 'auto', "
                "which falls back to it)."
            )

    def _check_split(self, X) -> None:
        if self.early_stopping:
            n_val = math.ceil(self.validation_fraction * X.shape[0])
            if n_val < 1 or X.shape[0] - n_val < 1:
                raise ValueError(
                    f"early_stopping=True holds out validation_fraction="
                    f"{self.validation_fraction} of {X.shape[0]} samples, leaving "
                    "an empty training or validation set. Pass more samples, "
                    "change validation_fraction or set early_stopping=False."
                )

    def _split(
        self, data: torch.Tensor, rng, units
    ) -> tuple[TrainingRows, torch.Tensor | None, torch.Tensor | None]:
        """Training rows (by index, no copy), the validation rows (copied),
        both in standard units, and the validation rows' positions in ``data``."""
        if not self.early_stopping:
            return TrainingRows(data, transform=units.apply), None, None
        order = torch.from_numpy(rng.permutation(data.shape[0])).to(data.device)
        n_val = math.ceil(self.validation_fraction * data.shape[0])
        rows = TrainingRows(data, order[n_val:], transform=units.apply)
        return rows, units.apply(data[order[:n_val]]), order[:n_val]

    def _make_optimizers(self, model) -> list[torch.optim.Optimizer]:
        optimizers = [
            make_optimizer(
                self.solver,
                list(parameters),
                list(noise_parameters),
                learning_rate=self.learning_rate_init,
                noise_learning_rate=self.noise_learning_rate,
            )
            for parameters, noise_parameters in self._parameter_blocks(model)
            if parameters or noise_parameters
        ]
        if model.prior is not None:
            # The segment priors step with the decoder they feed, faster: their
            # log-variances travel up to ~10 units (source scales 0.01-3),
            # beyond what 3e-3-sized steps cover in a default fit.
            decoder = next(model.decoder.parameters())
            owner = next(
                optimizer
                for optimizer in optimizers
                if any(
                    p is decoder for g in optimizer.param_groups for p in g["params"]
                )
            )
            owner.add_param_group(
                {
                    "params": list(model.prior.parameters()),
                    "lr": PRIOR_LEARNING_RATE_FACTOR * self.learning_rate_init,
                }
            )
        return optimizers

    # ------------------------------------------------------------ linear start
    def _hidden_widths(self) -> tuple[int, ...]:
        """Widths of the hidden layers the linear start runs through."""
        return tuple(self.hidden_layer_sizes)

    def _carries_linear_start(self) -> bool:
        return carries_linear_map(self._hidden_widths(), self.n_components)

    def _starts_linear(self) -> bool:
        """Whether the fit starts at the linear model: ``init="linear"``, or
        ``"auto"`` with :meth:`_auto_starts_linear`, where the hidden layers
        carry it."""
        if self.init not in ("auto", "linear") or not self._carries_linear_start():
            return False
        return self.init == "linear" or self._auto_starts_linear()

    def _auto_starts_linear(self) -> bool:
        """Whether ``init="auto"`` means the linear start: with diagonal noise
        (factor analysis) or the conditional prior (linear nonstationary
        ICA).  Measured: with isotropic noise and the standard prior the
        random start is better on the report's generator (see the user
        guide); with the conditional prior the linear start keeps the VAE
        out of the worse basins random starts reach (identifiability
        benchmark, see the user guide)."""
        return self.noise == "diagonal" or self.prior == "conditional"

    def _linear_start(self, rows: TrainingRows, rng, n_segments: int = 0):
        """The linear factor model of the training rows (standard units) that
        ``init`` starts at, or ``None`` for a random start; with the
        conditional prior (``rows.groups`` the rows' segments among
        ``n_segments``), linear nonstationary ICA."""
        if not self._starts_linear():
            return None
        n_rows = len(rows)
        if n_rows <= LINEAR_START_ROWS:
            positions = torch.arange(n_rows)
        else:
            chosen = rng.choice(n_rows, LINEAR_START_ROWS, replace=False)
            positions = torch.from_numpy(np.sort(chosen))
        x = rows.take(positions.to(rows.device)).to("cpu", torch.float64).numpy()
        if rows.groups is not None:
            codes = rows.groups[positions.to(rows.groups.device)].cpu().numpy()
            return fit_segment_linear_model(x, codes, n_segments, self.n_components)
        return fit_linear_factor_model(
            x, self.n_components, diagonal=self.noise == "diagonal"
        )

    def _n_initialisations(self) -> int:
        """``n_init``, with ``"auto"`` resolved (:meth:`_auto_n_init`)."""
        return self._auto_n_init() if self.n_init == "auto" else self.n_init

    def _auto_n_init(self) -> int:
        """What ``n_init="auto"`` means for this estimator: one fit."""
        return 1

    def _screen_epochs(self) -> int | None:
        """Epochs after which only the best of several initialisations
        trains on, or ``None``: every initialisation trains to the end."""
        return None

    def _fitted_start(self, X, y, rows, segments, codes, rng):
        """A model in data units (the fitted parts of another estimator) that
        ``fit`` starts from instead of a fresh one, or ``None`` (here: always).

        ``X``, ``y``: the validated data; ``rows``: the training rows among
        them; ``segments``, ``codes``: the conditional prior's labels and each
        row's index among them (``None`` for the standard prior)."""
        self.__dict__.pop("init_", None)
        return None

    def _apply_linear_start(self, model, start) -> None:
        """Set a fresh model's networks to the linear model ``start``."""
        start_decoder(model.decoder, self.activation, start)

    def _build_decoder(self, n_features, *, generator, dtype, device):
        """A fresh decoder MLP ``g`` as the parameters describe it."""
        return make_mlp(
            self.n_components,
            tuple(self.hidden_layer_sizes),
            n_features,
            activation=self.activation,
            output_activation=self.output_activation,
            dtype=dtype,
            device=device,
            generator=generator,
        )

    def _build_noise(self, noise_variance, scale, *, dtype, device):
        """A fresh noise variance, its floor relative to ``scale``: scalars, or
        one value per feature with ``noise="diagonal"``."""
        return NoiseVariance(
            noise_variance,
            learn=self.learn_noise_variance,
            floor=NOISE_VARIANCE_FLOOR * scale,
            dtype=dtype,
            device=device,
        )

    def _fitted_model(self) -> torch.nn.Module:
        """The fitted parts as a ``_model_class`` instance (shared, not copied)."""
        parts = {name: getattr(self, f"{name}_") for name in self._model_class.parts}
        return self._model_class(**parts, prior=getattr(self, "prior_", None))

    # ------------------------------------------------------------ segments
    def _training_segments(self, X, y, resume: bool):
        """``(segments, codes)``: the sorted distinct labels of ``y`` and each
        row's index among them (a CPU int64 tensor), for the conditional
        prior; ``(None, None)`` for the standard one, which ignores ``y``."""
        if self.prior != "conditional":
            return None, None
        name = type(self).__name__
        if y is None:
            raise ValueError(
                f"{name}(prior='conditional') requires y to be passed, but the "
                "target y is None. Pass the auxiliary variable u (a segment "
                "label per row) as y, or use prior='standard'."
            )
        labels = _check_labels(y, X.shape[0])
        if resume:
            return self.segments_, self._segment_codes(labels)
        segments, codes = np.unique(labels, return_inverse=True)
        return segments, torch.from_numpy(codes.astype(np.int64).reshape(-1))

    def _segment_codes(self, labels: np.ndarray) -> torch.Tensor:
        """Each label's index among ``segments_``; unseen labels are an error."""
        positions = np.searchsorted(self.segments_, labels)
        positions = np.clip(positions, 0, len(self.segments_) - 1)
        unseen = self.segments_[positions] != labels
        if np.any(unseen):
            raise ValueError(
                f"y contains {len(np.unique(labels[unseen]))} label(s) not seen "
                f"in fit, e.g. {labels[unseen][0]!r}; the fitted segments are "
                f"{_preview(self.segments_)}. A segment's prior is learned from "
                "its training rows: pass only fitted labels, or y=None for the "
                "marginal prior."
            )
        return torch.from_numpy(positions.astype(np.int64))

    def _inference_codes(self, y, n_rows: int):
        """Segment codes of the rows being inferred, or ``None`` (the
        standard prior, which ignores ``y``, or ``y=None``: the marginal)."""
        if getattr(self, "prior_", None) is None or y is None:
            return None
        return self._segment_codes(_check_labels(y, n_rows))

    def _store_prior(self, prior, segments) -> None:
        """The conditional prior's fitted attributes (removed for the standard
        prior, so that a refit leaves none stale)."""
        if prior is None:
            for name in _PRIOR_ATTRIBUTES:
                self.__dict__.pop(name, None)
            return
        self.prior_ = prior.cpu().eval()
        self.segments_ = segments
        with torch.no_grad():
            self.prior_means_ = prior.means.double().numpy().copy()
            self.prior_variances_ = prior.variances.double().numpy()
            self.prior_weights_ = torch.exp(prior.log_weights).double().numpy()

    def _infer_mean(self, x: torch.Tensor, codes) -> torch.Tensor:
        """``E[z | x]`` (or ``E[z | x, u]`` given ``codes``) alone; the
        marginal prior needs the log-likelihoods for its weights."""
        model = self._inference_model(x.dtype)
        if model.prior is None:
            return self._latent_mean(x, model)
        if codes is None:
            return self._infer(x, codes, with_mean=True)[1]
        mean = x.new_empty((x.shape[0], model.prior.means.shape[1]))
        for segment, positions in segment_positions(codes):
            eps_mean = self._latent_mean(x[positions], segment_view(model, segment))
            with torch.no_grad():
                mean[positions] = model.prior.to_latent(eps_mean, segment)
        return mean

    def _infer(self, x: torch.Tensor, codes, *, with_mean: bool):
        """``(log p(x), E[z | x])`` of validated rows as tensors (the mean only
        ``with_mean``): by the subclass's rule for the standard prior; for the
        conditional one, ``log p(x | u)`` and ``E[z | x, u]`` segment by
        segment given ``codes``, else under the mixture of the segment priors
        (``log sum_u pi_u p(x | u)``, and the posterior mean averaged with the
        weights ``p(u | x)``)."""
        model = self._inference_model(x.dtype)
        if model.prior is None:
            return self._log_likelihood_and_mean(x, model, with_mean)
        prior = model.prior
        if codes is not None:
            log_p = x.new_empty(x.shape[0])
            mean = (
                x.new_empty((x.shape[0], prior.means.shape[1])) if with_mean else None
            )
            for segment, positions in segment_positions(codes):
                part, eps_mean = self._log_likelihood_and_mean(
                    x[positions], segment_view(model, segment), with_mean
                )
                log_p[positions] = part
                if with_mean:
                    with torch.no_grad():
                        mean[positions] = prior.to_latent(eps_mean, segment)
            return log_p, mean
        parts = [
            self._log_likelihood_and_mean(x, segment_view(model, segment), with_mean)
            for segment in range(prior.n_segments)
        ]
        with torch.no_grad():
            log_joint = torch.stack([part for part, _ in parts]) + prior.log_weights[
                :, None
            ].to(x.dtype)
            log_p = torch.logsumexp(log_joint, dim=0)
            if not with_mean:
                return log_p, None
            weights = torch.softmax(log_joint, dim=0)
            means = torch.stack(
                [
                    prior.to_latent(eps_mean, segment)
                    for segment, (_, eps_mean) in enumerate(parts)
                ]
            )
            return log_p, (weights[..., None] * means).sum(0)

    # ------------------------------------------------------------------- fit
    @_fit_context(prefer_skip_nested_validation=True)
    @uses_torch_threads
    def fit(self, X, y=None):
        """Fit the model to ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data; float32 input trains in float32, anything else in
            float64.
        y : array-like of shape (n_samples,), default=None
            With ``prior="conditional"``: the auxiliary variable ``u`` of each
            row (required; any discrete labels, one segment per distinct
            value).  Otherwise ignored: scorers such as
            :class:`~sknlica.metrics.ProcrustesScorer` read the true latents
            from ``y`` in model selection.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        return self._fit(X, y, incremental=False)

    @available_if(_partial_fit_applies)
    @_fit_context(prefer_skip_nested_validation=True)
    @uses_torch_threads
    def partial_fit(self, X, y=None):
        """One epoch of minibatch updates on ``X``, continuing from the last call.

        For data that does not fit in memory or arrives in chunks: the first
        call (or the first after ``fit`` with ``warm_start=False`` replaced
        the model) initialises the model; each later call continues it, with
        the optimizer's state carried over.  There is no validation split,
        early stopping, learning-rate decay or parameter averaging
        (``ema_decay``): each call makes one pass over ``X`` in minibatches of
        ``batch_size`` and appends one entry to ``history_``; epoch schedules
        (a KL warm-up) advance by one per call.  The first call's chunk fixes
        the standardisation (the location and scale training runs in, see
        the user guide), so it should be representative of the data.  A
        call whose loss becomes
        non-finite raises :class:`TrainingDivergedError` and leaves the
        previous fitted model untouched.  Unavailable when ``n_init > 1``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            A chunk of training data (at least 2 rows in the first call).
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : object
            The updated estimator.
        """
        return self._fit(X, incremental=True)

    def _fit(self, X, y=None, *, incremental: bool):
        """``fit`` (all epochs, restarts) or ``partial_fit`` (one epoch)."""
        resume = hasattr(self, "decoder_") and (incremental or self.warm_start)
        if resume:
            self._check_same_architecture(incremental)
        X = self._validate(X, reset=not resume)
        self._check_params(X)
        segments, codes = self._training_segments(X, y, resume)
        if not incremental:
            self._check_split(X)
        rng = check_random_state(self.random_state)
        device = self._resolve_device()
        dtype = self._torch_dtype(X)
        build = {"dtype": dtype, "device": device}
        data = training_tensor(X, device)
        # One pass over the data for the standardisation, the Gaussian
        # baseline and the noise start (this chunk's, also on resume).
        feature_variance = data.var(dim=0, unbiased=False)
        # Training runs in standard units, so that results do not depend on
        # the data's units (see sknlica/_torch/standardisation.py).
        units = (
            self._standardisation_
            if resume
            else Standardisation.of(data, self.output_activation, feature_variance)
        ).to(**build)
        if incremental:
            rows, validation = TrainingRows(data, transform=units.apply), None
            validation_positions = None
        else:
            rows, validation, validation_positions = self._split(data, rng, units)
        if codes is not None:
            # Segment-pure minibatches (training.minibatches).
            rows.groups = codes if rows.index is None else codes[rows.index.cpu()]
        entries_before = self.n_iter_ if incremental and resume else 0
        settings = TrainingSettings(
            max_iter=1 if incremental else self.max_iter,
            batch_size=self.batch_size,
            tol=self.tol,
            n_iter_no_change=self.n_iter_no_change,
            ema_decay=0.0 if incremental else self.ema_decay,
            verbose=bool(self.verbose) and not incremental,
            description=type(self).__name__,
            phase=self.solver,
            track_rows=not incremental,
            epochs_before=self._epochs_trained_ if resume else 0,
            entries_before=entries_before,
        )
        variance = mean_feature_variance(feature_variance) / units.scale**2
        # The noise scale in standard units: per feature with "diagonal".
        noise_scale = self._noise_scale(feature_variance / units.scale**2, variance)
        linear_start = (
            None
            if resume
            else self._linear_start(rows, rng, 0 if segments is None else len(segments))
        )
        fitted_start = (
            None
            if resume or incremental
            else self._fitted_start(X, y, rows, segments, codes, rng)
        )
        noise_start = (
            None if resume else self._noise_start(units, noise_scale, linear_start)
        )
        baseline = _gaussian_baseline(validation, units, X.shape[1], variance)

        def polish(run, objective, generator):
            if not self._blew_up(run, baseline, X.shape[1]):
                self._polish(
                    run,
                    objective,
                    rows,
                    validation,
                    generator=generator,
                    centre=units.standard_mean,
                )

        runs: list[TrainingRun] = []
        n_runs = 1 if resume or incremental else self._n_initialisations()
        # Screened restarts: every initialisation trains this many epochs,
        # then only the best continues (see _screen_epochs).
        screen = self._screen_epochs() if n_runs > 1 else None
        screened = []
        for _ in range(n_runs):
            generator = self._seed(rng, PARTIAL_FIT_SEED_STRIDE * entries_before)
            if resume:
                # Train a copy: the fitted model stays intact if this fit fails.
                model = copy.deepcopy(self._fitted_model()).to(**build)
                units.unfold(model)
            elif fitted_start is not None:
                # Every restart from the same fitted model, in standard units.
                model = copy.deepcopy(fitted_start).to(**build)
                units.unfold(model)
            else:
                model = self._build_model(
                    X.shape[1],
                    noise_variance=noise_start,
                    scale=noise_scale,
                    generator=generator,
                    n_segments=0 if codes is None else len(segments),
                    **build,
                )
                if linear_start is not None:
                    self._apply_linear_start(model, linear_start)
                if codes is not None:
                    counts = torch.bincount(codes, minlength=len(segments))
                    model.prior = SegmentPrior(
                        counts,
                        self.n_components,
                        learn_means=self.prior_means,
                        **build,
                    )
                    if linear_start is not None:
                        start_segment_prior(model.prior, linear_start)
            objective = self._make_objective(
                model,
                n_features=X.shape[1],
                centre=units.standard_mean,
                generator=generator,
                **build,
            )
            if codes is not None:
                objective = SegmentedObjective(
                    objective,
                    rows.groups,
                    None
                    if validation_positions is None
                    else codes[validation_positions.cpu()],
                )
            if self.alpha:
                penalty = WeightPenalty(model.decoder, self.alpha, len(rows))
                objective = PenalisedObjective(objective, penalty)
            if self.solver == "lbfgs":
                # No epochs: the full-batch phase (_polish) is the whole fit.
                run = TrainingRun(model=model, optimizers=[])
            else:
                optimizers = self._make_optimizers(model)
                if incremental and resume:
                    for optimizer, state in zip(
                        optimizers, self._optimizer_states_, strict=True
                    ):
                        optimizer.load_state_dict(state)
                run = train(
                    model,
                    objective,
                    optimizers,
                    rows,
                    validation,
                    generator,
                    settings
                    if screen is None
                    else replace(settings, max_iter=min(screen, settings.max_iter)),
                )
            if screen is not None:
                screened.append((run, objective, generator))
            elif not incremental:
                polish(run, objective, generator)
            runs.append(run)
            if run.interrupted:
                break
        if screened:
            chosen, objective, generator = max(screened, key=lambda p: p[0].score)
            run = chosen
            if not runs[-1].interrupted:  # an interrupt stops every restart
                run = extend(run, objective, rows, validation, generator, settings)
            polish(run, objective, generator)
            # The continued run is the last one (an interrupt's message).
            runs = [part for part, _, _ in screened if part is not chosen] + [run]
        best = max(runs, key=lambda run: run.score)
        self._finish(
            best,
            runs,
            incremental=incremental,
            resume=resume,
            units=units,
            n_features=X.shape[1],
            baseline=baseline,
            segments=segments,
        )
        return self

    def _noise_scale(self, feature_variance, variance: float):
        """The data's variance in standard units: ``variance``, its mean over
        features, or, with ``noise="diagonal"``, each feature's
        ``feature_variance`` (the mean for constant ones, so that no floor is
        zero)."""
        if self.noise == "isotropic":
            return variance
        return torch.where(feature_variance > 0, feature_variance, variance)

    def _noise_start(self, units, scale, linear_start=None):
        """The initial (or fixed) noise variance, in standard units.

        ``noise_variance=None`` starts at the noise of ``linear_start`` (the
        linear model ``init`` starts the networks at) if there is one, else
        at the data's variance ``scale`` (mean
        feature variance, or each feature's), the noise of a model that
        explains nothing, from which it descends as the decoder learns; a
        start that depends on the data only through their shape, so it is the
        same in any units.  Measured against the PPCA residual variance as
        the start (closer to the optimum): the same held-out gap at sigma^2 =
        1 (MLE 0.033 against 0.036, VAE 0.037 against 0.043) and a better one
        at sigma^2 = 0.04 (VAE 0.146 against 0.191), as a random decoder with
        a small noise variance starts badly.
        """
        if self.noise_variance is None and linear_start is not None:
            if self.noise == "isotropic":
                return float(linear_start.noise_variance)
            return torch.as_tensor(linear_start.noise_variance).to(scale)
        if self.noise_variance is None:
            return scale
        start = float(self.noise_variance) / units.scale**2
        return start if self.noise == "isotropic" else torch.full_like(scale, start)

    def _finish(
        self,
        best: TrainingRun,
        runs,
        *,
        incremental,
        resume,
        units,
        n_features,
        baseline,
        segments=None,
    ) -> None:
        """Keep ``best`` as the fitted model and report what happened.

        ``baseline`` is the log-likelihood per row, in standard units, of the
        Gaussian with the data's mean and variance, which every model
        contains: a best score far below it means training blew up, one below
        it after the stopping rule fired that the optimiser failed.
        """
        name = type(self).__name__
        interrupted = runs[-1].interrupted
        if not best.has_model:
            if interrupted:
                raise KeyboardInterrupt
            if incremental:
                kept = "; the previous model was kept." if resume else "."
                raise TrainingDivergedError(
                    f"{name}.partial_fit diverged: the loss became non-finite"
                    f"{kept} {_DIVERGENCE_ADVICE}"
                )
            raise TrainingDivergedError(
                f"{name} diverged in its first epoch: the loss became non-finite "
                f"before any finite model existed. {_DIVERGENCE_ADVICE}"
            )
        deficit = baseline - best.score
        checked = self.learn_noise_variance and self.noise_variance is None
        if self._blew_up(best, baseline, n_features):
            shift = units.log_jacobian(n_features)
            kept = "; the previous model was kept" if resume else ""
            raise TrainingDivergedError(
                f"{name} diverged: its best log-likelihood, {best.score + shift:.6g}"
                f" nats per row, is {deficit:.4g} below that of a Gaussian with the "
                f"data's mean and variance ({baseline + shift:.6g}), which the model "
                f"contains. No model was kept from this fit{kept}. "
                f"{_DIVERGENCE_ADVICE}"
            )
        epochs_before = self._epochs_trained_ if resume else 0
        history_before = list(self.history_) if incremental and resume else []
        units.fold(best.model)
        _to_data_units(best.history, units, n_features)
        self._standardisation_ = units.to(torch.float64, "cpu")
        self._store_fitted(best.model, segments)
        self._optimizer_states_ = [
            state_to_cpu(optimizer.state_dict()) for optimizer in best.optimizers
        ]
        self.history_ = history_before + best.history
        epochs, iterations = _phase_counts(best.history)
        self._epochs_trained_ = epochs_before + epochs
        self._architecture_ = self._architecture()
        if incremental:
            # Epochs over every call; the history may hold a polished fit's
            # L-BFGS entries too.
            self.n_iter_ = _phase_counts(self.history_)[0]
        else:
            self.n_iter_ = iterations if self.solver == "lbfgs" else epochs
        self._store_iterations(iterations)
        self.converged_ = best.converged and not incremental
        self.best_epoch_ = len(self.history_) if incremental else best.best_epoch
        if best.failed_epoch is not None:
            raise TrainingDivergedError(
                f"{name} diverged at epoch {best.failed_epoch}: the loss became "
                f"non-finite. The best finite model (epoch {best.best_epoch}) was "
                f"kept and the estimator is usable. {_DIVERGENCE_ADVICE}"
            )
        if interrupted:
            message = _interruption_message(
                len(runs), self._n_initialisations(), runs[-1]
            )
            warn_at_caller(f"{message} (epoch {self.best_epoch_}).", UserWarning)
        elif (
            not best.converged
            and not incremental
            and (iterations or self.n_iter_ == self.max_iter)
        ):
            warn_at_caller(self._nonconvergence_message(iterations), ConvergenceWarning)
        elif checked and not incremental and deficit > 0:
            shift = units.log_jacobian(n_features)
            warn_at_caller(
                f"{name} converged to a model worse than a Gaussian with the "
                f"data's mean and variance, which it contains: its best "
                f"log-likelihood is {best.score + shift:.6g} nats per row against "
                f"{baseline + shift:.6g}. The optimiser failed; try a smaller "
                "learning_rate_init.",
                ConvergenceWarning,
            )

    def _blew_up(self, run: TrainingRun, baseline: float, n_features: int) -> bool:
        """Whether ``run``'s best score is so far below the Gaussian baseline
        that training must have blown up (checked only when the noise variance
        is learned from the default start)."""
        checked = self.learn_noise_variance and self.noise_variance is None
        deficit = baseline - run.score
        return checked and run.has_model and deficit > EXPLOSION_MARGIN * n_features

    def _store_iterations(self, iterations: int) -> None:
        """Record the L-BFGS iterations of the fit (none here)."""

    def _nonconvergence_message(self, iterations: int) -> str:
        """What a fit that ran out of iterations tells the user."""
        return (
            f"{type(self).__name__} reached max_iter={self.max_iter} epochs "
            "without converging; consider increasing max_iter."
        )

    def _store_fitted(self, model, segments=None) -> None:
        for part in self._model_class.parts:
            setattr(self, f"{part}_", getattr(model, part).cpu().eval())
        self._store_prior(model.prior, segments)
        variance = model.noise().detach()
        self.noise_variance_ = (
            float(variance) if variance.ndim == 0 else variance.double().numpy()
        )
        self._store_extra(model)

    # ------------------------------------------------------------ inference
    def _check_fitted_input(self, X):
        check_is_fitted(self)
        return self._validate(X, reset=False)

    @uses_torch_threads
    def score_samples(self, X, y=None):
        """Log-likelihood ``log p(x)`` of each row under the fitted model.

        An estimate of the likelihood itself, not a bound, so the values of
        both estimators, and of the true model
        (:func:`~sknlica.marginal_log_likelihood`), are comparable:
        both go through one evaluator: a fixed rule over the prior
        (:class:`~sknlica.NonlinearICAMLE`'s ``n_eval_nodes``, 16,384 for
        :class:`~sknlica.NonlinearICAVAE`), and for the rows where that
        rule is inaccurate (few effective nodes), importance sampling from a
        mixture adapted to the row's posterior: Laplace Gaussians at the
        modes found from several starts, a moment-matched Gaussian, the
        prior, and for the VAE its encoder ``q(z | x)`` and a widened copy.
        (With ``amortized_variance=True`` the VAE's encoder is the only
        proposal, ``n_eval_samples`` draws.)  Deterministic, and a row's
        value does not depend on the other rows passed.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Observations.
        y : array-like of shape (n_samples,), default=None
            With ``prior="conditional"``, each row's segment label: the result
            is then ``log p(x_i | u_i)``; ``None`` gives ``log p(x_i)`` under
            the mixture of the segment priors.  Ignored by the standard prior.

        Returns
        -------
        log_likelihood : ndarray of shape (n_samples,)
            ``log p(x_i)`` in nats, with the dtype of ``X``.
        """
        X = self._check_fitted_input(X)
        codes = self._inference_codes(y, X.shape[0])
        return self._infer(self._to_tensor(X), codes, with_mean=False)[0].numpy()

    @uses_torch_threads
    def transform(self, X, y=None):
        """Latent coordinates of each row.

        :class:`~sknlica.NonlinearICAMLE` returns the posterior mean ``E[z |
        x]`` (with the same per-row choice of rule as ``score_samples``),
        :class:`~sknlica.NonlinearICAVAE` the encoder mean ``mu(x)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to encode.
        y : array-like of shape (n_samples,), default=None
            With ``prior="conditional"``, each row's segment label: the
            result is then ``E[z | x, u]`` (the encoder mean of ``q(z | x,
            u)`` for the VAE); ``None`` averages those over the segments with
            the weights ``p(u | x)`` of the marginal prior.  Ignored by the
            standard prior.  (``fit_transform(X, y)`` is ``fit(X,
            y).transform(X)``, scikit-learn's contract: the marginal version.)

        Returns
        -------
        Z : ndarray of shape (n_samples, n_components)
            One latent vector per row (``X``'s dtype).
        """
        X = self._check_fitted_input(X)
        codes = self._inference_codes(y, X.shape[0])
        return self._infer_mean(self._to_tensor(X), codes).numpy()

    def score(self, X, y=None) -> float:
        """Mean log-likelihood per sample, ``mean(score_samples(X, y))``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Observations.
        y : array-like of shape (n_samples,), default=None
            With ``prior="conditional"``, the rows' segment labels (``log p(x
            | u)``); otherwise ignored (scorers pass their targets here).

        Returns
        -------
        score : float
            Average ``log p(x)`` (or ``log p(x | u)``) in nats.
        """
        return float(np.mean(self.score_samples(X, y)))

    @uses_torch_threads
    def sample(
        self, n_samples: int = 1, random_state=None, return_latent=False, *, y=None
    ):
        """Draw ``x = g(z) + noise`` with ``z ~ N(0, I)`` from the fitted model.

        With ``prior="conditional"``, ``z ~ N(mu(u), diag lambda(u))`` for
        the segments ``u`` given as ``y``, or drawn with the weights
        ``prior_weights_``.

        Parameters
        ----------
        n_samples : int, default=1
            Number of samples.
        random_state : int, RandomState instance or None, default=None
            Seeds the draws; independent of the estimator's ``random_state``.
        return_latent : bool, default=False
            Also return the latents the samples were decoded from.
        y : array-like of shape (n_samples,), default=None
            With ``prior="conditional"``: the segment label of each draw.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
            Samples, float64.
        Z : ndarray of shape (n_samples, n_components)
            Their latents; only when ``return_latent=True``.
        """
        check_is_fitted(self)
        if not isinstance(n_samples, Integral) or n_samples < 1:
            raise ValueError(
                f"n_samples should be a positive integer, got {n_samples!r}."
            )
        rng = check_random_state(random_state)
        codes = self._sample_codes(n_samples, y, rng)
        Z = rng.standard_normal((n_samples, self._fitted_n_components))
        if codes is not None:
            Z = self.prior_means_[codes] + np.sqrt(self.prior_variances_[codes]) * Z
        noise = rng.standard_normal((n_samples, self.n_features_in_))
        mean, variance = self._sample_mean_and_variance(Z)
        X = mean + np.sqrt(variance) * noise
        return (X, Z) if return_latent else X

    def _sample_codes(self, n_samples: int, y, rng):
        """Segment indices of the draws (``None`` for the standard prior)."""
        if getattr(self, "prior_", None) is None:
            return None
        if y is None:
            return rng.choice(
                len(self.segments_), size=n_samples, p=self.prior_weights_
            )
        labels = _check_labels(y, None)
        if len(labels) != n_samples:
            raise ValueError(
                f"sample got {len(labels)} segment labels in y for "
                f"n_samples={n_samples}; pass one label per draw "
                "(n_samples=len(y)), or y=None to draw the segments."
            )
        return self._segment_codes(labels).numpy()

    def _sample_mean_and_variance(self, Z: np.ndarray):
        """Decoder mean at latents ``Z`` and the noise variance, broadcastable
        to it: ``(1, 1)``, one per feature ``(1, n)`` or one per row
        ``(n_samples, 1)``."""
        return self._decode(Z), np.reshape(self.noise_variance_, (1, -1))

    def _inference_model(self, dtype: torch.dtype) -> torch.nn.Module:
        """The fitted model in ``dtype``, copied when that differs (``Module.to``
        is in place, and the fitted attributes must stay as they are)."""
        model = self._fitted_model()
        if next(self.decoder_.parameters()).dtype != dtype:
            model = copy.deepcopy(model).to(dtype=dtype)
        return model.eval()

    def _decode(self, Z: np.ndarray) -> np.ndarray:
        param = next(self.decoder_.parameters())
        with torch.no_grad():
            z = torch.tensor(np.ascontiguousarray(Z), dtype=param.dtype)
            return self.decoder_(z).double().numpy()

    @uses_torch_threads
    def inverse_transform(self, X):
        """Map latents to the decoder mean ``g(z)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_components)
            Latent coordinates (named ``X`` by scikit-learn convention).

        Returns
        -------
        X_original : ndarray of shape (n_samples, n_features)
            ``g(z)``, with the dtype of the input (float32 or float64).
        """
        check_is_fitted(self)
        Z = check_array(X, dtype=[np.float64, np.float32])
        n_components = self._fitted_n_components
        if Z.shape[1] != n_components:
            raise ValueError(
                f"inverse_transform expects latents with n_components="
                f"{n_components} columns, got {Z.shape[1]}. Pass the output of "
                "transform (or an array of that width)."
            )
        return self._decode(Z).astype(Z.dtype, copy=False)

    def __getstate__(self):
        state = super().__getstate__()
        # Fitted modules always pickle as CPU state.
        for key, value in state.items():
            if isinstance(value, torch.nn.Module):
                state[key] = value.cpu()
        return state


#: History entries that are log-likelihoods per row (or bounds on them).
_LOG_LIKELIHOOD_ENTRIES = (
    "train_objective",
    "train_log_likelihood",
    "validation_log_likelihood",
    "train_elbo",
    "validation_elbo",
)


#: The fitted attributes of the conditional prior (``_store_prior``).
_PRIOR_ATTRIBUTES = (
    "prior_",
    "segments_",
    "prior_means_",
    "prior_variances_",
    "prior_weights_",
)


def _check_labels(y, n_rows: int | None) -> np.ndarray:
    """``y`` as a 1-d array of segment labels (``n_rows`` of them if given)."""
    labels = column_or_1d(y, warn=True)
    if n_rows is not None and len(labels) != n_rows:
        raise ValueError(
            f"y has {len(labels)} segment labels for {n_rows} rows of X; pass "
            "one label per row."
        )
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise ValueError(
            "y contains NaN or infinite segment labels; give every row a "
            "finite (or string) label."
        )
    return labels


def _preview(values: np.ndarray, limit: int = 6) -> str:
    """``values`` for a message, elided beyond ``limit`` entries."""
    shown = ", ".join(repr(value) for value in values[:limit].tolist())
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _gaussian_baseline(validation, units, n_features: int, variance: float) -> float:
    """Log-likelihood per row, in standard units, of ``N(mean, variance I)``
    (the data's mean and mean feature variance) on the rows the monitored
    score is computed on: the validation rows, else (its expectation) the
    training data."""
    if validation is None:
        return -0.5 * n_features * (math.log(2 * math.pi * variance) + 1.0)
    mean = units.standard_mean.to(validation.dtype)
    density = gaussian_log_density(validation, mean, validation.new_tensor(variance))
    return float(density.mean())


def _to_data_units(history: list[dict], units, n_features: int) -> None:
    """History entries measured in standard units, in the data's units."""
    shift = units.log_jacobian(n_features)
    for entry in history:
        for key in _LOG_LIKELIHOOD_ENTRIES:
            if key in entry:
                entry[key] += shift
        entry["noise_variance"] *= units.scale**2


def _comparable(value):
    """Parameter values as compared across fits: sequences as tuples."""
    if isinstance(value, list | tuple | np.ndarray):
        return tuple(value)
    return value


def _phase_counts(history: list[dict]) -> tuple[int, int]:
    """Epochs (of the stochastic solver) and L-BFGS iterations in ``history``."""
    epochs = sum(entry["phase"] != "lbfgs" for entry in history)
    iterations = max(
        (entry["iterations"] for entry in history if entry["phase"] == "lbfgs"),
        default=0,
    )
    return epochs, iterations


def _interruption_message(n_run: int, n_init: int, last: TrainingRun) -> str:
    n_epochs, iterations = _phase_counts(last.history)
    message = f"Training interrupted after {n_epochs} epoch{'s' * (n_epochs != 1)}"
    if iterations:
        message += f" and {iterations} L-BFGS iterations"
    if n_init > 1:
        message += f" of restart {n_run} of {n_init}"
        if n_run < n_init:
            message += f" (the remaining {n_init - n_run} were not run)"
    return message + "; keeping the best model so far"


#: Shared parameters listed before a subclass's own ones in its signature.
_LEADING_SHARED = ("hidden_layer_sizes", "activation", "output_activation")


def _merged_signature(init) -> inspect.Signature:
    """``init``'s signature with ``**shared`` replaced by the base's parameters.

    Order: ``self, n_components``, the decoder's shape, the subclass's own
    parameters, then the remaining shared ones.
    """
    own = inspect.signature(init)
    base = inspect.signature(BaseNonlinearICA.__init__).parameters
    params = [p for p in own.parameters.values() if p.kind != p.VAR_KEYWORD]
    positional = [p for p in params if p.kind != p.KEYWORD_ONLY]
    keyword = [p for p in params if p.kind == p.KEYWORD_ONLY]
    taken = {p.name for p in params}
    leading = [base[name] for name in _LEADING_SHARED if name not in taken]
    rest = [
        p
        for name, p in base.items()
        if p.kind == p.KEYWORD_ONLY
        and name not in taken
        and name not in _LEADING_SHARED
    ]
    return own.replace(parameters=positional + leading + keyword + rest)
