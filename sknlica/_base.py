"""Shared scikit-learn plumbing for the nonlinear ICA estimators.

:class:`BaseNonlinearICA` owns everything that does not depend on how the
marginal likelihood is approximated: parameter validation, seeding, dtype and
device handling, the minibatch training loop with early stopping, ``n_init``
restarts, the per-epoch ``history_``, fault handling (non-finite losses,
``KeyboardInterrupt``), and pickling to CPU state.  Subclasses fill in four
named steps: ``_build_model``, ``_training_loss``, ``_epoch_scores`` and
``_store_fitted``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
import warnings
from abc import ABCMeta, abstractmethod
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data
from tqdm.auto import tqdm

from sknlica._torch.averaging import ParameterAverage
from sknlica._torch.networks import ACTIVATIONS

#: Noise-variance floor when sigma^2 is learned, relative to the mean feature
#: variance of the training data (absolute when the features are constant).
NOISE_VARIANCE_FLOOR = 1e-6


#: Learning rates are multiplied by this after every ``n_iter_no_change // 2``
#: epochs without improvement (a plateau schedule, as ReduceLROnPlateau), so
#: the last epochs refine rather than oscillate.
LEARNING_RATE_DECAY = 0.5


class TrainingDivergedError(FloatingPointError):
    """Training produced a non-finite loss; the best finite model was kept."""


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


class TrainingRows:
    """The training rows of a data tensor, gathered one minibatch at a time.

    Holding the full data plus an index (rather than ``X[index]``) is what
    keeps ``fit`` from copying the data: only minibatches are materialised.

    Parameters
    ----------
    data : torch.Tensor of shape (n_samples, n_features)
        All rows, possibly sharing memory with the caller's array.
    index : torch.Tensor of int64 or None
        Positions of the training rows in ``data``; ``None`` means all rows.
    """

    def __init__(self, data: torch.Tensor, index: torch.Tensor | None = None):
        self.data = data
        self.index = index

    def __len__(self) -> int:
        return self.data.shape[0] if self.index is None else self.index.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.data.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows at ``positions`` (0-based among the training rows), copied."""
        if self.index is not None:
            positions = self.index[positions]
        return self.data[positions]


def _partial_fit_applies(estimator) -> bool:
    # Restarts pick the best of several complete fits, which needs all the
    # data at once; incremental training has a single run.
    if estimator.n_init != 1:
        raise AttributeError(
            "partial_fit is unavailable with n_init > 1 (restarts compare whole "
            "fits); set n_init=1 for incremental training."
        )
    return True


