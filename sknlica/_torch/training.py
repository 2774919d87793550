"""The training engine: minibatch epochs, early stopping, and the best model kept.

:func:`train` runs the epochs of one fit of one model: a shuffled pass of
minibatch steps, a finiteness check, per-epoch scores (of the averaged
parameters, when averaging), a snapshot of the best epoch, a learning-rate
plateau, and the stopping rule.  It knows nothing about what is trained: an
:class:`Objective` supplies the minibatch loss, the per-epoch scores, an
epoch schedule (driven by the model's total epoch count, so that a warm
start or a sequence of ``partial_fit`` calls continues a schedule instead
of repeating it) and a hook before each optimiser step (gradient clipping).

Nothing here imports scikit-learn.  Benchmarks may time
:func:`optimizer_step` on its own: it is the bare step the estimators take.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from sknlica._torch.averaging import ParameterAverage

#: Learning rates are multiplied by this after every ``n_iter_no_change // 2``
#: epochs without improvement (a plateau schedule, as ReduceLROnPlateau), so
#: the last epochs refine rather than oscillate.
LEARNING_RATE_DECAY = 0.5

#: History keys the stopping rule and restarts maximise: the held-out score
#: when there is a validation set, else the training one.
VALIDATION_SCORE = "validation_log_likelihood"
TRAIN_SCORE = "train_log_likelihood"


class Objective:
    """What :func:`train` trains: a loss, per-epoch scores, and two hooks.

    Subclasses implement :meth:`loss` and :meth:`epoch_scores`; the hooks
    default to doing nothing.  An objective owns whatever state its loss
    needs across steps (node samplers, mode caches, KL weights).
    """

    def begin_epoch(self, epoch: int) -> None:
        """Called before each epoch with the model's total epoch count so far."""

    def loss(self, model, batch: torch.Tensor, rows: torch.Tensor | None):
        """The minibatch loss to minimise (a scalar tensor).

        ``rows`` holds the batch's positions among the training rows, stable
        across the epochs of one fit, for per-row state such as warm starts;
        ``None`` when positions are not stable (``partial_fit``).
        """
        raise NotImplementedError

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called after the backward pass, before ``optimizer.step()``."""

    def epoch_scores(self, model, rows, validation, train_objective) -> dict:
        """History entries of an epoch; must include :data:`TRAIN_SCORE` and,
        when ``validation`` is given, :data:`VALIDATION_SCORE`."""
        raise NotImplementedError

    def end_epoch(self, entry: dict) -> None:
        """Called with the epoch's history entry, e.g. to switch rules."""


class WeightPenalty:
    """``0.5 * alpha * sum ||W||^2 / n_rows`` over a module's linear weights.

    ``MLPRegressor``'s ``alpha``: an L2 penalty on the weights (not the
    biases), divided by the number of training rows so that it adds to a
    mean per-row loss as it adds to a total in a posterior.
    """

    def __init__(self, module: torch.nn.Module, alpha: float, n_rows: int) -> None:
        self.weights = [
            layer.weight
            for layer in module.modules()
            if isinstance(layer, torch.nn.Linear)
        ]
        self.scale = 0.5 * alpha / max(1, n_rows)

    def __call__(self) -> torch.Tensor:
        return self.scale * sum(weight.square().sum() for weight in self.weights)


