"""NonlinearICAMLE: direct maximum likelihood, integrating z out in log space."""

from __future__ import annotations

import copy
import math
from numbers import Integral, Real

import torch
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from sknlica._base import (
    NOISE_VARIANCE_FLOOR,
    BaseNonlinearICA,
    uses_torch_threads,
)
from sknlica._marginal import decode_nodes
from sknlica._torch.adaptive import (
    AdaptiveNodeSampler,
    adapted_proposal,
    adaptive_chunked,
    adaptive_resample,
    importance_log_weights,
    log_joint,
    prior_start,
    proposal_normals,
)
from sknlica._torch.integration import RULES, PriorNodeSampler, prior_rule
from sknlica._torch.likelihood import (
    CHUNK_ELEMENTS,
    GRADIENTS,
    chunk_rows,
    log_joint_weights,
)
from sknlica._torch.networks import NoiseVariance, make_mlp
from sknlica._torch.posterior import mala

#: Seed of the node set used by ``score_samples``, ``transform`` and
#: ``sample_posterior``: fixed so that they are deterministic and every row is
#: evaluated on the same nodes (subset invariance).
EVALUATION_SEED = 0


#: The per-epoch validation score uses this many times ``n_nodes`` fixed nodes.
VALIDATION_NODE_FACTOR = 4

#: Rows whose posterior weights over the prior evaluation nodes have an
#: effective sample size below this switch to the adaptive rule.  Measured on
#: the report's relu and tanh generators (m = 2, n = 10, sigma 0.1-1, the
#: 16,384-node grid): every row with ESS >= 30 had |error| <= 0.014 nats
#: (mean <= 0.01); the rows with errors up to 3 nats all had ESS < 30.
ESS_THRESHOLD = 30.0

#: Proposal nodes per row when the adaptive rule evaluates a row; 1,024 met
#: the 0.01 nats target in tests/test_adaptive.py, 2x for margin.
ADAPTIVE_EVAL_NODES = 2048

#: Proposal nodes per low-ESS row in the per-epoch validation score while
#: training is adaptive: 256 measured 0.011-0.017 nats/row mean error against
#: dense quadrature (``benchmarks/results/adaptive.md``), plenty to stop on,
#: at an eighth of the cost of :data:`ADAPTIVE_EVAL_NODES`.
VALIDATION_ADAPTIVE_NODES = 256

#: Proposal nodes per row and step for ``integration="adaptive"`` training.
#: The estimate is unbiased for p(x) at any size; 64 keeps a step's decoder
#: work (batch_size * 64 points) moderate.
ADAPTIVE_TRAIN_NODES = 64

#: Gauss-Newton steps per training step.  Fewer than for evaluation: any
#: fixed proposal keeps the estimate unbiased, and the mode search dominated
#: the step's cost at 8 steps.
ADAPTIVE_TRAIN_NEWTON_STEPS = 3


#: Under ``integration="auto"``, training switches to the adaptive rule for
#: low-ESS rows while at least :data:`AUTO_SWITCH_FRACTION` of the validation
#: rows have an ESS below this over the validation nodes (4,096 grid nodes by
#: default), and back when the fraction falls below half of it.  Lower than
#: :data:`ESS_THRESHOLD`: measured at the true model of the report's relu
#: generator (m = 2, n = 20, 500 rows, 4,096 grid nodes, against a dense
#: 600 x 600 grid), at sigma^2 = 1 half the rows have ESS 12-25, yet the
#: grid's mean error is 0.001 nats/row and no row has ESS < 5.  At sigma^2 =
#: 0.1, 0.04, 0.01, 56%, 63%, 70% of the rows have ESS < 5, and the grid's
#: mean error (0.15, 0.52, 3.2) comes almost all from them (rows with ESS >=
#: 5: 0.010, 0.021, 0.089).
AUTO_SWITCH_ESS = 5.0

#: Once ``"auto"`` has switched, minibatch rows whose ESS over the training
#: nodes is below this are integrated adaptively, the others by the prior rule.
MIXED_ESS_THRESHOLD = ESS_THRESHOLD

