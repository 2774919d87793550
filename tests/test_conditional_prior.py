"""prior="conditional": z | u ~ N(mu_u, diag lambda_u), for both estimators.

The oracle is the linear-Gaussian case, where ``p(x | u)`` and ``E[z | x,
u]`` are closed forms: ``x | u ~ N(W mu_u + b, W Lambda_u W^T + Psi)``.
"""

import pickle
import warnings

import numpy as np
import pytest
import torch
from _doubles import hooked
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.base import clone

from sknlica import NonlinearICAMLE, NonlinearICAVAE, marginal_log_likelihood
from sknlica._mle import VAE_START_INITS
from sknlica._torch.integration import prior_rule
from sknlica._torch.mle_objectives import PriorRuleObjective
from sknlica._torch.models import MLEModel
from sknlica._torch.networks import NoiseVariance, make_mlp
from sknlica._torch.segments import SegmentedObjective, SegmentPrior
from sknlica._torch.training import VALIDATION_SCORE as VALIDATION
from sknlica._vae import CONDITIONAL_SCREEN_EPOCHS
from sknlica.datasets import make_nonstationary_ica

LINEAR = {"hidden_layer_sizes": (), "activation": "identity"}


def _segment_data(n_segments=3, n_per_segment=60, seed=0):
    X, u, S = make_nonstationary_ica(
        n_segments,
        n_per_segment,
        2,
        4,
        n_layers=1,
        noise_variance=0.1,
        source_means=True,
        random_state=seed,
    )
    return X, u, S