class WrappedObjective(Objective):
    """An objective that changes part of another: everything it does not
    override (scores, hooks, attributes) is the wrapped ``objective``'s."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective

    def __getattr__(self, name):
        # Only called for attributes not found here (validation_scores,
        # trains_adaptively, ...); through __dict__, so that a half-built
        # copy does not recurse.
        return getattr(self.__dict__["objective"], name)

    def begin_epoch(self, epoch: int) -> None:
        self.objective.begin_epoch(epoch)

    def loss(self, model, batch, rows):
        return self.objective.loss(model, batch, rows)

    def before_step(self, optimizer) -> None:
        self.objective.before_step(optimizer)

    def epoch_scores(self, model, rows, validation, train_objective) -> dict:
        return self.objective.epoch_scores(model, rows, validation, train_objective)

    def end_epoch(self, entry: dict) -> None:
        self.objective.end_epoch(entry)


class PenalisedObjective(WrappedObjective):
    """An objective whose loss carries a :class:`WeightPenalty`."""

    def __init__(self, objective: Objective, penalty: WeightPenalty) -> None:
        super().__init__(objective)
        self.penalty = penalty

    def loss(self, model, batch, rows):
        return self.objective.loss(model, batch, rows) + self.penalty()


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
    transform : callable or None
        Applied to every gathered minibatch (the standardisation of
        ``sknlica._torch.standardisation``), so it never needs a copy of all
        the data.
    groups : torch.Tensor of int64 or None
        A group (segment) per training row: minibatches then never mix
        groups (see :func:`minibatches`).
    """

    def __init__(
        self,
        data: torch.Tensor,
        index: torch.Tensor | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        groups: torch.Tensor | None = None,
    ):
        self.data = data
        self.index = index
        self.transform = transform
        self.groups = groups
        #: Gathered rows are cast to this dtype (``None``: the data's).
        self._dtype: torch.dtype | None = None

    def __len__(self) -> int:
        return self.data.shape[0] if self.index is None else self.index.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.data.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype or self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def as_dtype(self, dtype: torch.dtype) -> TrainingRows:
        """The same rows, gathered in ``dtype`` (the data are not copied)."""
        if dtype == self.dtype:
            return self
        rows = TrainingRows(self.data, self.index, self.transform, self.groups)
        rows._dtype = dtype
        return rows

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows at ``positions`` (0-based among the training rows), copied and
        passed through ``transform`` (the standardisation) if there is one."""
        if self.index is not None:
            positions = self.index[positions]
        rows = self.data[positions]
        if self._dtype is not None:
            rows = rows.to(self._dtype)
        return rows if self.transform is None else self.transform(rows)

    def subset(self, positions: torch.Tensor) -> TrainingRows:
        """The training rows at ``positions`` (0-based among these rows), as
        rows of their own, gathered the same way (no copy of the data)."""
        index = positions if self.index is None else self.index[positions]
        groups = None if self.groups is None else self.groups[positions]
        return TrainingRows(self.data, index, self.transform, groups).as_dtype(
            self.dtype
        )


def training_tensor(X: np.ndarray, device: torch.device) -> torch.Tensor:
    """``X`` as a tensor on ``device``, sharing memory on the CPU.

    Training only ever reads rows (minibatches are gathered copies), so the
    caller's array -- even a read-only or memory-mapped one -- is safe to
    share, and memory stays flat in the number of rows.
    """
    if device.type != "cpu":
        return torch.as_tensor(X, device=device)
    with warnings.catch_warnings():
        # Read-only input (e.g. a memory map): we never write to it.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(np.ascontiguousarray(X))


def mean_feature_variance(feature_variance: torch.Tensor) -> float:
    """The mean of per-feature variances (1 for constant data), e.g. of
    ``data.var(dim=0, unbiased=False)``."""
    return float(feature_variance.mean()) or 1.0


def make_optimizer(
    solver: str,
    parameters: list[torch.nn.Parameter],
    noise_parameters: list[torch.nn.Parameter],
    *,
    learning_rate: float,
    noise_learning_rate: float | None,
) -> torch.optim.Optimizer:
    """Adam over all the parameters, or SGD with its own step for the noise.

    ``noise_learning_rate=None`` steps the noise parameters at
    ``learning_rate``; Adam ignores it (it is invariant to gradient scale).
    """
    if solver == "adam":
        return torch.optim.Adam(parameters + noise_parameters, lr=learning_rate)
    groups = [
        {"params": params, "lr": lr}
        for params, lr in (
            (parameters, learning_rate),
            (noise_parameters, noise_learning_rate or learning_rate),
        )
        if params
    ]
    return torch.optim.SGD(groups, lr=learning_rate)


def clip_gradient_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Rescale the optimizer's gradients to total 2-norm ``max_norm`` if above it.

    ``torch.nn.utils.clip_grad_norm_`` computes the norm tensor by tensor on
    the CPU and always rescales (by 1 when the cap does not bind): 60 us per
    step against 22 us here, 3% of a default IWAE step.  The same result
    whenever the norm is finite.  Unlike it, a non-finite gradient (NaN or
    infinite entries) is left alone, so that the step fails the finiteness
    check and training stops with an error instead of silently zeroing the
    gradients; a norm that overflows only in float32, all entries finite, is
    recomputed in float64 and the gradients rescaled.
    """
    grads = [
        p.grad
        for group in optimizer.param_groups
        for p in group["params"]
        if p.grad is not None
    ]
    if not grads:
        return
    total = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
    if math.isinf(total):
        norms = [torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]
        total = float(torch.linalg.vector_norm(torch.stack(norms)))
    if math.isfinite(total) and total > max_norm:
        torch._foreach_mul_(grads, max_norm / (total + 1e-6))


