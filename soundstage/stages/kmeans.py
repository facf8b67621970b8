"""kmeans: K centroids learnt from a sample of a hubert cache (fairseq ``learn_kmeans.py``).

The sample is ``--percent`` of the cached clips (all their frames), drawn with ``--seed``.
Backends: ``faiss`` (GPU when one is visible, else CPU; full-batch Lloyd), the default, and
``sklearn``, the reference: ``MiniBatchKMeans`` with exactly fairseq's settings. The result
stores the centroids and the inertia per frame on the sample (fairseq's "total inertia":
mean squared distance to the nearest centroid). Changing K, the sample or the backend re-fits
only this stage: the features come from the hubert cache untouched.

``--import-centroids`` takes an existing k-means model instead of fitting: centroids as
``.npy``, or a joblib-pickled scikit-learn k-means such as fairseq's released
``hubert_base_ls960_L9_km500.bin``. A pickle is read only with ``--trust-pickle``, and even then
through a restricted unpickler that builds nothing but numpy arrays and an inert stand-in for
the estimator.

The k-means code itself (fitting, assignment, importing) is ``soundstage.models.kmeans``.
"""

import numpy as np

from soundstage.device import device_param, resolve_device
from soundstage.models.kmeans import fit_kmeans, inertia_per_frame, load_centroids, sample_clip_ids
from soundstage.pipeline.identity import model_identity
from soundstage.pipeline.progress import progress_bar
from soundstage.pipeline.stage import Param, Stage, Upstream


def read_sample(reader, clip_ids, progress: bool = False) -> np.ndarray:
    """All frames of ``clip_ids`` from a hubert cache, as one float32 array: allocated once from
    the frame counts in the cache's index and filled clip by clip, so the peak is the sample and
    one clip (not a list of float32 copies and then their concatenation: twice the sample)."""
    lengths = reader.lengths("features", clip_ids)
    dim = np.shape(reader[clip_ids[0]]["features"])[1:] if len(clip_ids) else (0,)
    sample = np.empty((int(lengths.sum()), *dim), dtype=np.float32)
    at = 0
    bar = progress_bar(len(clip_ids), "kmeans: reading features", progress)
    for cid, n in zip(clip_ids, lengths.tolist()):
        bar.update(1)
        sample[at : at + n] = reader[cid]["features"]
        at += n
    bar.close()
    return sample


def fit(ctx):
    params, reader = ctx.params, ctx.upstream["hubert"]
    cached = [cid for cid in ctx.clip_ids if cid in reader]
    if len(cached) < len(ctx.clip_ids):
        ctx.log(f"kmeans: {len(ctx.clip_ids) - len(cached)} manifest clips have no hubert features; sampling from {len(cached)}")
    if not cached:
        raise ValueError("the hubert cache holds none of the manifest's clips")
    sample = sample_clip_ids(cached, params["percent"], params["seed"])
    x = read_sample(reader, sample, ctx.progress)
    ctx.log(f"kmeans: {len(sample)} clips, {len(x)} frames of dim {x.shape[1]}")
    if params["import_centroids"]:
        centroids = load_centroids(params["import_centroids"], params["trust_pickle"])
        if centroids.shape[1] != x.shape[1]:
            raise ValueError(f"imported centroids have dim {centroids.shape[1]}, the features {x.shape[1]}")
    else:
        device = resolve_device(params["device"])
        centroids = fit_kmeans(x, params["k"], params["backend"], params["seed"], device=device)
    inertia = inertia_per_frame(x, centroids)
    ctx.log(f"kmeans: inertia per frame {inertia:.5f}")
    return {
        "centroids": centroids,
        "inertia_per_frame": np.array([inertia], dtype=np.float64),
        "sample_clips": np.array([len(sample)], dtype=np.int64),
        "sample_frames": np.array([len(x)], dtype=np.int64),
    }


STAGE = Stage(
    name="kmeans",
    version=1,
    kind="global",
    help="Learn K centroids from a sample of the hubert features (fairseq learn_kmeans), or import them.",
    upstream=[Upstream("hubert", "hubert")],
    params=[
        Param(
            "k",
            int,
            100,
            "number of clusters (not used with --import-centroids: the file has them)",
            applies=lambda params: not params["import_centroids"],
        ),
        Param("percent", float, 0.1, "fraction of the cached clips to fit on (fairseq --percent; <= 0 or >= 1: all)"),
        Param("seed", int, 0, "seed of the clip sample and of the k-means initialisation"),
        Param(
            "backend",
            str,
            "faiss",
            "faiss (GPU if present), or sklearn MiniBatchKMeans with fairseq's settings",
            choices=("faiss", "sklearn"),
        ),
        Param(
            "import_centroids",
            str,
            None,
            "use these centroids instead of fitting: .npy, or a joblib scikit-learn k-means (.bin, needs --trust-pickle)",
            identity=model_identity,
        ),
        Param("trust_pickle", bool, False, "allow reading --import-centroids from a pickle", fingerprint=False, is_flag=True),
        device_param("where faiss runs: auto (GPU when present) or cpu"),
    ],
    fit=fit,
    resources={"gpus": 1, "cpus": 8, "mem": "64G"},
)
