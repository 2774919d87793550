"""Hyperparameter search on a real Dask cluster through joblib's "dask" backend.

The cluster is a ``distributed.LocalCluster`` with worker *processes* bound to
the loopback interface, so estimators, data and fitted models really cross
process boundaries by pickling -- as on a multi-machine cluster.
``distributed`` is in the ``test`` extra: a missing install fails here
rather than skipping.
"""

from __future__ import annotations

import os
import warnings

import joblib
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, KFold, cross_validate

from sknlica import NonlinearICAMLE, NonlinearICAVAE
from sknlica.datasets import make_nonlinear_ica
from sknlica.metrics import ProcrustesScorer

FAST = {"max_iter": 3, "batch_size": 64, "random_state": 0, "n_threads": 1}


@pytest.fixture(scope="module")
def client():
    with warnings.catch_warnings():
        # Port and resource notices of a loopback-only cluster.
        warnings.simplefilter("ignore")
        cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )
    with cluster, Client(cluster) as dask_client:
        yield dask_client


@pytest.fixture(scope="module")
def data():
    X, Z = make_nonlinear_ica(300, n_components=2, n_features=5, random_state=0)
    return X, Z


def _search(n_jobs):
    return GridSearchCV(
        NonlinearICAMLE(n_nodes=64, n_eval_nodes=256, **FAST),
        {"hidden_layer_sizes": [(8,), (16,)], "learning_rate_init": [3e-3, 1e-2]},
        cv=KFold(2),
        n_jobs=n_jobs,
    )


def test_grid_search_runs_on_dask_workers_and_matches_a_local_run(client, data):
    X, _ = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        local = _search(n_jobs=1).fit(X)
        with get_task_stream(client) as tasks, joblib.parallel_backend("dask"):
            remote = _search(n_jobs=-1).fit(X)
    # The fits ran in the workers' processes, not here.
    workers = {t["worker"] for t in tasks.data}
    assert workers and workers <= set(client.scheduler_info()["workers"])
    pids = client.run(os.getpid)
    assert os.getpid() not in pids.values()
    # Seeded fits are deterministic wherever they run (one torch thread each).
    np.testing.assert_allclose(
        remote.cv_results_["mean_test_score"],
        local.cv_results_["mean_test_score"],
        rtol=1e-10,
    )
    assert remote.best_params_ == local.best_params_
    assert np.isfinite(remote.score(X))


def test_cross_validate_vae_with_a_latent_scorer_on_dask(client, data):
    X, Z = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with joblib.parallel_backend("dask"):
            result = cross_validate(
                NonlinearICAVAE(n_eval_samples=64, **FAST),
                X,
                Z,
                cv=KFold(3),
                scoring={"ll": None, "procrustes": ProcrustesScorer()},
                return_estimator=True,
                n_jobs=-1,
            )
    assert np.isfinite(result["test_ll"]).all()
    procrustes = result["test_procrustes"]  # 1 - disparity
    assert ((procrustes >= 0) & (procrustes <= 1)).all()
    # Fitted estimators came back from the workers as CPU state and work here.
    for estimator in result["estimator"]:
        assert np.isfinite(estimator.transform(X)).all()


def test_a_fitted_estimator_pickles_to_a_worker_and_scores_there(client, data):
    X, _ = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = NonlinearICAMLE(n_nodes=64, n_eval_nodes=256, **FAST).fit(X)
    remote = client.submit(lambda est, rows: est.score_samples(rows), model, X)
    np.testing.assert_allclose(remote.result(), model.score_samples(X), rtol=1e-12)