#: Fraction of low-ESS validation rows (see :data:`AUTO_SWITCH_ESS`) at which
#: ``"auto"`` training switches to the adaptive rule for low-ESS rows.  In the
#: benchmark (``benchmarks/bench_adaptive.py``) it stays 0 in every epoch of
#: the sigma^2 = 1 default fit and passes 0.1 after epoch 12 of the sigma^2 =
#: 0.04 fit (sigma^2 = 0.40 then); switching at 0.02 instead gave the same
#: gaps (0.200 and 0.162 against 0.202 and 0.153, seeds 0 and 1, measured
#: before parameter averaging).
AUTO_SWITCH_FRACTION = 0.1

#: Gauss-Newton steps per training step when a row's search starts from its
#: previous epoch's mode (warm start) instead of the best prior node.
ADAPTIVE_WARM_NEWTON_STEPS = 1


class _MLEModel(torch.nn.Module):
    """Decoder, noise variance and the training node sampler, trained together.

    Besides the trained modules it carries the adaptive rule's training state,
    as plain attributes (outside ``state_dict``, so best-epoch snapshots do not
    copy it, and never stored on the fitted estimator): ``adaptive_sampler``
    (the proposal's QMC normals, built when first needed), ``low_ess_rule``
    (whether ``"auto"`` currently trains low-ESS rows adaptively) and
    ``modes``, each training row's latest posterior mode (``(n_train, m)``,
    NaN until visited) that warm-starts the next epoch's mode search.
    """

    def __init__(
        self, decoder: torch.nn.Module, noise: NoiseVariance, sampler: PriorNodeSampler
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.noise = noise
        self.sampler = sampler
        self.adaptive_sampler = (
            sampler if isinstance(sampler, AdaptiveNodeSampler) else None
        )
        self.low_ess_rule = False
        self.modes = None


class NonlinearICAMLE(BaseNonlinearICA):
    r"""Nonlinear ICA with Gaussian latents by direct maximum likelihood.

    The model is :math:`z \sim N(0, I_m)`, :math:`x \mid z \sim N(g(z),
    \sigma^2 I_n)` with :math:`g` a multilayer perceptron.  The marginal
    log-likelihood

    .. math:: \ell(\theta, \sigma^2) = \sum_i \log \int \varphi(x_i; g(z),
              \sigma^2 I)\, \varphi(z; 0, I)\, dz

    is approximated in log space by ``logsumexp_j [log w_j + log phi(x_i;
    g(z_j), sigma^2 I)]`` over integration nodes ``z_j`` with log-weights
    ``log w_j``, and maximised by minibatch stochastic gradient ascent.

    Parameters
    ----------
    n_components : int, default=2
        Latent dimension ``m``.
    hidden_layer_sizes : tuple of int, default=(64,)
        Hidden layers of the decoder MLP; ``()`` gives ``g(z) = act(W z + b)``.
    activation : str, default="relu"
        One of "relu", "tanh", "sigmoid", "leaky_relu", "gelu", "identity".
        Hidden-layer activation.
    output_activation : str, default="identity"
        One of the ``activation`` names.
        Applied after the decoder's last linear layer.  With
        ``hidden_layer_sizes=()`` and ``output_activation="relu"`` the decoder
        family is exactly the report's data-generating process.
    integration : str, default="auto"
        One of "auto", "qmc", "monte_carlo", "grid", "gauss_hermite", "adaptive".
        Integration rule for training: ``"monte_carlo"`` draws
        fresh N(0, I) nodes every step; ``"qmc"`` uses scrambled Sobol points
        through the normal inverse CDF with a fresh random shift every step;
        ``"grid"`` is the report's uniform grid on ``[-2.5, 2.5]^m`` *with the
        prior density in the weights* (the report's formula omitted it);
        ``"gauss_hermite"`` is the tensor-product Gauss-Hermite rule.
        ``"auto"`` chooses from measurements of each rule's error in log p(x)
        (``benchmarks/bench_integration_rules.py``): ``"grid"`` when it gets
        at least 16 nodes per axis (``m <= 2`` at the default budget), where
        it is 10 to 100 times more accurate per node than QMC on the report's
        generators, else ``"qmc"``; and it re-decides after every epoch
        whether that prior rule is accurate enough.  When at least 10% of the
        validation rows have an effective sample size below 5 over the
        validation nodes (small noise; in the benchmark, once sigma^2 had
        shrunk to about 0.4), the following epochs integrate each minibatch row
        whose ESS over the training nodes is below 30 by the ``"adaptive"``
        rule (the others keep the prior rule), until the fraction falls below
        5%.  Without a validation split (``early_stopping=False``,
        ``partial_fit``) it keeps the prior rule.  ``"adaptive"`` is
        posterior-adapted importance sampling for small noise, for every row
        and step: the posterior mode of ``log p(x, z)`` is found by damped
        Gauss-Newton steps (3 from the best of the ``n_nodes`` prior nodes,
        or 1 from the better of that node and the row's mode of the previous
        epoch), and 64 nodes are drawn from the defensive mixture ``0.5
        N(mode, 4 H^{-1}) + 0.375 N(mu, 4 (C + H^{-1})) + 0.125 N(0, I)``
        (``H = J^T J / sigma^2 + I``; ``mu``, ``C`` the posterior moments
        under the prior nodes), held fixed within the step; see the user
        guide.  Adaptive training uses autograd whatever ``gradient`` says.
    n_nodes : int, default=1024
        Total number of training nodes; grid rules use ``round(n_nodes **
        (1/m))`` per axis.  With ``"adaptive"``, the nodes of the prior rule
        that starts each row's mode search.
    n_eval_nodes : int, default=16384
        Nodes of the evaluation rule used by ``score_samples``, ``transform``
        and ``sample_posterior``: the ``"auto"`` rule (grid with at least 16
        nodes per axis, else scrambled Sobol points with a fixed seed)
        whatever was used for training, so the same nodes serve every row.
        A row whose posterior weights over these nodes have an effective
        sample size below 30 (the prior rule would be inaccurate: small
        noise) is evaluated instead by the adaptive rule with 2,048
        posterior-adapted nodes, started from its best evaluation node.  The
        decision is per row, so a row's result never depends on the others.
        The per-epoch validation score uses ``min(4 * n_nodes,
        n_eval_nodes)`` such nodes; its low-ESS rows are refined adaptively
        (with 256 nodes) only while training is adaptive.
    grid_half_width : float, default=None
        Half-width ``l`` of the ``"grid"`` rule's box ``[-l, l]^m``.  ``None``
        scales it with the nodes per axis ``k`` as ``0.6 * sqrt(k)`` (the best
        measured trade-off between truncating the prior's tails and grid
        spacing); ``2.5`` is the report's grid.
    gradient : {"autograd", "analytic"}, default="autograd"
        ``"autograd"`` backpropagates through the logsumexp; ``"analytic"``
        uses the report's section 3.1 formulas with normalised posterior
        weights, followed by one vector-Jacobian product through ``g``.  Both
        give the same gradient up to round-off.
    noise_variance : float, default=1.0
        Initial (or, with ``learn_noise_variance=False``, fixed) ``sigma^2``.
    learn_noise_variance : bool, default=True
        Learn ``sigma^2 = floor + exp(s)``; the floor is ``1e-6`` times the
        mean feature variance of the training data.
    solver : {"adam", "sgd"}, default="adam"
        ``"sgd"`` is the report's Algorithm 1: plain gradient ascent
        alternating a step on the decoder and a step on ``sigma^2``.
    learning_rate_init : float, default=3e-3
        Step size (of the decoder step, for ``"sgd"``).
    noise_learning_rate : float, default=None
        Step size of the ``sigma^2`` step for ``solver="sgd"``; ``None`` uses
        ``learning_rate_init``.  Ignored by ``"adam"``.
    batch_size : int, default=128
        Minibatch size (clipped to the number of training rows).
    max_iter : int, default=200
        Maximum number of epochs.
    tol : float, default=1e-3
        Improvement in nats per sample of the monitored score below which an
        epoch counts as no improvement.
    early_stopping : bool, default=True
        Hold out ``validation_fraction`` of the data, monitor its
        log-likelihood, and keep the best epoch's model.  When ``False`` the
        epoch-average training log-likelihood is monitored.
    validation_fraction : float, default=0.1
        Fraction of rows held out when ``early_stopping=True``.
    n_iter_no_change : int, default=10
        Epochs without improvement of more than ``tol`` before stopping.
    ema_decay : float, default=0.998
        Decay of the exponential moving average of the parameters (Polyak
        averaging) that ``fit`` scores every epoch, selects and keeps; ``0``
        keeps the raw iterates.  The average spans about the last ``1 / (1 -
        ema_decay)`` minibatch steps (500), fewer early in training.  It
        removes the optimiser's jitter, which grows as ``sigma^2`` shrinks
        (see the user guide).  ``partial_fit`` does not average.
    n_init : int, default=1
        Number of initialisations; the best (highest monitored score) is kept.
    warm_start : bool, default=False
        Continue from the previous fit's parameters.
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
        Seeds initialisation, shuffling, the validation split and the node
        draws through a private ``torch.Generator``; global RNGs are untouched.

    Attributes
    ----------
    decoder_ : torch.nn.Module
        The fitted decoder ``g`` (on the CPU).
    noise_variance_ : float
        Fitted ``sigma^2``.
    n_iter_ : int
        Epochs run.
    converged_ : bool
        Whether the stopping rule fired before ``max_iter``.
    best_epoch_ : int
        Epoch whose parameters were kept.
    history_ : list of dict
        One dict per epoch: ``epoch``, ``train_objective`` and
        ``train_log_likelihood`` (the epoch's average training
        log-likelihood), ``validation_log_likelihood`` (when held out),
        ``noise_variance`` and ``seconds`` since the fit started; with a
        validation split also ``low_ess_fraction`` (the fraction of
        validation rows with ESS below 5, on which ``"auto"`` decides) and
        ``adaptive_training`` (whether the epoch trained with the adaptive
        rule).  ``validation_log_likelihood`` and ``low_ess_fraction`` are of
        the averaged parameters (``ema_decay``), the training entries of the
        raw iterates.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during fit, when ``X`` has string column names.

    See Also
    --------
    sknlica.marginal_log_likelihood : The same likelihood for any decoder.

    References
    ----------
    The report "MLE/VAE for Nonlinear ICA", sections 1 and 3.1.

    Examples
    --------
    >>> from sknlica import NonlinearICAMLE
    >>> from sknlica.datasets import make_nonlinear_ica
    >>> X, Z = make_nonlinear_ica(500, n_components=2, n_features=5, random_state=0)
    >>> mle = NonlinearICAMLE(max_iter=5, random_state=0).fit(X)
    >>> mle.transform(X).shape
    (500, 2)
    >>> bool(mle.score(X) < 0)
    True
    """

    _parameter_constraints: dict = {
        **BaseNonlinearICA._parameter_constraints,
        "integration": [StrOptions({"auto", "adaptive", *RULES})],
        "n_nodes": [Interval(Integral, 1, None, closed="left")],
        "n_eval_nodes": [Interval(Integral, 1, None, closed="left")],
        "gradient": [StrOptions(set(GRADIENTS))],
        "grid_half_width": [Interval(Real, 0, None, closed="neither"), None],
    }

    def __init__(
        self,
        n_components=2,
        *,
        hidden_layer_sizes=(64,),
        activation="relu",
        output_activation="identity",
        integration="auto",
        n_nodes=1024,
        n_eval_nodes=16384,
        grid_half_width=None,
        gradient="autograd",
        noise_variance=1.0,
        learn_noise_variance=True,
        solver="adam",
        learning_rate_init=3e-3,
        noise_learning_rate=None,
        batch_size=128,
        max_iter=200,
        tol=1e-3,
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=10,
        ema_decay=0.998,
        n_init=1,
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
        self.integration = integration
        self.n_nodes = n_nodes
        self.n_eval_nodes = n_eval_nodes
        self.grid_half_width = grid_half_width
        self.gradient = gradient
        self.noise_variance = noise_variance
        self.learn_noise_variance = learn_noise_variance
        self.solver = solver
        self.learning_rate_init = learning_rate_init
        self.noise_learning_rate = noise_learning_rate
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.ema_decay = ema_decay
        self.n_init = n_init
        self.warm_start = warm_start
        self.device = device
        self.n_threads = n_threads
        self.verbose = verbose
        self.random_state = random_state

    # ------------------------------------------------------------- training
    def _build_model(self, n_features, *, scale, dtype, device, generator):
        decoder = make_mlp(
            self.n_components,
            tuple(self.hidden_layer_sizes),
            n_features,
            activation=self.activation,
            output_activation=self.output_activation,
            dtype=dtype,
            device=device,
            generator=generator,
        )
        noise = NoiseVariance(
            self.noise_variance,
            learn=self.learn_noise_variance,
            floor=NOISE_VARIANCE_FLOOR * scale,
            dtype=dtype,
            device=device,
        )
        return _MLEModel(decoder, noise, self._node_sampler(generator, dtype, device))

    def _node_sampler(self, generator, dtype, device):
        if self.integration == "adaptive":
            start_rule = prior_rule(
                "auto",
                self.n_components,
                self.n_nodes,
                generator=generator,
                dtype=dtype,
                device=device,
            )
            return AdaptiveNodeSampler(
                start_rule,
                self.n_components,
                ADAPTIVE_TRAIN_NODES,
                generator=generator,
                dtype=dtype,
                device=device,
            )
        return PriorNodeSampler(
            self.integration,
            self.n_components,
            self.n_nodes,
            generator=generator,
            dtype=dtype,
            device=device,
            half_width=self.grid_half_width,
        )

    def _model_from_fitted(self, *, dtype, device, generator):
        sampler = self._node_sampler(generator, dtype, device)
        # Train a copy: the fitted decoder_ stays intact if this fit fails.
        model = _MLEModel(
            copy.deepcopy(self.decoder_), copy.deepcopy(self.noise_), sampler
        )
        return model.to(dtype=dtype, device=device)

    def _training_loss(self, model, batch, *, generator, rows=None):
        if self.integration == "adaptive":
            return self._adaptive_training_loss(model, batch, rows)
        nodes, log_weights = model.sampler.draw()
        g = model.decoder(nodes)
        if model.low_ess_rule:
            return self._mixed_training_loss(
                model, batch, nodes, log_weights, g, generator, rows
            )
        log_marginal = GRADIENTS[self.gradient](batch, g, log_weights, model.noise())
        return -log_marginal.mean()

    def _adaptive_training_loss(self, model, batch, rows):
        noise = model.noise()
        with torch.no_grad():
            start_nodes, start_log_weights = model.sampler.start_rule
            start = prior_start(
                batch,
                start_nodes,
                model.decoder(start_nodes),
                start_log_weights,
                noise,
            )
        return -self._adaptive_log_marginal(model, batch, start, rows).mean()

    def _mixed_training_loss(
        self, model, batch, nodes, log_weights, g, generator, rows
    ):
        # "auto" once the validation rows say the prior rule is inaccurate:
        # rows whose posterior weights over the training nodes have ESS below
        # MIXED_ESS_THRESHOLD are integrated adaptively, the others keep the prior
        # rule, whose nodes are decoded anyway.  Each row's estimate is valid
        # on its own, so mixing them row by row keeps the loss a sum of
        # log p(x_i) estimates.
        noise = model.noise()
        joint = log_joint_weights(batch, g, log_weights, noise)
        log_marginal = torch.logsumexp(joint, dim=1)
        with torch.no_grad():
            log_posterior = joint - log_marginal[:, None]
            ess = torch.exp(-torch.logsumexp(2 * log_posterior, dim=1))
            low = (ess < MIXED_ESS_THRESHOLD).nonzero().squeeze(1)
        if not len(low):
            return -log_marginal.mean()
        if model.adaptive_sampler is None:
            model.adaptive_sampler = AdaptiveNodeSampler(
                (nodes, log_weights),
                self.n_components,
                ADAPTIVE_TRAIN_NODES,
                generator=generator,
                dtype=batch.dtype,
                device=batch.device,
            )
        start = prior_start(batch[low], nodes, g.detach(), log_weights, noise.detach())
        adaptive = self._adaptive_log_marginal(
            model, batch[low], start, None if rows is None else rows[low]
        )
        return -log_marginal.index_put((low,), adaptive).mean()

    def _adaptive_log_marginal(self, model, batch, start, rows):
        """Per-row adaptive estimate of ``log p(x)``; updates the mode cache.

        The proposal is built without gradients and held fixed: p(x) =
        E_q[p(x, z) / q(z)] for any fixed q, so the estimate's gradient is the
        likelihood's, whatever the mode search converged to.  A row seen in an
        earlier epoch starts from the better (in ``log p(x, z)``) of its cached
        mode and its best prior node, and takes fewer Gauss-Newton steps.
        """
        noise = model.noise()
        point, mean, covariance = start
        n_steps = ADAPTIVE_TRAIN_NEWTON_STEPS
        if rows is not None and ADAPTIVE_WARM_NEWTON_STEPS is not None:
            with torch.no_grad():
                point, warm = self._warm_start(model, batch, point, rows, noise)
            if warm:
                n_steps = ADAPTIVE_WARM_NEWTON_STEPS
        normals, counts = model.adaptive_sampler.draw()
        nodes, log_q, mode = adapted_proposal(
            batch,
            model.decoder,
            noise.detach(),
            (point, mean, covariance),
            normals,
            counts,
            n_steps=n_steps,
        )
        if rows is not None and model.modes is not None:
            model.modes[rows] = mode
        log_w = importance_log_weights(batch, nodes, log_q, model.decoder, noise)
        return torch.logsumexp(log_w, dim=1)

    @staticmethod
    def _warm_start(model, batch, point, rows, noise):
        """Better of each row's cached mode and ``point``; whether all were cached."""
        needed = int(rows.max()) + 1
        if model.modes is None or model.modes.shape[0] < needed:
            grown = batch.new_full((needed, point.shape[1]), math.nan)
            if model.modes is not None:
                grown[: model.modes.shape[0]] = model.modes
            model.modes = grown
        cached = model.modes[rows]
        known = ~torch.isnan(cached).any(dim=1)
        if not known.any():
            return point, False
        candidates = torch.stack([point, torch.where(known[:, None], cached, point)], 1)
        values = log_joint(batch, candidates, model.decoder, noise.detach())
        values = torch.nan_to_num(values, nan=-math.inf)
        best = candidates[torch.arange(len(rows)), values.argmax(dim=1)]
        return best, bool(known.all())

    def _epoch_scores(self, model, X_train, X_val, train_objective):
        scores = {"train_log_likelihood": train_objective}
        if X_val is not None:
            # A fixed node set (so epochs are comparable), 4x the training
            # budget: accurate enough to stop on, far cheaper than n_eval_nodes.
            # Low-ESS rows are refined adaptively only while training is
            # adaptive: at sigma^2 = 1 (relu, n = 20) about half the rows have
            # ESS < 30 in every epoch, though the grid is accurate for them, and
            # refining them every epoch tripled the default fit time (7.9 s ->
            # 21.7 s).
            n_nodes = min(VALIDATION_NODE_FACTOR * self.n_nodes, self.n_eval_nodes)
            refine = self.integration == "adaptive" or model.low_ess_rule
            ll, _, _, _, ess = self._evaluate(
                X_val,
                model.decoder,
                model.noise(),
                n_nodes,
                refine=refine,
                with_mean=False,
                with_ess=True,
                n_adaptive_nodes=VALIDATION_ADAPTIVE_NODES,
            )
            scores["validation_log_likelihood"] = float(ll.mean())
            fraction = (
                float((ess < AUTO_SWITCH_ESS).double().mean()) if len(ll) else 0.0
            )
            scores["low_ess_fraction"] = fraction
            if self.integration == "auto":
                # Re-decided every epoch, as sigma^2 shrinks (or grows), with
                # hysteresis so that the rule does not flip at the threshold.
                if fraction >= AUTO_SWITCH_FRACTION:
                    model.low_ess_rule = True
                elif fraction < AUTO_SWITCH_FRACTION / 2:
                    model.low_ess_rule = False
            scores["adaptive_training"] = refine
        return scores

    def _store_fitted(self, model):
        self.decoder_ = model.decoder.cpu().eval()
        self.noise_ = model.noise.cpu()
        self.noise_variance_ = float(model.noise().detach())

    # ------------------------------------------------------------ inference
    def _evaluation_rule(self, dtype, device, n_nodes=None):
        # The most accurate rule per node, whatever trained the model; a
        # fixed seed makes randomised rules deterministic.
        return prior_rule(
            "auto",
            self.n_components,
            n_nodes or self.n_eval_nodes,
            generator=torch.Generator().manual_seed(EVALUATION_SEED),
            dtype=dtype,
            device=device,
        )

    def _decoded_nodes(self, x, decoder, n_nodes=None):
        """Evaluation nodes, their log-weights and ``g`` at them."""
        nodes, log_weights = self._evaluation_rule(x.dtype, x.device, n_nodes)
        return nodes, log_weights, decode_nodes(decoder, nodes)

    def _log_marginal(self, x, decoder, noise_variance, n_nodes=None):
        return self._evaluate(x, decoder, noise_variance, n_nodes, with_mean=False)[0]

    @torch.no_grad()
    def _evaluate(
        self,
        x,
        decoder,
        noise_variance,
        n_nodes=None,
        *,
        refine=True,
        with_mean=True,
        with_ess=False,
        n_adaptive_nodes=ADAPTIVE_EVAL_NODES,
    ):
        """Per-row ``log p(x)``, posterior mean and whether the row went adaptive.

        Every row is first integrated over the prior evaluation rule; rows
        whose posterior weights there have an effective sample size below
        :data:`ESS_THRESHOLD` are re-evaluated by the adaptive rule, started
        from their best evaluation node (unless ``refine=False``, which only
        flags them).  Decided per row.  Returns ``(log_marginal, mean,
        adaptive, start)``, ``start`` being :func:`prior_start` of the
        adaptive rows only.
        """
        nodes, log_weights, g = self._decoded_nodes(x, decoder, n_nodes)
        n_rows, m = x.shape[0], nodes.shape[1]
        if n_rows == 0:
            empty = (x.new_zeros(0), x.new_zeros((0, m)), None, None)
            return (*empty, x.new_zeros(0)) if with_ess else empty
        # Outputs are preallocated and filled chunk by chunk: lists of small
        # per-chunk results interleaved with the large temporaries pinned
        # glibc's heap, and a validation pass over 100k rows grew the process
        # by 1.9 GB (benchmarks/bench_scaling.py).
        log_marginal = x.new_empty(n_rows)
        mean = x.new_empty((n_rows, m)) if with_mean else None
        ess = x.new_empty(n_rows)
        step = chunk_rows(g.shape[0], CHUNK_ELEMENTS)
        for first in range(0, n_rows, step):
            chunk = slice(first, first + step)
            joint = log_joint_weights(x[chunk], g, log_weights, noise_variance)
            row_log_marginal = torch.logsumexp(joint, dim=1)
            log_posterior = joint - row_log_marginal[:, None]
            log_marginal[chunk] = row_log_marginal
            if with_mean:
                mean[chunk] = torch.exp(log_posterior) @ nodes
            ess[chunk] = torch.exp(-torch.logsumexp(2 * log_posterior, dim=1))
        adaptive = ess < ESS_THRESHOLD
        rows = adaptive.nonzero().squeeze(1)
        start = (
            x.new_empty((len(rows), m)),
            x.new_empty((len(rows), m)),
            x.new_empty((len(rows), m, m)),
        )
        for first in range(0, len(rows), step):
            chunk = slice(first, first + step)
            parts = prior_start(x[rows[chunk]], nodes, g, log_weights, noise_variance)
            for out, part in zip(start, parts, strict=True):
                out[chunk] = part
        if refine and adaptive.any():
            normals, counts = self._adaptive_normals(
                x.dtype, x.device, n_adaptive_nodes
            )
            row_log_marginal, row_mean = adaptive_chunked(
                x[rows],
                decoder,
                noise_variance,
                start,
                normals,
                counts,
            )
            log_marginal[rows] = row_log_marginal
            if with_mean:
                mean[rows] = row_mean
        if with_ess:
            return log_marginal, mean, adaptive, start, ess
        return log_marginal, mean, adaptive, start

    def _adaptive_normals(self, dtype, device, n_nodes=ADAPTIVE_EVAL_NODES):
        normals, counts = proposal_normals(
            self.n_components,
            n_nodes,
            generator=torch.Generator().manual_seed(EVALUATION_SEED),
        )
        return normals.to(dtype=dtype, device=device), counts

    def _fitted_tensors(self, X):
        x = self._to_tensor(X)
        noise = torch.tensor(self.noise_variance_, dtype=x.dtype)
        return x, self._fitted_module(self.decoder_, x.dtype), noise

    @uses_torch_threads
    def score_samples(self, X):
        """Log-likelihood ``log p(x)`` of each row under the fitted model.

        Evaluated with the ``n_eval_nodes``-node evaluation rule (see
        ``n_eval_nodes``), the same nodes for every row, switching to the
        posterior-adapted rule for rows where that rule would be inaccurate:
        deterministic, and a row's value does not depend on the other rows
        passed.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Observations.

        Returns
        -------
        log_likelihood : ndarray of shape (n_samples,)
            ``log p(x_i)`` in nats, with the dtype of ``X``.
        """
        X = self._check_fitted_input(X)
        x, decoder, noise = self._fitted_tensors(X)
        with torch.no_grad():
            return self._log_marginal(x, decoder, noise).numpy()

    @uses_torch_threads
    def transform(self, X):
        """Posterior mean ``E[z | x]`` of each row under the fitted model.

        Computed with the same per-row choice of rule as ``score_samples``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Observations.

        Returns
        -------
        Z : ndarray of shape (n_samples, n_components)
            Posterior means, with the dtype of ``X``.
        """
        X = self._check_fitted_input(X)
        x, decoder, noise = self._fitted_tensors(X)
        return self._evaluate(x, decoder, noise)[1].numpy()

    @uses_torch_threads
    def sample_posterior(self, X, n_samples=100, *, n_steps=50, random_state=None):
        """Draw from the exact posterior ``p(z | x)`` of each row.

        Starts ``n_samples`` chains per row by importance resampling of the
        evaluation nodes with the posterior weights (of the posterior-adapted
        nodes for rows where ``score_samples`` switches to them), then runs ``n_steps``
        Metropolis-adjusted Langevin steps (step size adapted during the first
        half) targeting ``p(z | x)``.

        Parameters
        ----------
        X : array-like of shape (n_rows, n_features)
            Observations.
        n_samples : int, default=100
            Draws per row.
        n_steps : int, default=50
            MALA steps per chain; ``0`` returns the importance-resampled nodes.
        random_state : int, RandomState instance or None, default=None
            Seeds the draws.

        Returns
        -------
        Z : ndarray of shape (n_rows, n_samples, n_components)
            Posterior draws, with the dtype of ``X``.
        """
        X = self._check_fitted_input(X)
        for name, value, least in (
            ("n_samples", n_samples, 1),
            ("n_steps", n_steps, 0),
        ):
            if not isinstance(value, Integral) or value < least:
                raise ValueError(
                    f"{name} should be an integer >= {least}, got {value!r}."
                )
        generator = self._seed(check_random_state(random_state))
        x, decoder, noise = self._fitted_tensors(X)
        with torch.no_grad():
            nodes, log_weights, g = self._decoded_nodes(x, decoder)
            z, spread = [], []
            # In row chunks: the rows x nodes weights are the largest temporary.
            for chunk in x.split(chunk_rows(g.shape[0], CHUNK_ELEMENTS)):
                weights = torch.softmax(
                    log_joint_weights(chunk, g, log_weights, noise), 1
                )
                picks = torch.multinomial(
                    weights, n_samples, replacement=True, generator=generator
                )
                z.append(nodes[picks])
                moments = weights @ nodes.square() - (weights @ nodes).square()
                spread.append(moments.mean(1))
            z, spread = torch.cat(z), torch.cat(spread)
            _, _, adaptive, start = self._evaluate(x, decoder, noise, refine=False)
            if adaptive is not None and adaptive.any():
                rows = adaptive.nonzero().squeeze(1)
                normals, counts = self._adaptive_normals(x.dtype, x.device)
                z[rows], spread[rows] = adaptive_resample(
                    x[rows],
                    decoder,
                    noise,
                    start,
                    normals,
                    counts,
                    n_samples,
                    generator=generator,
                )
            step = spread.clamp_min(1e-12).sqrt()
        if n_steps:
            z = mala(
                x,
                z,
                decoder,
                noise,
                n_steps=n_steps,
                step_size=step,
                generator=generator,
            )
        return z.numpy()