def optimizer_step(
    model: torch.nn.Module,
    objective: Objective,
    optimizers: list[torch.optim.Optimizer],
    batch: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """One minibatch step; returns the (first) loss, detached.

    With several optimizers they take turns on the same batch, each at the
    others' latest values (the report's alternating schemes): zero the
    gradients, evaluate the loss afresh, backward, hook, step.
    """
    loss = None
    for optimizer in optimizers:
        model.zero_grad(set_to_none=True)
        step_loss = objective.loss(model, batch, rows)
        step_loss.backward()
        objective.before_step(optimizer)
        optimizer.step()
        if loss is None:
            loss = step_loss.detach()
    return loss


def run_epoch(
    model: torch.nn.Module,
    objective: Objective,
    optimizers: list[torch.optim.Optimizer],
    rows: TrainingRows,
    generator: torch.Generator,
    *,
    batch_size: int,
    track_rows: bool,
    average: ParameterAverage | None = None,
) -> float:
    """One shuffled pass of minibatch steps; returns the mean loss.

    ``average``, when given, is updated after every step.
    """
    model.train()
    # One running sum, not a list of per-step scalars: tensors kept alive
    # across steps pin the heap above each step's freed temporaries, and the
    # process grew by ~0.4 MB per step (~130 MB per epoch at 400k rows).
    total = torch.zeros((), dtype=rows.dtype, device=rows.device)
    n_batches = 0
    for positions in minibatches(rows, batch_size, generator):
        total += optimizer_step(
            model,
            objective,
            optimizers,
            rows.take(positions),
            positions if track_rows else None,
        )
        if average is not None:
            average.update()
        n_batches += 1
    return (total / n_batches).item()


def minibatches(rows: TrainingRows, batch_size: int, generator: torch.Generator):
    """The positions of one epoch's minibatches, in a random order.

    Without groups: a shuffled pass in batches of ``batch_size`` (the last
    one smaller).  With groups (the segments of a conditional prior), every
    batch holds rows of one group only, so that a step evaluates one
    segment's decoder: each group's shuffled rows are split into the fewest
    near-equal batches of at most ``batch_size``, and the batches of all
    groups are visited in a random order.  Measured on 40 segments, the
    mixed batches cost 12-18x the unconditional epoch (one decoder pass per
    segment present); segment-pure ones about 1x.
    """
    n_rows = len(rows)
    batch_size = min(batch_size, n_rows)
    order = torch.randperm(n_rows, generator=generator)
    if rows.groups is None:
        order = order.to(rows.device)
        return [
            order[first : first + batch_size] for first in range(0, n_rows, batch_size)
        ]
    # A stable sort by group keeps the shuffled order within each group.
    order = order[torch.sort(rows.groups[order], stable=True).indices]
    sizes = torch.bincount(rows.groups, minlength=int(rows.groups.max()) + 1)
    batches = []
    for block in torch.split(order, sizes.tolist()):
        if len(block):
            n_batches = -(-len(block) // batch_size)
            batches += list(torch.tensor_split(block, n_batches))
    visit = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[index].to(rows.device) for index in visit]


@dataclass
class TrainingSettings:
    """How :func:`train` runs: the estimator's loop parameters."""

    max_iter: int
    batch_size: int
    tol: float
    n_iter_no_change: int
    ema_decay: float
    verbose: bool = False
    description: str = "training"
    #: The solver's name, recorded as each history entry's ``phase``.
    phase: str = "adam"
    #: Pass each batch's row positions to the loss (stable within one fit).
    track_rows: bool = True
    #: Epochs the model trained before this call: the objective's schedule
    #: continues from here (warm starts, ``partial_fit``).
    epochs_before: int = 0
    #: History entries before this call: the entries' ``epoch`` numbers
    #: continue from here (``partial_fit`` appends to ``history_``).
    entries_before: int = 0


@dataclass
class TrainingRun:
    """What one call of :func:`train` produced."""

    model: torch.nn.Module
    optimizers: list[torch.optim.Optimizer]
    #: One dict per completed epoch.
    history: list[dict] = field(default_factory=list)
    #: Best monitored score (``-inf`` when no epoch completed).
    score: float = -math.inf
    #: 1-based epoch of the kept parameters (0: none).
    best_epoch: int = 0
    #: Whether the stopping rule fired.
    converged: bool = False
    #: 1-based epoch whose loss or parameters became non-finite, if any.
    failed_epoch: int | None = None
    #: Whether a KeyboardInterrupt ended the run.
    interrupted: bool = False

    @property
    def has_model(self) -> bool:
        """Whether a finite epoch completed (its parameters are in ``model``)."""
        return self.best_epoch > 0


def train(
    model: torch.nn.Module,
    objective: Objective,
    optimizers: list[torch.optim.Optimizer],
    rows: TrainingRows,
    validation: torch.Tensor | None,
    generator: torch.Generator,
    settings: TrainingSettings,
    *,
    score_to_beat: float = -math.inf,
) -> TrainingRun:
    """Train ``model`` for up to ``settings.max_iter`` epochs; keep the best.

    Every epoch: :meth:`Objective.begin_epoch`, one pass of minibatch steps
    (updating the parameter average), then, if the loss and parameters are
    finite, the epoch's scores of the averaged parameters
    (:meth:`Objective.epoch_scores` plus ``noise_variance``), a snapshot if
    the monitored score is the best so far, :meth:`Objective.end_epoch`, and
    the plateau and stopping rules on the monitored score (improvements of
    at most ``tol`` do not count).  A non-finite epoch or a
    ``KeyboardInterrupt`` ends the run; either way ``model`` ends holding the
    best epoch's parameters, if any epoch completed.

    ``score_to_beat`` is a best score from before this call (:func:`extend`):
    an epoch counts as an improvement, and is kept, only above it; a run
    that never beats it keeps no parameters (``best_epoch`` 0).
    """
    average = (
        ParameterAverage(model, settings.ema_decay) if settings.ema_decay else None
    )
    score_key = VALIDATION_SCORE if validation is not None else TRAIN_SCORE
    run = TrainingRun(model=model, optimizers=optimizers, score=score_to_beat)
    best_state = None
    no_improvement = 0
    patience = max(1, settings.n_iter_no_change // 2)
    start = time.perf_counter()
    bar = tqdm(
        range(settings.max_iter),
        disable=not settings.verbose,
        desc=settings.description,
        leave=False,
    )
    try:
        for epoch in bar:
            objective.begin_epoch(settings.epochs_before + epoch)
            train_loss = run_epoch(
                model,
                objective,
                optimizers,
                rows,
                generator,
                batch_size=settings.batch_size,
                track_rows=settings.track_rows,
                average=average,
            )
            if not math.isfinite(train_loss) or not is_finite(model):
                run.failed_epoch = epoch + 1
                break
            model.eval()
            # Scored, selected and kept: the averaged parameters.
            with torch.no_grad(), _averaged(average):
                entry = {
                    "epoch": settings.entries_before + epoch + 1,
                    "phase": settings.phase,
                    "train_objective": -train_loss,
                }
                entry.update(
                    objective.epoch_scores(model, rows, validation, -train_loss)
                )
                # The mean over features for per-feature variances.
                entry["noise_variance"] = float(model.noise().mean())
                score = entry[score_key]
                if score > run.score:
                    best_state = copy.deepcopy(model.state_dict())
            objective.end_epoch(entry)
            entry["seconds"] = time.perf_counter() - start
            run.history.append(entry)
            bar.set_postfix({score_key: f"{score:.4f}"})
            if score > run.score + settings.tol:
                no_improvement = 0
            else:
                no_improvement += 1
                if no_improvement % patience == 0:
                    scale_learning_rates(optimizers, LEARNING_RATE_DECAY)
            if score > run.score:
                run.score, run.best_epoch = score, epoch + 1
            if no_improvement >= settings.n_iter_no_change:
                run.converged = True
                break
    except KeyboardInterrupt:
        run.interrupted = True
    finally:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return run


def extend(
    run: TrainingRun,
    objective: Objective,
    rows: TrainingRows,
    validation: torch.Tensor | None,
    generator: torch.Generator,
    settings: TrainingSettings,
) -> TrainingRun:
    """``run`` trained on to ``settings.max_iter`` epochs in all, as one run.

    The epochs continue from ``run``'s kept (best) parameters, with its
    optimisers' state and the objective's schedule; the history, epoch
    numbers and seconds run on.  The combined run keeps the better of its
    parts' best parameters.  A run that stopped (converged, interrupted,
    diverged) or used its epochs is returned as it is.  This is how a
    screened restart (``n_init="auto"``) continues the best initialisation.
    """
    done = len(run.history)
    finished = run.converged or run.interrupted or run.failed_epoch is not None
    if finished or not run.has_model or done >= settings.max_iter:
        return run
    kept = copy.deepcopy(run.model.state_dict())
    more = train(
        run.model,
        objective,
        run.optimizers,
        rows,
        validation,
        generator,
        replace(
            settings,
            max_iter=settings.max_iter - done,
            epochs_before=settings.epochs_before + done,
            entries_before=settings.entries_before + done,
        ),
        score_to_beat=run.score,
    )
    elapsed = run.history[-1]["seconds"]
    for entry in more.history:
        entry["seconds"] += elapsed
    combined = TrainingRun(
        model=run.model,
        optimizers=run.optimizers,
        history=run.history + more.history,
        converged=more.converged,
        interrupted=more.interrupted,
        failed_epoch=None if more.failed_epoch is None else done + more.failed_epoch,
    )
    if more.has_model:  # an epoch beat the first part's best
        combined.score, combined.best_epoch = more.score, done + more.best_epoch
    else:
        run.model.load_state_dict(kept)
        combined.score, combined.best_epoch = run.score, run.best_epoch
    return combined


def _averaged(average: ParameterAverage | None):
    """``average.applied()``, or a no-op without averaging."""
    return average.applied() if average is not None else contextlib.nullcontext()


def scale_learning_rates(optimizers, factor: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= factor


def is_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def state_to_cpu(state):
    """A CPU copy of an optimizer or module state (nested dicts, lists, tensors)."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {key: state_to_cpu(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(state_to_cpu(value) for value in state)
    return state