class BaseNonlinearICA(
    ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator, metaclass=ABCMeta
):
    """Common base of :class:`NonlinearICAMLE` and :class:`NonlinearICAVAE`."""

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "hidden_layer_sizes": ["array-like"],
        "activation": [StrOptions(set(ACTIVATIONS))],
        "output_activation": [StrOptions(set(ACTIVATIONS))],
        "noise_variance": [Interval(Real, 0, None, closed="neither")],
        "learn_noise_variance": ["boolean"],
        "solver": [StrOptions({"adam", "sgd"})],
        "learning_rate_init": [Interval(Real, 0, None, closed="neither")],
        "noise_learning_rate": [Interval(Real, 0, None, closed="neither"), None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "ema_decay": [Interval(Real, 0, 1, closed="left")],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "warm_start": ["boolean"],
        "device": [StrOptions({"cpu", "cuda", "auto"})],
        "n_threads": [Interval(Integral, 1, None, closed="left"), None],
        "verbose": ["verbose"],
        "random_state": ["random_state"],
    }

    # ------------------------------------------------------------------ hooks
    @abstractmethod
    def _build_model(self, n_features, *, scale, dtype, device, generator):
        """Return a fresh ``nn.Module`` holding every trainable part."""

    @abstractmethod
    def _training_loss(self, model, batch, *, generator, rows=None) -> torch.Tensor:
        """Minibatch loss (negative objective per row) to minimise.

        ``rows`` holds the batch's positions among the training rows, stable
        across the epochs of one ``fit`` (``None`` in ``partial_fit``), for
        per-row state such as warm starts.
        """

    @abstractmethod
    def _epoch_scores(self, model, X_train, X_val, train_objective) -> dict:
        """Extra per-epoch history entries; must include the selection score."""

    @abstractmethod
    def _store_fitted(self, model) -> None:
        """Copy the trained model into fitted ``*_`` attributes (on CPU)."""

    @abstractmethod
    def _model_from_fitted(self, *, dtype, device, generator):
        """Rebuild the training module from the fitted attributes (warm start)."""

    #: History key the stopping rule and ``n_init`` selection maximise.
    _train_score_key = "train_log_likelihood"
    _val_score_key = "validation_log_likelihood"

    # ------------------------------------------------------------- utilities
    @property
    def _n_features_out(self):
        return self.n_components

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def _torch_dtype(self, X) -> torch.dtype:
        return torch.float32 if X.dtype == np.float32 else torch.float64

    def _resolve_device(self) -> torch.device:
        if self.device == "cpu":
            return torch.device("cpu")
        if torch.cuda.is_available():
            return torch.device("cuda")
        if self.device == "cuda":
            warnings.warn(
                "device='cuda' was requested but CUDA is not available; "
                "falling back to the CPU.",
                UserWarning,
                stacklevel=4,
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

    def _to_tensor(self, X, device=None) -> torch.Tensor:
        # torch.tensor copies, so read-only or memory-mapped inputs are safe.
        return torch.tensor(X, dtype=self._torch_dtype(X), device=device or "cpu")

    @staticmethod
    def _training_tensor(X: np.ndarray, device: torch.device) -> torch.Tensor:
        """``X`` as a tensor on ``device``, sharing memory on the CPU.

        Training only ever reads rows (minibatches are gathered copies), so
        the caller's array -- even a read-only or memory-mapped one -- is
        safe to share, and memory stays flat in the number of rows.
        """
        if device.type != "cpu":
            return torch.as_tensor(X, device=device)
        with warnings.catch_warnings():
            # Read-only input (e.g. a memory map): we never write to it.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(np.ascontiguousarray(X))

    @staticmethod
    def _seed(rng: np.random.RandomState) -> torch.Generator:
        return torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))

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
        y : Ignored
            Not used, present for API consistency.  Scorers such as
            :class:`~sknlica.metrics.ProcrustesScorer` read the true latents
            from ``y`` in model selection.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        warm = self.warm_start and hasattr(self, "decoder_")
        X = self._validate(X, reset=not warm)
        self._check_params(X)
        self._check_split(X)
        rng = check_random_state(self.random_state)
        device = self._resolve_device()
        dtype = self._torch_dtype(X)
        data = self._training_tensor(X, device)
        train_rows, X_val = self._split(data, rng)
        scale = _mean_feature_variance(data)

        best = None
        for _ in range(1 if warm else self.n_init):
            generator = self._seed(rng)
            model = (
                self._model_from_fitted(dtype=dtype, device=device, generator=generator)
                if warm
                else self._build_model(
                    X.shape[1],
                    scale=scale,
                    dtype=dtype,
                    device=device,
                    generator=generator,
                )
            )
            run = self._train(model, train_rows, X_val, generator)
            if best is None or run["score"] > best["score"]:
                best = run
        self._finish(best)
        return self

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
        (``ema_decay``): each call makes one pass over
        ``X`` in minibatches of ``batch_size`` and appends one entry to
        ``history_``.  A call whose loss becomes non-finite raises
        :class:`TrainingDivergedError` and leaves the previous fitted model
        untouched.  Unavailable when ``n_init > 1``.

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
        first = not hasattr(self, "decoder_")
        X = self._validate(X, reset=first)
        self._check_params(X)
        rng = check_random_state(self.random_state)
        device = self._resolve_device()
        dtype = self._torch_dtype(X)
        data = self._training_tensor(X, device)
        n_done = 0 if first else self.n_iter_
        # A different stream per call, reproducible for an integer seed.
        generator = torch.Generator().manual_seed(
            int(rng.randint(np.iinfo(np.int32).max)) + 7919 * n_done
        )
        if first:
            model = self._build_model(
                X.shape[1],
                scale=_mean_feature_variance(data),
                dtype=dtype,
                device=device,
                generator=generator,
            )
        else:
            model = self._model_from_fitted(
                dtype=dtype, device=device, generator=generator
            )
        optimizers = self._make_optimizers(model)
        for optimizer, state in zip(
            optimizers, getattr(self, "_optimizer_states_", ()), strict=False
        ):
            optimizer.load_state_dict(state)
        self._begin_epoch(model, n_done)
        start = time.perf_counter()
        train_loss = self._run_epoch(model, optimizers, TrainingRows(data), generator)
        if not math.isfinite(train_loss) or not _is_finite(model):
            raise TrainingDivergedError(
                f"{type(self).__name__}.partial_fit diverged: the loss became "
                "non-finite"
                + ("." if first else "; the previous model was kept.")
                + " Try a smaller learning_rate_init, float64 input, "
                "standardising X, or a larger initial noise_variance."
            )
        model.eval()
        with torch.no_grad():
            entry = {"epoch": n_done + 1, "train_objective": -train_loss}
            entry.update(
                self._epoch_scores(model, TrainingRows(data), None, -train_loss)
            )
            entry["noise_variance"] = float(model.noise())
        entry["seconds"] = time.perf_counter() - start
        self._store_fitted(model)
        self._store_optimizers(optimizers)
        self.history_ = ([] if first else list(self.history_)) + [entry]
        self.n_iter_ = n_done + 1
        self.best_epoch_ = self.n_iter_
        self.converged_ = False
        return self

    def _store_optimizers(self, optimizers) -> None:
        # CPU copies, so the estimator pickles and clones like its modules.
        self._optimizer_states_ = [
            _state_to_cpu(optimizer.state_dict()) for optimizer in optimizers
        ]

    def _check_params(self, X) -> None:
        sizes = self.hidden_layer_sizes
        if not all(isinstance(s, Integral) and s >= 1 for s in sizes):
            raise ValueError(
                "hidden_layer_sizes should be a sequence of positive integers, "
                f"got {sizes!r}. Use () for a decoder without hidden layers."
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

    def _split(self, data: torch.Tensor, rng) -> tuple[TrainingRows, torch.Tensor]:
        """Training rows (by index, no copy) and the validation rows (copied)."""
        if not self.early_stopping:
            return TrainingRows(data), None
        order = torch.from_numpy(rng.permutation(data.shape[0])).to(data.device)
        n_val = math.ceil(self.validation_fraction * data.shape[0])
        return TrainingRows(data, order[n_val:]), data[order[:n_val]]

    def _make_optimizers(self, model):
        noise = [p for n, p in model.named_parameters() if n.startswith("noise.")]
        rest = [p for n, p in model.named_parameters() if not n.startswith("noise.")]
        if self.solver == "adam":
            return [torch.optim.Adam(model.parameters(), lr=self.learning_rate_init)]
        # The report's Algorithm 1: a theta step, then a sigma^2 step at the
        # updated theta, each with its own step size.
        optimizers = [torch.optim.SGD(rest, lr=self.learning_rate_init)]
        if noise:
            lr = self.noise_learning_rate or self.learning_rate_init
            optimizers.append(torch.optim.SGD(noise, lr=lr))
        return optimizers

    def _train(self, model, X_train, X_val, generator) -> dict:
        optimizers = self._make_optimizers(model)
        average = ParameterAverage(model, self.ema_decay) if self.ema_decay else None
        score_key = self._val_score_key if X_val is not None else self._train_score_key
        history: list[dict] = []
        best_score, best_state, best_epoch = -math.inf, None, 0
        no_improvement, converged, failure = 0, False, None
        start = time.perf_counter()
        bar = tqdm(
            range(self.max_iter),
            disable=not self.verbose,
            desc=type(self).__name__,
            leave=False,
        )
        try:
            for epoch in bar:
                self._begin_epoch(model, epoch)
                train_loss = self._run_epoch(
                    model,
                    optimizers,
                    X_train,
                    generator,
                    pass_rows=True,
                    average=average,
                )
                if not math.isfinite(train_loss) or not _is_finite(model):
                    failure = epoch + 1
                    break
                model.eval()
                # Scored, selected and kept: the averaged parameters.
                with torch.no_grad(), _averaged(average):
                    entry = {"epoch": epoch + 1, "train_objective": -train_loss}
                    entry.update(self._epoch_scores(model, X_train, X_val, -train_loss))
                    entry["noise_variance"] = float(model.noise())
                    score = entry[score_key]
                    if score > best_score:
                        best_state = copy.deepcopy(model.state_dict())
                entry["seconds"] = time.perf_counter() - start
                history.append(entry)
                bar.set_postfix({score_key: f"{score:.4f}"})
                if score > best_score + self.tol:
                    no_improvement = 0
                else:
                    no_improvement += 1
                    if no_improvement % self._decay_patience() == 0:
                        _scale_learning_rates(optimizers, LEARNING_RATE_DECAY)
                if score > best_score:
                    best_score, best_epoch = score, epoch + 1
                if no_improvement >= self.n_iter_no_change:
                    converged = True
                    break
        except KeyboardInterrupt:
            warnings.warn(
                f"Training interrupted after {len(history)} epochs; keeping the "
                "best model so far.",
                UserWarning,
                stacklevel=4,
            )
            converged = False
        finally:
            bar.close()
        if best_state is not None:
            model.load_state_dict(best_state)
        return {
            "optimizers": optimizers,
            "model": model,
            "score": best_score,
            "history": history,
            "converged": converged,
            "n_iter": len(history),
            "best_epoch": best_epoch,
            "failure": failure,
            "has_state": best_state is not None,
        }

    def _run_epoch(
        self,
        model,
        optimizers,
        rows: TrainingRows,
        generator,
        *,
        pass_rows=False,
        average: ParameterAverage | None = None,
    ) -> float:
        """One shuffled pass of minibatch steps; returns the mean loss.

        ``average``, when given, is updated after every step.
        """
        model.train()
        n_rows = len(rows)
        batch_size = min(self.batch_size, n_rows)
        order = torch.randperm(n_rows, generator=generator).to(rows.device)
        # One running sum, not a list of per-step scalars: tensors kept alive
        # across steps pin the heap above each step's freed temporaries, and
        # the process grew by ~0.4 MB per step (~130 MB per epoch at 400k rows).
        total = torch.zeros((), dtype=rows.dtype, device=rows.device)
        n_batches = 0
        for first in range(0, n_rows, batch_size):
            positions = order[first : first + batch_size]
            total += self._optimizer_step(
                model,
                optimizers,
                rows.take(positions),
                generator,
                rows=positions if pass_rows else None,
            )
            if average is not None:
                average.update()
            n_batches += 1
        return (total / n_batches).item()

    def _begin_epoch(self, model, epoch: int) -> None:
        """Called before each training epoch (0-based); e.g. for KL warm-up."""

    def _decay_patience(self) -> int:
        return max(1, self.n_iter_no_change // 2)

    def _optimizer_step(self, model, optimizers, batch, generator, rows=None):
        if len(optimizers) == 1:
            (optimizer,) = optimizers
            optimizer.zero_grad(set_to_none=True)
            loss = self._training_loss(model, batch, generator=generator, rows=rows)
            loss.backward()
            optimizer.step()
            return loss.detach()
        # Alternating SGD: theta then sigma^2, each at the other's latest value.
        loss = None
        for optimizer in optimizers:
            model.zero_grad(set_to_none=True)
            step_loss = self._training_loss(
                model, batch, generator=generator, rows=rows
            )
            step_loss.backward()
            optimizer.step()
            loss = step_loss.detach() if loss is None else loss
        return loss

    def _finish(self, run: dict) -> None:
        if not run["has_state"]:
            raise TrainingDivergedError(
                f"{type(self).__name__} diverged in its first epoch: the loss "
                "became non-finite before any finite model existed. Try a smaller "
                "learning_rate_init, float64 input, standardising X, or a larger "
                "initial noise_variance."
            )
        self._store_fitted(run["model"])
        self._store_optimizers(run["optimizers"])
        self.history_ = run["history"]
        self.n_iter_ = max(run["n_iter"], 1)
        self.converged_ = run["converged"]
        self.best_epoch_ = run["best_epoch"]
        if run["failure"] is not None:
            raise TrainingDivergedError(
                f"{type(self).__name__} diverged at epoch {run['failure']}: the "
                "loss became non-finite. The best finite model (epoch "
                f"{run['best_epoch']}) was kept and the estimator is usable. Try a "
                "smaller learning_rate_init, float64 input, standardising X, or "
                "a larger initial noise_variance."
            )
        if not self.converged_ and run["n_iter"] == self.max_iter:
            warnings.warn(
                f"{type(self).__name__} reached max_iter={self.max_iter} epochs "
                "without converging; consider increasing max_iter.",
                ConvergenceWarning,
                stacklevel=4,
            )

    # ------------------------------------------------------------ inference
    def _check_fitted_input(self, X):
        check_is_fitted(self)
        return self._validate(X, reset=False)

    def score(self, X, y=None) -> float:
        """Mean log-likelihood per sample, ``mean(score_samples(X))``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Observations.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        score : float
            Average ``log p(x)`` in nats.
        """
        return float(np.mean(self.score_samples(X)))

    @uses_torch_threads
    def sample(self, n_samples: int = 1, random_state=None, return_latent=False):
        """Draw ``x = g(z) + noise`` with ``z ~ N(0, I)`` from the fitted model.

        Parameters
        ----------
        n_samples : int, default=1
            Number of samples.
        random_state : int, RandomState instance or None, default=None
            Seeds the draws; independent of the estimator's ``random_state``.
        return_latent : bool, default=False
            Also return the latents the samples were decoded from.

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
        Z = rng.standard_normal((n_samples, self.n_components))
        noise = rng.standard_normal((n_samples, self.n_features_in_))
        mean, variance = self._sample_mean_and_variance(Z)
        X = mean + np.sqrt(variance)[:, None] * noise
        return (X, Z) if return_latent else X

    def _sample_mean_and_variance(self, Z: np.ndarray):
        """Decoder mean and per-row observation-noise variance at latents ``Z``."""
        return self._decode(Z), np.full(Z.shape[0], self.noise_variance_)

    @staticmethod
    def _fitted_module(module: torch.nn.Module, dtype: torch.dtype):
        """``module`` in ``dtype``, copied when needed: ``Module.to`` is in place."""
        if next(module.parameters()).dtype == dtype:
            return module
        return copy.deepcopy(module).to(dtype=dtype)

    def _decode(self, Z: np.ndarray) -> np.ndarray:
        param = next(self.decoder_.parameters())
        with torch.no_grad():
            z = torch.tensor(Z, dtype=param.dtype)
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
        from sklearn.utils import check_array

        Z = check_array(X, dtype=[np.float64, np.float32])
        if Z.shape[1] != self.n_components:
            raise ValueError(
                f"inverse_transform expects latents with n_components="
                f"{self.n_components} columns, got {Z.shape[1]}. Pass the output "
                "of transform (or an array of that width)."
            )
        return self._decode(Z).astype(Z.dtype, copy=False)

    def __getstate__(self):
        state = super().__getstate__()
        # Fitted modules always pickle as CPU state.
        for key, value in state.items():
            if isinstance(value, torch.nn.Module):
                state[key] = value.cpu()
        return state


def _mean_feature_variance(data: torch.Tensor) -> float:
    """Mean per-feature variance (1 for constant data), without a copy of ``data``."""
    return float(data.var(dim=0, unbiased=False).mean()) or 1.0


def _averaged(average: ParameterAverage | None):
    """``average.applied()``, or a no-op without averaging."""
    return average.applied() if average is not None else contextlib.nullcontext()


def _state_to_cpu(state):
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {key: _state_to_cpu(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_state_to_cpu(value) for value in state)
    return state


def _scale_learning_rates(optimizers, factor: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= factor


def _is_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
