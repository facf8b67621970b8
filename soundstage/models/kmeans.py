"""k-means for HuBERT units: fitting as fairseq's ``learn_kmeans.py`` does, assigning as its
``dump_km_label.py`` does, and importing a released scikit-learn k-means model.

``fit_kmeans(x, k, backend="faiss", seed=0) -> centroids [k, dim]``; backends: ``faiss`` (GPU
when one is visible, else CPU; full-batch Lloyd from k-means++ seeds) and ``sklearn``, the
reference: ``MiniBatchKMeans`` with exactly fairseq's settings. ``load_centroids`` reads ``.npy``
or, with ``trust_pickle``, a joblib pickle through a restricted unpickler
(``soundstage.models.safe_pickle``) that builds nothing but arrays and an inert estimator.
"""

from __future__ import annotations

import math
import pickle

import numpy as np

from soundstage.models.safe_pickle import load_joblib

#: fairseq examples/hubert/simple_kmeans/learn_kmeans.py defaults
SKLEARN_FAIRSEQ_SETTINGS = dict(
    init="k-means++",
    max_iter=100,
    batch_size=10000,
    tol=0.0,
    max_no_improvement=100,
    init_size=None,
    n_init=20,
    reassignment_ratio=0.0,
    compute_labels=False,
)
#: faiss settings, chosen with benchmarks/bench_kmeans.py (see benchmarks/README.md): Lloyd on every
#: sampled frame, started like sklearn from k-means++ seeds drawn on a subsample of ``init_size``
#: frames (faiss's own random start lands in poor local minima on well-separated clusters)
FAISS_SETTINGS = dict(niter=20, nredo=1, max_points_per_centroid=1 << 30, init="k-means++", init_size=10000)


