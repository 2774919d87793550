"""scikit-learn's estimator checks, with no expected failures."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from sknlica import NonlinearICAMLE, NonlinearICAVAE

# Small networks and node budgets keep each check's fit to a fraction of a second.
SMALL = {"max_iter": 3, "n_nodes": 64, "n_eval_nodes": 256, "hidden_layer_sizes": (8,)}
SMALL_VAE = {"max_iter": 3, "n_eval_samples": 64, "hidden_layer_sizes": (8,)}

ESTIMATORS = [
    NonlinearICAMLE(**SMALL),
    NonlinearICAMLE(**SMALL, gradient="analytic", integration="gauss_hermite"),
    NonlinearICAMLE(**SMALL, solver="sgd", early_stopping=False, integration="grid"),
    NonlinearICAMLE(**SMALL, noise="diagonal", gradient="analytic"),
    NonlinearICAVAE(**SMALL_VAE),
    NonlinearICAVAE(**SMALL_VAE, objective="elbo", kl_warmup_epochs=2),
    NonlinearICAVAE(**SMALL_VAE, gradient_estimator="score_function"),
    NonlinearICAVAE(**SMALL_VAE, training="alternating", solver="sgd"),
    NonlinearICAVAE(**SMALL_VAE, amortized_variance=True, early_stopping=False),
    NonlinearICAVAE(**SMALL_VAE, noise="diagonal"),
    # y is the auxiliary variable: the checks pass labels or continuous
    # values, one segment per distinct value either way.
    NonlinearICAMLE(**SMALL, prior="conditional"),
    NonlinearICAVAE(**SMALL_VAE, prior="conditional", prior_means=False),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
