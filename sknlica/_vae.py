"""NonlinearICAVAE: amortised variational inference (ELBO or IWAE)."""

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
from sknlica._torch.elbo import (
    CHUNK_ELEMENTS,
    diagonal_normal_log_density,
    gaussian_log_likelihood,
    importance_sampled_log_likelihood,
    iwae_bound,
    kl_to_standard_normal,
    leave_one_out_baseline,
    log_importance_weights,
    reparameterize,
    score_function_elbo,
    sgvb_elbo,
    soft_clamp,
    standard_normal_draws,
    vimco_iwae,
)
from sknlica._torch.integration import prior_rule
from sknlica._torch.networks import GaussianHead, NoiseVariance, make_mlp
from sknlica._torch.posterior import mala

#: Seed of the fixed draws ``eps`` used by ``score_samples``, ``elbo`` and the
#: per-epoch monitoring: fixed so that they are deterministic and every row is
#: evaluated with the same draws (subset invariance).
EVALUATION_SEED = 0

#: Encoder log-variances are soft-clamped to this range.  The upper end keeps
#: ``exp`` finite in float32 and is far above any posterior (which is never
#: much wider than the N(0, I) prior); the lower end (std 4.5e-5) is below the
#: posterior width of any model whose noise variance is above the floor, and
#: keeps ``1 / s^2`` in log q finite.
ENCODER_LOG_VAR_RANGE = (-20.0, 5.0)

#: The amortised decoder log-variance is soft-clamped to ``log(scale)`` plus
#: this range, ``scale`` being the mean feature variance of the training data:
#: the noise cannot exceed 150 times the data's own variance or fall below
#: 1e-9 of it (the ``NOISE_VARIANCE_FLOOR`` sits above that).
DECODER_LOG_VAR_RANGE = (-20.0, 5.0)

#: Per-epoch train and validation scores use at most this many fixed draws
#: (a sixteenth of the default ``n_eval_samples``, so monitoring costs less
#: than the epoch's training).  Measured on fitted m = 2, n = 20 models: 64
#: draws put the held-out log-likelihood within 0.01 nats of quadrature
#: (1,024 draws: 0.008), ample to rank epochs for early stopping.
MONITOR_SAMPLES = 64

#: The training log-likelihood and ELBO are estimated on this many rows of the
#: training set (evenly spaced, the same every epoch).
MONITOR_ROWS = 500

#: Max-norm of each step's gradient (of the per-row average loss).  On the
#: report's generator (m = 2, n = 20) the largest norm measured over a whole
#: fit is 67 (median 4), so this never binds there; at m = n = 100 an
#: untrained model's norms reach 1e4 and plain SGD without the clip diverges
#: in its first epoch (the report's invalid values).  Adam is nearly
#: unaffected, being invariant to the gradient's scale.
GRADIENT_CLIP_NORM = 1e3

OBJECTIVES = ("elbo", "iwae")


def clip_gradient_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Rescale the optimizer's gradients to total 2-norm ``max_norm`` if above it.

    ``torch.nn.utils.clip_grad_norm_`` computes the norm tensor by tensor on
    the CPU and always rescales (by 1 when the cap does not bind): 60 us per
    step against 22 us here, 3% of a default IWAE step.  Same result; a
    non-finite norm leaves the gradients alone, and the step then fails the
    finiteness check as before.
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
    if total > max_norm:
        torch._foreach_mul_(grads, max_norm / (total + 1e-6))


GRADIENT_ESTIMATORS = ("reparameterization", "score_function")
TRAINING_SCHEMES = ("joint", "alternating")