def fit_kmeans(x, k: int, backend: str = "faiss", seed: int = 0, device: str = "auto", **options) -> np.ndarray:
    """Centroids ``[k, dim]`` float32 of the rows of ``x`` (``[n, dim]``).

    ``options`` override ``FAISS_SETTINGS`` / ``SKLEARN_FAIRSEQ_SETTINGS`` for experiments.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected features [n, dim], got shape {x.shape}")
    if x.shape[0] < k:
        raise ValueError(f"cannot fit {k} centroids to {x.shape[0]} frames; sample more clips or lower k")
    if backend == "faiss":
        import faiss  # heavy; only the faiss backend (units workers need neither)

        settings = {**FAISS_SETTINGS, **options}
        init, init_size = settings.pop("init"), settings.pop("init_size")
        use_gpu = device != "cpu" and faiss.get_num_gpus() > 0
        km = faiss.Kmeans(x.shape[1], int(k), seed=int(seed), gpu=use_gpu, verbose=False, **settings)
        km.train(x, init_centroids=kmeans_plusplus_init(x, k, seed, init_size) if init == "k-means++" else None)
        return np.asarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1])
    if backend == "sklearn":
        from sklearn.cluster import MiniBatchKMeans  # heavy; only the sklearn backend

        km = MiniBatchKMeans(n_clusters=int(k), random_state=int(seed), **{**SKLEARN_FAIRSEQ_SETTINGS, **options})
        km.fit(x)
        return km.cluster_centers_.astype(np.float32)
    raise ValueError(f"unknown k-means backend {backend!r}; use faiss or sklearn")


def sklearn_kmeans(centroids: np.ndarray, seed: int = 0):
    """A fitted scikit-learn ``MiniBatchKMeans`` (fairseq's settings) holding ``centroids``: what
    fairseq's ``learn_kmeans.py`` saves with ``joblib.dump`` and ``dump_km_label.py`` reads
    (``cluster_centers_`` only). The centres are float64, so ApplyKmeans's distances are computed
    in float64, like ``nearest_centroid``; ``predict`` then wants float64 input, as sklearn's own
    float64 models do."""
    from sklearn.cluster import MiniBatchKMeans  # heavy; only the sklearn backend
    from sklearn.utils._openmp_helpers import _openmp_effective_n_threads  # what fit() sets; predict() reads it

    centroids = np.asarray(centroids, dtype=np.float64)
    km = MiniBatchKMeans(n_clusters=len(centroids), random_state=int(seed), **SKLEARN_FAIRSEQ_SETTINGS)
    km.cluster_centers_ = centroids
    km.n_features_in_ = centroids.shape[1]
    km._n_features_out = len(centroids)
    km._n_threads = _openmp_effective_n_threads()
    km.n_iter_ = km.n_steps_ = 0  # not fitted here: the centroids come from the kmeans stage
    return km


def kmeans_plusplus_init(x: np.ndarray, k: int, seed: int, init_size: int) -> np.ndarray:
    """k-means++ seeds (sklearn's greedy variant) drawn from ``init_size`` random rows of ``x``."""
    from sklearn.cluster import kmeans_plusplus  # heavy; only the sklearn backend

    rng = np.random.RandomState(seed)
    rows = x if len(x) <= init_size else x[np.sort(rng.choice(len(x), max(init_size, k), replace=False))]
    centers, _ = kmeans_plusplus(rows, int(k), random_state=rng)
    return np.ascontiguousarray(centers, dtype=np.float32)


def nearest_centroid(x, centroids, chunk: int = 32768) -> tuple[np.ndarray, np.ndarray]:
    """``(index, squared distance)`` of the nearest centroid for each row of ``x``.

    fairseq's ``dump_km_label.py`` formula, ``‖x‖² − 2x·C + ‖C‖²``, evaluated in float64 so
    that rounding cannot flip the argmin between near-equal distances (exact ties go to the
    lower index, as ``np.argmin``).
    """
    c = np.asarray(centroids, dtype=np.float64)
    c_sq = (c**2).sum(1)
    x = np.asarray(x)
    index = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float64)
    for start in range(0, len(x), chunk):
        xs = np.asarray(x[start : start + chunk], dtype=np.float64)
        d = (xs**2).sum(1, keepdims=True) - 2.0 * (xs @ c.T) + c_sq
        index[start : start + len(xs)] = d.argmin(1)
        dist[start : start + len(xs)] = np.maximum(d[np.arange(len(xs)), index[start : start + len(xs)]], 0.0)
    return index, dist


def inertia_per_frame(x, centroids) -> float:
    """Mean squared distance to the nearest centroid (fairseq: ``-km.score(x) / len(x)``)."""
    return float(nearest_centroid(x, centroids)[1].mean())


def sample_clip_ids(clip_ids, percent: float, seed: int) -> list:
    """fairseq's sample: ``ceil(n * percent)`` clips without replacement (all when percent <= 0 or >= 1).

    Clip ids are sorted first so that the sample does not depend on the manifest's row order.
    """
    ids = sorted(clip_ids)
    if percent <= 0 or percent >= 1:
        return ids
    n = math.ceil(len(ids) * percent)
    chosen = np.random.RandomState(seed).choice(len(ids), n, replace=False)
    return [ids[i] for i in sorted(chosen)]


# ------------------------------------------------------------------------ importing a model


class SklearnKMeansStandIn:
    """Inert stand-in for a pickled scikit-learn k-means estimator: keeps its attributes only."""


_SKLEARN_KMEANS = {
    (module, name): SklearnKMeansStandIn
    for module in ("sklearn.cluster._kmeans", "sklearn.cluster.k_means_")
    for name in ("MiniBatchKMeans", "KMeans")
}


def load_centroids(path: str, trust_pickle: bool = False) -> np.ndarray:
    """Centroids ``[k, dim]`` from a ``.npy`` file or a joblib-pickled scikit-learn k-means."""
    if path.endswith(".npy"):
        centroids = np.load(path, allow_pickle=False)
    else:
        if not trust_pickle:
            raise ValueError(
                f"{path} is a pickle (joblib); it is read only with --trust-pickle. Or convert it once: "
                "np.save('centroids.npy', joblib.load(path).cluster_centers_)"
            )
        try:
            model = load_joblib(path, _SKLEARN_KMEANS, "a scikit-learn k-means model")
        except pickle.UnpicklingError as e:  # refused by design: the user's file, not a bug
            raise ValueError(f"{path}: {e}") from None
        centroids = getattr(model, "cluster_centers_", None)
        if centroids is None:
            raise ValueError(f"{path}: the pickled k-means model has no cluster_centers_")
    centroids = np.asarray(centroids, dtype=np.float32)
    if centroids.ndim != 2:
        raise ValueError(f"{path}: centroids must be [k, dim], got shape {centroids.shape}")
    return centroids
