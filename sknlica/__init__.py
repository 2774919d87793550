"""Nonlinear ICA with Gaussian latents for scikit-learn.

The model is ``z ~ N(0, I_m)``, ``x | z ~ N(g(z), sigma^2 I_n)`` with ``g`` a
neural network.  :class:`NonlinearICAMLE` maximises the marginal likelihood
directly, integrating ``z`` out in log space; :class:`NonlinearICAVAE` fits an
amortised variational posterior (ELBO or IWAE).  :mod:`sknlica.datasets`
reproduces the report's data-generating process and :mod:`sknlica.metrics`
its rotation-invariant recovery metrics.
"""

__version__ = "0.1.0.dev0"

from sknlica import datasets, metrics  # noqa: E402
from sknlica._base import TrainingDivergedError  # noqa: E402
from sknlica._marginal import marginal_log_likelihood  # noqa: E402
from sknlica._mle import NonlinearICAMLE  # noqa: E402
from sknlica._vae import NonlinearICAVAE  # noqa: E402

__all__ = [
    "NonlinearICAMLE",
    "NonlinearICAVAE",
    "TrainingDivergedError",
    "datasets",
    "marginal_log_likelihood",
    "metrics",
    "__version__",
]