class _AmortizedVariance(torch.nn.Module):
    """The report's decoder variance head ``log s^2 = W_2 h + b_2``.

    ``h`` is the decoder's last hidden layer (``z`` itself without hidden
    layers).  ``s^2 = floor + exp(soft_clamp(W_2 h + b_2))``.  Called without
    ``h`` it returns ``summary``: the average ``s^2`` over the monitored
    training rows at their encoder means, updated every epoch (and restored
    with the best epoch), which is what ``noise_variance_`` reports.
    """

    def __init__(self, n_hidden, initial, *, floor, scale, dtype, device, generator):
        super().__init__()
        (self.linear, _) = make_mlp(
            n_hidden, (), 1, dtype=dtype, device=device, generator=generator
        )
        self.floor = float(floor)
        self.low = math.log(scale) + DECODER_LOG_VAR_RANGE[0]
        self.high = math.log(scale) + DECODER_LOG_VAR_RANGE[1]
        with torch.no_grad():
            # Start almost constant at the initial variance, as the global one.
            self.linear.weight.mul_(0.1)
            self.linear.bias.fill_(math.log(max(initial - self.floor, self.floor)))
        self.register_buffer("summary", torch.tensor(initial, dtype=dtype))

    def forward(self, h: torch.Tensor | None = None) -> torch.Tensor:
        if h is None:
            return self.summary
        log_var = soft_clamp(self.linear(h).squeeze(-1), self.low, self.high)
        return self.floor + torch.exp(log_var)