def _fit(estimator, X, u, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimator.set_params(**params).fit(X, u)


@pytest.fixture(scope="module")
def linear_mle():
    X, u, _ = _segment_data()
    # From the random start: this fit (noise variance 0.99) is integrated by
    # the grid alone, which the closed form checks to 1e-5.  From the
    # default linear start it reaches 0.104, where some rows' estimates are
    # off by up to 2.8e-3.
    mle = NonlinearICAMLE(
        prior="conditional",
        max_iter=8,
        learning_rate_init=0.05,
        init="random",
        random_state=0,
        **LINEAR,
    )
    return _fit(mle, X, u), X, u


def _closed_form(estimator, X, codes):
    """Per-row log p(x | u) and E[z | x, u] of a fitted linear model."""
    linear = estimator.decoder_[0]
    W = linear.weight.detach().double().numpy()
    b = linear.bias.detach().double().numpy()
    psi = np.broadcast_to(estimator.noise_variance_, (X.shape[1],))
    log_p, mean = np.empty(len(X)), np.empty((len(X), W.shape[1]))
    for k in np.unique(codes):
        rows = codes == k
        mu, lam = estimator.prior_means_[k], np.diag(estimator.prior_variances_[k])
        cov = W @ lam @ W.T + np.diag(psi)
        centre = W @ mu + b
        log_p[rows] = multivariate_normal(centre, cov).logpdf(X[rows])
        gain = lam @ W.T @ np.linalg.inv(cov)
        mean[rows] = mu + (X[rows] - centre) @ gain.T
    return log_p, mean


def test_mle_conditional_likelihood_and_posterior_mean_match_closed_form(
    linear_mle,
):
    mle, X, u = linear_mle
    log_p, mean = _closed_form(mle, X, u)
    np.testing.assert_allclose(mle.score_samples(X, u), log_p, atol=1e-5)
    np.testing.assert_allclose(mle.transform(X, u), mean, atol=1e-4)
    # The marginal prior: the mixture of the segments with their weights.
    joint = (
        np.stack([_closed_form(mle, X, np.full(len(X), k))[0] for k in range(3)])
        + np.log(mle.prior_weights_)[:, None]
    )
    np.testing.assert_allclose(mle.score_samples(X), logsumexp(joint, 0), atol=1e-5)
    weights = np.exp(joint - logsumexp(joint, 0))
    means = np.stack([_closed_form(mle, X, np.full(len(X), k))[1] for k in range(3)])
    np.testing.assert_allclose(
        mle.transform(X), (weights[..., None] * means).sum(0), atol=1e-4
    )


def test_fitted_prior_attributes_and_learning(linear_mle):
    mle, X, u = linear_mle
    assert mle.segments_.tolist() == [0, 1, 2]
    assert mle.prior_means_.shape == mle.prior_variances_.shape == (3, 2)
    np.testing.assert_allclose(mle.prior_weights_, [1 / 3] * 3)
    # Training moved the segment priors away from their N(0, I) start.
    assert np.abs(mle.prior_means_).max() > 0.05
    assert (mle.prior_variances_ > 0).all()


def test_marginal_log_likelihood_with_per_row_prior_matches_the_estimator(
    linear_mle,
):
    mle, X, u = linear_mle
    oracle = marginal_log_likelihood(
        X,
        mle.decoder_,
        mle.noise_variance_,
        prior_mean=mle.prior_means_[u],
        prior_variance=mle.prior_variances_[u],
    )
    np.testing.assert_allclose(oracle, _closed_form(mle, X, u)[0], atol=1e-5)


def test_vae_conditional_score_matches_closed_form():
    X, u, _ = _segment_data(seed=1)
    vae = NonlinearICAVAE(prior="conditional", max_iter=40, random_state=0, **LINEAR)
    vae = _fit(vae, X, u)
    log_p, _ = _closed_form(vae, X, u)
    # Importance sampling with q(z | x, u) as the proposal: unbiased for p(x
    # | u), accurate to the proposal's quality.
    assert np.abs(vae.score_samples(X, u) - log_p).mean() < 0.02
    assert (vae.elbo(X, u) <= vae.score_samples(X, u) + 1e-6).all()


@pytest.mark.parametrize("Estimator", [NonlinearICAMLE, NonlinearICAVAE])
def test_conditional_results_are_subset_invariant(Estimator):
    X, u, _ = _segment_data(seed=2)
    est = _fit(Estimator(prior="conditional", max_iter=2, random_state=0), X, u)
    part = slice(50, 70)
    for y in (u, None):
        full = est.score_samples(X, y)
        got = est.score_samples(X[part], None if y is None else y[part])
        np.testing.assert_allclose(got, full[part], rtol=1e-10)
        Z = est.transform(X, y)
        got = est.transform(X[part], None if y is None else y[part])
        np.testing.assert_allclose(got, Z[part], rtol=1e-8, atol=1e-10)


def test_string_labels_and_unseen_labels():
    X, u, _ = _segment_data(seed=3)
    names = np.array(["rest", "task", "sleep"])[u]
    mle = _fit(
        NonlinearICAMLE(prior="conditional", max_iter=2, random_state=0), X, names
    )
    assert mle.segments_.tolist() == ["rest", "sleep", "task"]
    # The same fit as with the labels' positions among the sorted names.
    codes = np.searchsorted(mle.segments_, names)
    coded = _fit(
        NonlinearICAMLE(prior="conditional", max_iter=2, random_state=0), X, codes
    )
    np.testing.assert_array_equal(coded.prior_means_, mle.prior_means_)
    np.testing.assert_array_equal(
        coded.score_samples(X, codes), mle.score_samples(X, names)
    )
    with pytest.raises(ValueError, match="not seen in fit.*'walk'"):
        mle.score_samples(X[:2], ["walk", "rest"])
    with pytest.raises(ValueError, match="2 segment labels for 3 rows"):
        mle.transform(X[:3], ["rest", "task"])


def test_conditional_prior_needs_y_and_refuses_what_it_cannot_do():
    X, u, _ = _segment_data()
    with pytest.raises(ValueError, match="requires y to be passed"):
        NonlinearICAMLE(prior="conditional").fit(X)
    est = NonlinearICAMLE(prior="conditional")
    assert not hasattr(est, "partial_fit")
    with pytest.raises(ValueError, match="NaN or infinite"):
        NonlinearICAMLE(prior="conditional").fit(X, np.full(len(X), np.nan))
    vae = _fit(NonlinearICAVAE(prior="conditional", max_iter=1), X, u)
    with pytest.raises(ValueError, match="pass the rows' segment labels"):
        vae.elbo(X)
    with pytest.raises(ValueError, match="one label per draw"):
        vae.sample(3, y=[0, 1])


def test_standard_prior_ignores_y_and_refit_drops_the_segments():
    X, u, S = _segment_data()
    mle = _fit(NonlinearICAMLE(prior="conditional", max_iter=1, random_state=0), X, u)
    assert hasattr(mle, "segments_")
    mle = _fit(mle, X, S[:, 0], prior="standard")
    for name in ("prior_", "segments_", "prior_means_", "prior_weights_"):
        assert not hasattr(mle, name)
    np.testing.assert_array_equal(mle.score_samples(X, u), mle.score_samples(X))


def test_sample_draws_from_the_segment_priors(linear_mle):
    mle, _, _ = linear_mle
    X, Z = mle.sample(4000, random_state=0, return_latent=True, y=np.full(4000, 2))
    np.testing.assert_allclose(Z.mean(0), mle.prior_means_[2], atol=0.1)
    np.testing.assert_allclose(Z.var(0), mle.prior_variances_[2], rtol=0.1)
    again = mle.sample(4000, random_state=0, y=np.full(4000, 2))
    np.testing.assert_array_equal(X, again)
    mixed = mle.sample(6000, random_state=1, return_latent=True)[1]
    weights = mle.prior_weights_[:, None]
    np.testing.assert_allclose(
        mixed.mean(0), (weights * mle.prior_means_).sum(0), atol=0.1
    )


@pytest.mark.parametrize("Estimator", [NonlinearICAMLE, NonlinearICAVAE])
def test_conditional_fit_is_equivariant_to_the_data_units(Estimator):
    X, u, _ = _segment_data(seed=4)
    params = {"prior": "conditional", "max_iter": 3, "random_state": 0}
    base = _fit(Estimator(**params), X, u)
    scaled = _fit(Estimator(**params), 10.0 * X + 3.0, u)
    np.testing.assert_allclose(
        scaled.transform(10.0 * X + 3.0, u), base.transform(X, u), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        scaled.score_samples(10.0 * X + 3.0, u),
        base.score_samples(X, u) - X.shape[1] * np.log(10.0),
        rtol=1e-6,
    )


def test_clone_pickle_and_fit_transform():
    X, u, _ = _segment_data()
    vae = NonlinearICAVAE(
        prior="conditional", prior_means=False, max_iter=2, random_state=0
    )
    assert clone(vae).get_params()["prior_means"] is False
    # scikit-learn's contract: fit_transform(X, y) == fit(X, y).transform(X),
    # the marginal prior's posterior means.
    Z = vae.fit_transform(X, u)
    np.testing.assert_allclose(Z, vae.transform(X))
    np.testing.assert_array_equal(vae.prior_means_, 0.0)
    again = pickle.loads(pickle.dumps(vae))
    np.testing.assert_allclose(again.score_samples(X, u), vae.score_samples(X, u))


@pytest.mark.parametrize("gradient", ["analytic", "autograd"])
def test_segmented_gradient_matches_a_direct_computation(gradient):
    """The segmented loss's gradient (both gradients, through the affine map
    into the segment priors) equals autograd on a direct formula."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    decoder = make_mlp(2, (5,), 3, activation="tanh", generator=generator)
    noise = NoiseVariance(0.3, learn=True, floor=1e-6)
    prior = SegmentPrior(
        torch.tensor([4, 6]), 2, learn_means=True, dtype=torch.float64, device="cpu"
    )
    with torch.no_grad():
        prior.means.normal_(generator=generator)
        prior.log_variances.normal_(generator=generator)
    model = MLEModel(decoder, noise, prior)
    nodes, log_weights = prior_rule("gauss_hermite", 2, 64, generator=generator)

    class FixedNodes:
        def draw(self):
            return nodes, log_weights

    inner = PriorRuleObjective(
        FixedNodes(), gradient, n_components=2, validation_nodes=64
    )
    codes = torch.tensor([0, 1, 1, 0, 1, 1, 0, 1, 1, 0])
    objective = SegmentedObjective(inner, codes)
    x = torch.randn(10, 3, dtype=torch.float64, generator=generator)
    rows = torch.arange(10)
    loss = objective.loss(model, x, rows)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    def direct():
        total = []
        for i in range(10):
            shift, scale = prior.shift_and_scale(int(codes[i]))
            g = decoder(shift + scale * nodes)
            log_phi = -0.5 * (
                ((x[i] - g) ** 2).sum(1) / noise()
                + 3 * torch.log(2 * torch.pi * noise())
            )
            total.append(torch.logsumexp(log_phi + log_weights, 0))
        return -torch.stack(total).mean()

    expected = direct()
    torch.testing.assert_close(loss, expected)
    for got, want in zip(
        grads, torch.autograd.grad(expected, list(model.parameters()))
    ):
        torch.testing.assert_close(got, want)


def test_make_nonstationary_ica():
    X, u, S, mixing, means, variances = make_nonstationary_ica(
        6, 400, 3, 7, n_layers=3, source_means=True, random_state=0, return_mixing=True
    )
    assert X.shape == (2400, 7) and S.shape == (2400, 3)
    assert np.bincount(u).tolist() == [400] * 6
    first = mixing.matrices[0]
    np.testing.assert_allclose(first.T @ first, np.eye(3), atol=1e-12)
    for a in mixing.matrices[1:]:
        np.testing.assert_allclose(a.T @ a, np.eye(7), atol=1e-12)
    assert ((np.sqrt(variances) >= 0.01) & (np.sqrt(variances) < 3)).all()
    assert ((means >= -3) & (means < 3)).all()
    for k in range(6):
        rows = u == k
        np.testing.assert_allclose(S[rows].mean(0), means[k], atol=0.5)
    np.testing.assert_allclose((X - mixing(S)).var(), 0.01, rtol=0.1)
    again = make_nonstationary_ica(
        6, 400, 3, 7, n_layers=3, source_means=True, random_state=0
    )
    np.testing.assert_array_equal(again[0], X)
    torch_out = mixing(torch.from_numpy(S[:5]))
    np.testing.assert_allclose(torch_out.numpy(), mixing(S[:5]))
    with pytest.raises(ValueError, match="n_features >= n_components"):
        make_nonstationary_ica(2, 10, 3, 2)


def test_warm_start_continues_the_segment_priors_and_checks_the_labels():
    X, u, _ = _segment_data(seed=5)
    params = {"prior": "conditional", "max_iter": 2, "random_state": 0}
    mle = NonlinearICAMLE(warm_start=True, learning_rate_init=0.05, **params)
    mle = _fit(mle, X, u)
    before = mle.prior_variances_.copy()
    _fit(mle, X, u)
    assert not np.allclose(mle.prior_variances_, before)
    with pytest.raises(ValueError, match="not seen in fit"):
        mle.fit(X, u + 1)
    with pytest.raises(ValueError, match="prior='standard'"):
        mle.set_params(prior="standard").fit(X, u)


def test_mle_starts_at_a_vae_fitted_with_the_same_model():
    X, u, _ = _segment_data(seed=6)
    # A step size too small to move anything: the fit ends where it started.
    mle = NonlinearICAMLE(
        prior="conditional", max_iter=1, learning_rate_init=1e-12, random_state=0
    )
    mle = _fit(mle, X, u)
    vae = mle.init_
    assert isinstance(vae, NonlinearICAVAE)
    # One VAE fit, from the linear start.
    assert (vae.prior, vae.hidden_layer_sizes, vae.max_iter, vae.n_init) == (
        "conditional",
        (64,),
        1,
        1,
    )
    assert vae.init == "auto" and vae._starts_linear()
    np.testing.assert_allclose(mle.prior_variances_, vae.prior_variances_, rtol=1e-8)
    np.testing.assert_allclose(mle.prior_means_, vae.prior_means_, atol=1e-9)
    np.testing.assert_allclose(mle.noise_variance_, vae.noise_variance_, rtol=1e-8)
    # The MLE's own segment weights: its training rows, not the VAE's.
    np.testing.assert_allclose(mle.prior_weights_, [1 / 3] * 3)
    z = torch.randn(
        7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        np.testing.assert_allclose(mle.decoder_(z), vae.decoder_(z), atol=1e-8)


def test_which_fits_start_at_a_vae():
    X, u, _ = _segment_data(seed=7)
    params = {"max_iter": 1, "random_state": 0}
    mle = _fit(NonlinearICAMLE(prior="conditional", **params), X, u)
    first = mle.init_
    # A warm start continues the fitted model: no new VAE.
    _fit(mle.set_params(warm_start=True), X, u)
    assert mle.init_ is first
    # The random start, and the standard prior's "auto", have none; a refit
    # drops the previous one.
    _fit(mle.set_params(warm_start=False, init="random"), X, u)
    assert not hasattr(mle, "init_")
    assert not hasattr(_fit(NonlinearICAMLE(**params), X, None), "init_")
    standard = _fit(NonlinearICAMLE(init="vae", **params), X, None)
    assert standard.init_.prior == "standard"
    with pytest.raises(ValueError, match="'init' parameter"):
        NonlinearICAVAE(init="vae").fit(X)


def test_n_init_auto_screens_three_conditional_vae_fits_and_continues_the_best():
    X, u, _ = _segment_data()
    max_iter = CONDITIONAL_SCREEN_EPOCHS + 2
    # No early stop: every initialisation reaches the end of the screening.
    params = {"prior": "conditional", "max_iter": max_iter, "n_iter_no_change": 100}
    # From the linear start ("auto"): one fit.
    linear = _fit(hooked(NonlinearICAVAE)(random_state=0, **params), X, u)
    assert linear.epochs_begun.count(0) == 1
    params["init"] = "random"
    vae = _fit(hooked(NonlinearICAVAE)(random_state=0, **params), X, u)
    assert vae.n_init == "auto"
    # Three initialisations train the screening epochs; one trains on.
    assert vae.epochs_begun.count(0) == 3
    assert vae.epochs_begun.count(CONDITIONAL_SCREEN_EPOCHS - 1) == 3
    assert vae.epochs_begun.count(CONDITIONAL_SCREEN_EPOCHS) == 1
    assert [entry["epoch"] for entry in vae.history_] == list(range(1, max_iter + 1))
    assert vae.n_iter_ == max_iter
    # An explicit n_init trains every initialisation to the end.
    full = _fit(hooked(NonlinearICAVAE)(random_state=0, n_init=3, **params), X, u)
    assert full.epochs_begun.count(max_iter - 1) == 3
    standard = _fit(hooked(NonlinearICAVAE)(max_iter=1), X, u)
    assert standard.epochs_begun.count(0) == 1
    mle = _fit(hooked(NonlinearICAMLE)(prior="conditional", max_iter=1), X, u)
    # The MLE restarts once; its VAE start fits once from the linear start,
    # or, too narrow for it, trains three to the end.
    assert mle.epochs_begun.count(0) == 1 and mle.init_.n_init == 1
    narrow = {"prior": "conditional", "max_iter": 1, "hidden_layer_sizes": (3,)}
    mle = _fit(hooked(NonlinearICAMLE)(**narrow), X, u)
    assert mle.init_.n_init == VAE_START_INITS == 3


def test_screening_continues_the_best_start_and_is_reproducible():
    X, u, _ = _segment_data()
    screen = CONDITIONAL_SCREEN_EPOCHS
    params = {"prior": "conditional", "init": "random"}
    vae = _fit(
        hooked(NonlinearICAVAE)(max_iter=screen + 3, random_state=1, **params), X, u
    )
    starts = [vae.entries[k * screen : (k + 1) * screen] for k in range(3)]
    best = max(starts, key=lambda entries: max(e[VALIDATION] for e in entries))
    # The kept history begins with the best start's screening epochs (in
    # data units: shifted by a constant, so compare the epochs' changes).
    np.testing.assert_allclose(
        np.diff([e[VALIDATION] for e in vae.history_[:screen]]),
        np.diff([e[VALIDATION] for e in best]),
        rtol=1e-9,
    )
    again = _fit(NonlinearICAVAE(max_iter=screen + 3, random_state=0, **params), X, u)
    twice = _fit(NonlinearICAVAE(max_iter=screen + 3, random_state=0, **params), X, u)
    np.testing.assert_array_equal(again.transform(X, u), twice.transform(X, u))