class _VAEModel(torch.nn.Module):
    """Encoder, decoder and noise variance (or variance head), trained together."""

    def __init__(self, encoder, decoder, noise, *, amortized: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.noise = noise
        self.amortized = amortized
        self.kl_weight = 1.0  # set each epoch by NonlinearICAVAE._begin_epoch
        self.warm = False  # a warm start skips the KL warm-up

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.encoder(x)
        return mean, soft_clamp(log_var, *ENCODER_LOG_VAR_RANGE)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.amortized:
            return self.decoder(z), self.noise()
        # decoder = hidden layers + [last Linear, output activation].
        h = self.decoder[:-2](z)
        return self.decoder[-2:](h), self.noise(h)


class NonlinearICAVAE(BaseNonlinearICA):
    r"""Nonlinear ICA with Gaussian latents by amortised variational inference.

    The model is that of :class:`NonlinearICAMLE`: :math:`z \sim N(0, I_m)`,
    :math:`x \mid z \sim N(g(z), \sigma^2 I_n)` with :math:`g` a multilayer
    perceptron.  An encoder :math:`q(z \mid x) = N(\mu(x), \mathrm{diag}\,
    s^2(x))` (an MLP with Gaussian outputs) is trained jointly with the
    decoder to maximise the evidence lower bound (report, section 3.2)

    .. math:: \mathcal{L}(x) = E_q[\log p(x \mid z)] - \beta\,
              \mathrm{KL}(q(z \mid x) \,\|\, N(0, I)) \le \log p(x),

    with the KL analytic and the expectation estimated with ``n_mc_samples``
    reparameterised draws :math:`z = \mu + s \odot \epsilon` (SGVB), or the
    importance-weighted bound :math:`\log \frac{1}{K} \sum_k p(x, z_k) /
    q(z_k \mid x)` (IWAE) with ``n_importance_samples`` draws.

    ``score_samples`` does not return a bound: it estimates :math:`\log
    p(x)` by importance sampling with the encoder as proposal, so its values
    are directly comparable with :class:`NonlinearICAMLE`'s; :meth:`elbo`
    returns the bound.

    Parameters
    ----------
    n_components : int, default=2
        Latent dimension ``m``.
    hidden_layer_sizes : tuple of int, default=(64,)
        Hidden layers of the decoder MLP; ``()`` gives ``g(z) = act(W z + b)``.
    activation : str, default="relu"
        One of "relu", "tanh", "sigmoid", "leaky_relu", "gelu", "identity".
        Hidden-layer activation of the decoder and of the encoder.
    output_activation : str, default="identity"
        One of the ``activation`` names.
        Applied after the decoder's last linear layer.
    encoder_hidden_layer_sizes : tuple of int, default=None
        Hidden layers of the encoder; ``None`` mirrors the decoder
        (``hidden_layer_sizes`` reversed).
    objective : {"elbo", "iwae"}, default="iwae"
        Training objective: the SGVB ELBO or the importance-weighted bound,
        which is tighter and trains a better decoder (see Notes).
    n_mc_samples : int, default=1
        Draws per row of the SGVB ELBO (``objective="elbo"``).
    n_importance_samples : int, default=8
        Draws per row of the IWAE bound (``objective="iwae"``).
    gradient_estimator : str, default="reparameterization"
        ``"reparameterization"`` or ``"score_function"``.
        Encoder gradient.  ``"score_function"`` is the log-derivative
        (REINFORCE) estimator of the notes, with a baseline: for the ELBO the
        leave-one-out mean of the other draws' ``log p(x | z)`` (or, with
        ``n_mc_samples=1``, ``log p(x | g(mu))`` at the encoder mean); for
        IWAE the VIMCO leave-one-out bound.  Far noisier than the
        reparameterised gradient; it is here to compare them.
    training : {"joint", "alternating"}, default="joint"
        ``"joint"`` steps encoder and decoder together; ``"alternating"`` is
        the notes' Algorithm 1.1: on each minibatch an encoder step, then a
        decoder (and noise) step at the updated encoder, with fresh draws.
    beta : float, default=1.0
        Weight of the KL term (of ``log p(z) - log q(z | x)`` in the IWAE
        weights).  Scores and :meth:`elbo` always use ``beta = 1``.
    kl_warmup_epochs : int, default=0
        Ramp the KL weight linearly from ``beta / (kl_warmup_epochs + 1)`` to
        ``beta`` over the first epochs (not repeated on a warm start).
    amortized_variance : bool, default=False
        Replace the global ``sigma^2`` by the report's data-dependent head
        ``log s^2(z) = W_2 h(z) + b_2`` on the decoder's last hidden layer;
        ``sample`` then draws each row's noise with variance ``s^2(z)``.
    noise_variance : float, default=1.0
        Initial (or, with ``learn_noise_variance=False``, fixed) ``sigma^2``.
    learn_noise_variance : bool, default=True
        Learn ``sigma^2 = floor + exp(s)``; the floor is ``1e-6`` times the
        mean feature variance of the training data.
    n_eval_samples : int, default=1024
        Draws of the importance-sampling estimate in ``score_samples`` and
        :meth:`elbo`: fixed scrambled Sobol points mapped to N(0, I), shared by
        all rows.  The per-epoch scores use the first ``min(64,
        n_eval_samples)``.
    solver : {"adam", "sgd"}, default="adam"
        Optimiser.
    learning_rate_init : float, default=3e-3
        Step size.
    noise_learning_rate : float, default=None
        Step size of ``sigma^2`` (or the variance head) for ``solver="sgd"``;
        ``None`` uses ``learning_rate_init``.  Ignored by ``"adam"``.
    batch_size : int, default=128
        Minibatch size (clipped to the number of training rows).
    max_iter : int, default=200
        Maximum number of epochs.
    tol : float, default=1e-3
        Improvement in nats per sample of the monitored score below which an
        epoch counts as no improvement.
    early_stopping : bool, default=True
        Hold out ``validation_fraction`` of the data, monitor its
        importance-sampled log-likelihood, and keep the best epoch's model.
        When ``False`` the training log-likelihood estimate is monitored.
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
        Where training runs; fitted modules are always stored on the CPU.
    n_threads : int, default=None
        Torch intra-op threads used inside ``fit``, ``partial_fit`` and every
        inference method, restored afterwards; ``None`` keeps torch's setting.
        In ``GridSearchCV(n_jobs=k)`` on ``c`` cores, ``n_threads=c // k``
        avoids oversubscription (see the user guide's performance page).
    verbose : int, default=0
        Show a progress bar with the current score.
    random_state : int, RandomState instance or None, default=None
        Seeds initialisation, shuffling, the validation split and the draws
        through a private ``torch.Generator``; global RNGs are untouched.

    Attributes
    ----------
    encoder_ : torch.nn.Module
        The fitted encoder, ``x -> (mu(x), log s^2(x))`` before the clamp to
        ``ENCODER_LOG_VAR_RANGE`` (on the CPU).
    decoder_ : torch.nn.Module
        The fitted decoder mean ``g`` (on the CPU).
    noise_ : torch.nn.Module
        The fitted noise variance (a module; the variance head when
        ``amortized_variance=True``).
    noise_variance_ : float
        Fitted ``sigma^2``.  With ``amortized_variance=True``: the average of
        the head ``s^2(z)`` at the encoder means of (up to 500 evenly spaced)
        training rows.
    n_iter_ : int
        Epochs run.
    converged_ : bool
        Whether the stopping rule fired before ``max_iter``.
    best_epoch_ : int
        Epoch whose parameters were kept.
    history_ : list of dict
        One dict per epoch: ``epoch``; ``train_objective`` (the epoch's
        average training objective, with the current KL weight);
        ``train_log_likelihood`` and ``train_elbo`` (estimated on up to 500
        evenly spaced training rows with 64 fixed draws);
        ``validation_log_likelihood`` and ``validation_elbo`` (when held out,
        same draws); ``noise_variance``; ``seconds`` since the fit started.
        Everything but ``train_objective`` is of the averaged parameters
        (``ema_decay``).
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during fit, when ``X`` has string column names.

    See Also
    --------
    NonlinearICAMLE : The same model fitted by direct maximum likelihood.
    sknlica.marginal_log_likelihood : Quadrature ``log p(x)`` for any decoder.

    Notes
    -----
    Early stopping monitors the held-out *log-likelihood estimate*, not the
    ELBO: the two can move apart (the report saw the log-likelihood fall
    while the ELBO still rose, for sigmoid), and the log-likelihood is what
    :meth:`score` reports.  Both curves are in ``history_``.

    With one global ``sigma^2`` the model is exactly :class:`NonlinearICAMLE`'s,
    so ``noise_variance_`` and ``score`` of the two are comparable.  A bound
    trains a decoder for which the bound is tight, i.e. one whose posterior
    is close to Gaussian, at some cost in likelihood.  Hence the default
    ``objective="iwae"``: on the report's generator (m = 2, n = 20, 5,000
    rows, relu) the ELBO-trained model's held-out log-likelihood is 0.11
    nats/sample below the true model's and the IWAE (K = 8) one's 0.05
    (``benchmarks/bench_vae.py``).  Neither underestimates ``sigma^2`` (fitted
    1.00-1.02 for a true 1), unlike the report's VAE.

    References
    ----------
    The report "MLE/VAE for Nonlinear ICA", section 3.2; notes 002
    (Algorithm 1.1) and 004 (importance sampling).  Kingma & Welling,
    "Auto-Encoding Variational Bayes" (2014); Burda, Grosse & Salakhutdinov,
    "Importance Weighted Autoencoders" (2016); Mnih & Rezende, "Variational
    inference for Monte Carlo objectives" (2016).

    Examples
    --------
    >>> from sknlica import NonlinearICAVAE
    >>> from sknlica.datasets import make_nonlinear_ica
    >>> X, Z = make_nonlinear_ica(500, n_components=2, n_features=5, random_state=0)
    >>> vae = NonlinearICAVAE(max_iter=5, random_state=0).fit(X)
    >>> vae.transform(X).shape
    (500, 2)
    >>> bool(vae.elbo(X).mean() <= vae.score(X))
    True
    """

    _parameter_constraints: dict = {
        **BaseNonlinearICA._parameter_constraints,
        "encoder_hidden_layer_sizes": ["array-like", None],
        "objective": [StrOptions(set(OBJECTIVES))],
        "n_mc_samples": [Interval(Integral, 1, None, closed="left")],
        "n_importance_samples": [Interval(Integral, 1, None, closed="left")],
        "gradient_estimator": [StrOptions(set(GRADIENT_ESTIMATORS))],
        "training": [StrOptions(set(TRAINING_SCHEMES))],
        "beta": [Interval(Real, 0, None, closed="left")],
        "kl_warmup_epochs": [Interval(Integral, 0, None, closed="left")],
        "amortized_variance": ["boolean"],
        "n_eval_samples": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        n_components=2,
        *,
        hidden_layer_sizes=(64,),
        activation="relu",
        output_activation="identity",
        encoder_hidden_layer_sizes=None,
        objective="iwae",
        n_mc_samples=1,
        n_importance_samples=8,
        gradient_estimator="reparameterization",
        training="joint",
        beta=1.0,
        kl_warmup_epochs=0,
        amortized_variance=False,
        noise_variance=1.0,
        learn_noise_variance=True,
        n_eval_samples=1024,
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
        self.encoder_hidden_layer_sizes = encoder_hidden_layer_sizes
        self.objective = objective
        self.n_mc_samples = n_mc_samples
        self.n_importance_samples = n_importance_samples
        self.gradient_estimator = gradient_estimator
        self.training = training
        self.beta = beta
        self.kl_warmup_epochs = kl_warmup_epochs
        self.amortized_variance = amortized_variance
        self.noise_variance = noise_variance
        self.learn_noise_variance = learn_noise_variance
        self.n_eval_samples = n_eval_samples
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

    # ------------------------------------------------------------ validation
    def _check_params(self, X) -> None:
        super()._check_params(X)
        sizes = self.encoder_hidden_layer_sizes
        if sizes is not None and not all(
            isinstance(s, Integral) and s >= 1 for s in sizes
        ):
            raise ValueError(
                "encoder_hidden_layer_sizes should be None or a sequence of "
                f"positive integers, got {sizes!r}. Use () for a linear encoder "
                "or None to mirror hidden_layer_sizes."
            )
        if (
            self.objective == "iwae"
            and self.gradient_estimator == "score_function"
            and self.n_importance_samples < 2
        ):
            raise ValueError(
                "objective='iwae' with gradient_estimator='score_function' needs "
                "n_importance_samples >= 2 for its leave-one-out baseline, got "
                f"n_importance_samples={self.n_importance_samples}. Increase it "
                "or use gradient_estimator='reparameterization'."
            )
        if self.amortized_variance and not self.learn_noise_variance:
            raise ValueError(
                "amortized_variance=True learns a variance head, but "
                "learn_noise_variance=False asks for a fixed variance. Set "
                "learn_noise_variance=True or amortized_variance=False."
            )

    @property
    def _encoder_sizes(self) -> tuple[int, ...]:
        if self.encoder_hidden_layer_sizes is None:
            return tuple(reversed(tuple(self.hidden_layer_sizes)))
        return tuple(self.encoder_hidden_layer_sizes)

    # ------------------------------------------------------------- training
    def _build_model(self, n_features, *, scale, dtype, device, generator):
        build = {"dtype": dtype, "device": device, "generator": generator}
        encoder = GaussianHead(
            n_features,
            self._encoder_sizes,
            self.n_components,
            activation=self.activation,
            **build,
        )
        sizes = tuple(self.hidden_layer_sizes)
        decoder = make_mlp(
            self.n_components,
            sizes,
            n_features,
            activation=self.activation,
            output_activation=self.output_activation,
            **build,
        )
        floor = NOISE_VARIANCE_FLOOR * scale
        if self.amortized_variance:
            noise = _AmortizedVariance(
                sizes[-1] if sizes else self.n_components,
                float(self.noise_variance),
                floor=floor,
                scale=scale,
                **build,
            )
        else:
            noise = NoiseVariance(
                self.noise_variance,
                learn=self.learn_noise_variance,
                floor=floor,
                dtype=dtype,
                device=device,
            )
        return _VAEModel(encoder, decoder, noise, amortized=self.amortized_variance)

    def _model_from_fitted(self, *, dtype, device, generator):
        # Train a copy: the fitted modules stay intact if this fit fails.
        fitted = _VAEModel(
            self.encoder_, self.decoder_, self.noise_, amortized=self.amortized_variance
        )
        model = copy.deepcopy(fitted).to(dtype=dtype, device=device)
        model.warm = True
        return model

    def _make_optimizers(self, model):
        encoder = list(model.encoder.parameters())
        decoder = list(model.decoder.parameters())
        noise = list(model.noise.parameters())
        if self.training == "alternating":
            # Algorithm 1.1: an encoder (E) step, then a decoder (M) step.
            return [self._optimizer([encoder, []]), self._optimizer([decoder, noise])]
        return [self._optimizer([encoder + decoder, noise])]

    def _optimizer(self, groups):
        rest, noise = groups
        if self.solver == "adam":
            return torch.optim.Adam(rest + noise, lr=self.learning_rate_init)
        lr = self.noise_learning_rate or self.learning_rate_init
        param_groups = [{"params": rest, "lr": self.learning_rate_init}]
        if noise:
            param_groups.append({"params": noise, "lr": lr})
        return torch.optim.SGD(param_groups, lr=self.learning_rate_init)

    def _optimizer_step(self, model, optimizers, batch, generator, rows=None):
        loss = None
        for optimizer in optimizers:
            model.zero_grad(set_to_none=True)
            step_loss = self._training_loss(model, batch, generator=generator)
            step_loss.backward()
            clip_gradient_norm(optimizer, GRADIENT_CLIP_NORM)
            optimizer.step()
            loss = step_loss.detach() if loss is None else loss
        return loss

    def _begin_epoch(self, model, epoch: int) -> None:
        ramp = 1.0
        if self.kl_warmup_epochs and not model.warm:
            ramp = min(1.0, (epoch + 1) / (self.kl_warmup_epochs + 1))
        model.kl_weight = self.beta * ramp

    def _training_loss(self, model, batch, *, generator, rows=None):
        mean, log_var = model.encode(batch)
        n_draws = (
            self.n_importance_samples if self.objective == "iwae" else self.n_mc_samples
        )
        eps = standard_normal_draws(
            (n_draws, *mean.shape),
            generator=generator,
            dtype=mean.dtype,
            device=mean.device,
        )
        z = reparameterize(mean, log_var, eps)
        score_function = self.gradient_estimator == "score_function"
        if score_function:
            z = z.detach()
        if self.objective == "iwae":
            log_w, _, log_q = log_importance_weights(
                batch, z, mean, log_var, model.decode, prior_weight=model.kl_weight
            )
            bound = vimco_iwae(log_w, log_q) if score_function else iwae_bound(log_w)
            return -bound.mean()
        log_lik = gaussian_log_likelihood(batch, *model.decode(z))
        kl = kl_to_standard_normal(mean, log_var)
        if not score_function:
            return -sgvb_elbo(log_lik, kl, beta=model.kl_weight).mean()
        log_q = diagonal_normal_log_density(z, mean, log_var)
        if n_draws >= 2:
            baseline = leave_one_out_baseline(log_lik)
        else:
            # A control variate independent of the draw: the encoder mean.
            baseline = gaussian_log_likelihood(batch, *model.decode(mean)).detach()
        elbo = score_function_elbo(log_lik, log_q, kl, baseline, beta=model.kl_weight)
        return -elbo.mean()

    def _epoch_scores(self, model, X_train, X_val, train_objective):
        eps = self._evaluation_draws(
            min(MONITOR_SAMPLES, self.n_eval_samples), X_train.dtype, X_train.device
        )
        stride = max(1, X_train.shape[0] // MONITOR_ROWS)
        positions = torch.arange(0, X_train.shape[0], stride, device=X_train.device)
        subset = X_train.take(positions[:MONITOR_ROWS])
        log_px, elbo = self._estimate(model, subset, eps)
        scores = {
            "train_log_likelihood": float(log_px.mean()),
            "train_elbo": float(elbo.mean()),
        }
        if self.amortized_variance:
            model.noise.summary.fill_(float(self._mean_head_variance(model, subset)))
        if X_val is not None:
            log_px, elbo = self._estimate(model, X_val, eps)
            scores["validation_log_likelihood"] = float(log_px.mean())
            scores["validation_elbo"] = float(elbo.mean())
        return scores

    def _store_fitted(self, model):
        self.encoder_ = model.encoder.cpu().eval()
        self.decoder_ = model.decoder.cpu().eval()
        self.noise_ = model.noise.cpu()
        self.noise_variance_ = float(model.noise().detach())

    # ------------------------------------------------------------ numerics
    def _evaluation_draws(self, n_draws, dtype, device):
        # Scrambled Sobol points through the normal inverse CDF: N(0, I)
        # draws with a lower-variance average than i.i.d. ones.
        eps, _ = prior_rule(
            "qmc",
            self.n_components,
            n_draws,
            generator=torch.Generator().manual_seed(EVALUATION_SEED),
            dtype=dtype,
            device=device,
        )
        return eps

    def _estimate(self, model, x, eps):
        """Per-row importance-sampled ``log p(x)`` and ELBO with draws ``eps``."""
        width = max((x.shape[1], *tuple(self.hidden_layer_sizes)))
        # Encode in row chunks too, so memory stays flat in the number of rows.
        step = max(1, CHUNK_ELEMENTS // (eps.shape[0] * width))
        # Preallocated outputs: see sknlica._torch.likelihood.log_marginal_chunked.
        log_px, elbo = x.new_empty(x.shape[0]), x.new_empty(x.shape[0])
        with torch.no_grad():
            for first in range(0, x.shape[0], step):
                rows = slice(first, first + step)
                mean, log_var = model.encode(x[rows])
                log_px[rows], elbo[rows] = importance_sampled_log_likelihood(
                    x[rows], mean, log_var, model.decode, eps, width=width
                )
        return log_px, elbo

    @staticmethod
    def _mean_head_variance(model, x):
        with torch.no_grad():
            mean, _ = model.encode(x)
            return model.decode(mean)[1].mean()

    # ------------------------------------------------------------ inference
    def _fitted_model(self, dtype) -> _VAEModel:
        """The fitted modules in ``dtype``, copied if that differs (never cast
        the fitted attributes in place)."""
        model = _VAEModel(
            self.encoder_, self.decoder_, self.noise_, amortized=self.amortized_variance
        )
        if next(self.decoder_.parameters()).dtype != dtype:
            model = copy.deepcopy(model).to(dtype=dtype)
        return model.eval()

    def _fitted_input(self, X):
        X = self._check_fitted_input(X)
        x = self._to_tensor(X)
        return x, self._fitted_model(x.dtype)

    @uses_torch_threads
    def score_samples(self, X):
        """Importance-sampling estimate of ``log p(x)`` for each row.

        ``log p(x) ~= logsumexp_k [log p(x | z_k) + log p(z_k) - log q(z_k |
        x)] - log K`` with ``z_k = mu(x) + s(x) * eps_k``, the encoder as
        proposal and ``K = n_eval_samples`` fixed draws ``eps_k`` shared by all
        rows: deterministic, and a row's value does not depend on the other
        rows passed.  It is an estimate of the likelihood, not a bound like
        :meth:`elbo` (its expectation is below ``log p(x)`` by a bias that
        vanishes as ``K`` grows).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Observations.

        Returns
        -------
        log_likelihood : ndarray of shape (n_samples,)
            ``log p(x_i)`` in nats, with the dtype of ``X``.
        """
        x, model = self._fitted_input(X)
        eps = self._evaluation_draws(self.n_eval_samples, x.dtype, x.device)
        return self._estimate(model, x, eps)[0].numpy()

    @uses_torch_threads
    def elbo(self, X):
        """Evidence lower bound of each row (``beta = 1``).

        ``E_q[log p(x | z)] - KL(q(z | x) || N(0, I))`` with the KL analytic
        and the expectation averaged over the ``n_eval_samples`` fixed draws
        of :meth:`score_samples`: deterministic and subset-invariant.  The gap
        ``score_samples(X) - elbo(X)`` estimates ``KL(q(z | x) || p(z | x))``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Observations.

        Returns
        -------
        elbo : ndarray of shape (n_samples,)
            Per-row ELBO in nats, with the dtype of ``X``.

        Examples
        --------
        >>> from sknlica import NonlinearICAVAE
        >>> from sknlica.datasets import make_nonlinear_ica
        >>> X, _ = make_nonlinear_ica(300, 2, 5, random_state=0)
        >>> vae = NonlinearICAVAE(max_iter=3, random_state=0).fit(X)
        >>> vae.elbo(X[:4]).shape
        (4,)
        """
        x, model = self._fitted_input(X)
        eps = self._evaluation_draws(self.n_eval_samples, x.dtype, x.device)
        return self._estimate(model, x, eps)[1].numpy()

    @uses_torch_threads
    def transform(self, X):
        """Encoder mean ``mu(x)`` of each row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Observations.

        Returns
        -------
        Z : ndarray of shape (n_samples, n_components)
            Means of ``q(z | x)``, with the dtype of ``X``.
        """
        x, model = self._fitted_input(X)
        with torch.no_grad():
            return model.encode(x)[0].numpy()

    def _sample_mean_and_variance(self, Z):
        # With the variance head, each draw's noise has the head's s^2(z).
        if not self.amortized_variance:
            return super()._sample_mean_and_variance(Z)
        with torch.no_grad():
            mean, variance = self._fitted_model(torch.float64).decode(torch.tensor(Z))
        return mean.numpy(), variance.numpy()

    @uses_torch_threads
    def sample_posterior(self, X, n_samples=100, *, n_steps=0, random_state=None):
        """Draw from the encoder ``q(z | x)``, optionally corrected by MCMC.

        With ``n_steps > 0`` each draw starts a chain of Metropolis-adjusted
        Langevin steps targeting the decoder's exact posterior ``p(z | x)``
        (step size from the encoder's spread, adapted during the first half):
        comparing the two shows the amortisation gap.

        Parameters
        ----------
        X : array-like of shape (n_rows, n_features)
            Observations.
        n_samples : int, default=100
            Draws per row.
        n_steps : int, default=0
            MALA steps per chain; ``0`` returns the encoder's draws.
        random_state : int, RandomState instance or None, default=None
            Seeds the draws.

        Returns
        -------
        Z : ndarray of shape (n_rows, n_samples, n_components)
            Draws, with the dtype of ``X``.

        Examples
        --------
        >>> from sknlica import NonlinearICAVAE
        >>> from sknlica.datasets import make_nonlinear_ica
        >>> X, _ = make_nonlinear_ica(300, 2, 5, random_state=0)
        >>> vae = NonlinearICAVAE(max_iter=3, random_state=0).fit(X)
        >>> vae.sample_posterior(X[:3], n_samples=20, n_steps=10).shape
        (3, 20, 2)
        """
        x, model = self._fitted_input(X)
        for name, value, least in (
            ("n_samples", n_samples, 1),
            ("n_steps", n_steps, 0),
        ):
            if not isinstance(value, Integral) or value < least:
                raise ValueError(
                    f"{name} should be an integer >= {least}, got {value!r}."
                )
        generator = self._seed(check_random_state(random_state))
        with torch.no_grad():
            mean, log_var = model.encode(x)
            eps = standard_normal_draws(
                (x.shape[0], n_samples, self.n_components),
                generator=generator,
                dtype=x.dtype,
                device=x.device,
            )
            z = reparameterize(mean[:, None], log_var[:, None], eps)
        if n_steps:
            target, decoder, noise = self._mala_target(model, x)
            z = mala(
                target,
                z,
                decoder,
                noise,
                n_steps=n_steps,
                step_size=torch.exp(0.5 * log_var).mean(1),
                generator=generator,
            )
        return z.numpy()

    def _mala_target(self, model, x):
        """``(rows, decoder, noise_variance)`` whose MALA target is p(z | x)."""
        if not self.amortized_variance:
            return x, model.decoder, model.noise().detach()
        # posterior.log_joint is -(||x - d(z)||^2 / v + ||z||^2) / 2.  With a
        # z-dependent s^2(z) the first term must be ||x - g||^2 / s^2 + n log
        # s^2.  With v = 1, d(z) = x - (x - g) / s, and one extra coordinate
        # (0 in the rows, -sqrt(n log(s^2 / floor)) in d) it is exactly that,
        # up to a z-independent constant; s^2 > floor keeps the root positive.
        n_features = x.shape[1]
        floor = model.noise.floor

        def decoder(z):
            g, variance = model.decode(z)
            scaled = (x[:, None, :] - g) / variance.sqrt()[..., None]
            extra = (n_features * torch.log(variance / floor)).sqrt()
            return torch.cat([x[:, None, :] - scaled, -extra[..., None]], -1)

        rows = torch.cat([x, x.new_zeros(x.shape[0], 1)], 1)
        return rows, decoder, x.new_tensor(1.0)
