"""Seconds and peak memory of one selection per strategy of embedding_selection, on synthetic embeddings.

    python3 benchmarks/bench_embedding_selection.py                 # 2,000 and 25,000; 0/200 labeled; k 4/40
    python3 benchmarks/bench_embedding_selection.py --sizes 2000 --strategies probcover
    python3 benchmarks/bench_embedding_selection.py --compare-kmeans   # KMeans vs MiniBatchKMeans at 25,000

Vectors: 256-d, a mixture of --components Gaussian clusters of unequal sizes (Dirichlet weights) around
random centres, L2-normalised, as SAM2 image embeddings are used (see embedding_selection's docstring).
The labeled vectors are further draws from the same mixture; mask-difference scores are uniform draws.
2,000 is ISIC-2017's training set, 25,000 about ISIC 2019's.

Each case (strategy, pool size, labeled count, k) runs in its own fresh Python process: the seconds are
one selection's wall time; the memory is that process's peak resident set (resource ru_maxrss) during
the selection minus its resident set just before it (imports done, vectors loaded), i.e. what the
selection itself added at its peak. An n x n float64 matrix at 25,000 would be 5,000 MB (float32: 2,500).
Targets (DESIGN): under 1 s at 2,000 and under 60 s at 25,000 per strategy. The machine may be shared:
the load average is printed before and after. On a loaded machine --threads 1 is faster: scikit-learn's
OpenMP loops and BLAS wait at every barrier for a thread the scheduler has parked elsewhere.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import embedding_selection  # noqa: E402

STRATEGIES = ("coreset", "typiclust", "probcover", "alps", "mask_difference_diverse")
USES_LABELED = {"coreset", "typiclust", "probcover"}


def synthetic_embeddings(n: int, dim: int, components: int, spread: float, seed: int) -> np.ndarray:
    """n x dim unit vectors from a mixture of `components` Gaussians of unequal weights."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(components, dim))
    members = rng.choice(components, size=n, p=rng.dirichlet(np.ones(components)))
    vectors = centres[members] + spread * rng.normal(size=(n, dim))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def select(strategy: str, pool: np.ndarray, labeled: np.ndarray, k: int, seed: int) -> np.ndarray:
    if strategy == "coreset":
        return embedding_selection.k_center_greedy(pool, labeled, k)
    if strategy == "typiclust":
        return embedding_selection.typiclust(pool, labeled, k, seed=seed)
    if strategy == "probcover":
        return embedding_selection.probcover(pool, labeled, k, seed=seed)
    if strategy == "alps":
        return embedding_selection.alps(pool, k, seed=seed)
    scores = np.random.default_rng(seed).random(len(pool))
    return embedding_selection.mask_difference_diverse(pool, scores, k, seed=seed)


def run_child(args: argparse.Namespace) -> None:
    """One case in this process: print {"seconds", "peak_mb"} as JSON."""
    vectors = np.load(args.child_vectors)
    labeled, pool = vectors[:args.child_labeled], vectors[args.child_pool_start:]
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    chosen = select(args.child_strategy, pool, labeled, args.child_k, args.seed)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert len(chosen) == args.child_k and len(set(chosen.tolist())) == args.child_k
    print(json.dumps({"seconds": seconds, "peak_mb": (peak_kb - before_kb) / 1024}))


def run_case(vectors_file: Path, pool_start: int, strategy: str, labeled: int, k: int, seed: int,
             threads: Optional[int]) -> dict:
    """One case in a fresh process: the first `labeled` rows are labeled, rows from pool_start the pool;
    `threads` caps OpenMP (scikit-learn) and BLAS threads there (None: the libraries' defaults)."""
    env = dict(os.environ)
    if threads:
        env.update({name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    command = [sys.executable, __file__, "--child-strategy", strategy, "--child-vectors", str(vectors_file),
               "--child-labeled", str(labeled), "--child-pool-start", str(pool_start), "--child-k", str(k),
               "--seed", str(seed)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{strategy} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def compare_kmeans(args: argparse.Namespace) -> None:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    vectors = synthetic_embeddings(25_000 + 200, args.dim, args.components, args.spread, args.seed)
    for clusters in (4, 204, 240):
        for name, model in (("KMeans", KMeans(clusters, n_init=1, random_state=args.seed)),
                            ("MiniBatchKMeans", MiniBatchKMeans(clusters, n_init=1, random_state=args.seed,
                                                                batch_size=5000))):
            start = time.perf_counter()
            model.fit(vectors)
            print(f"{name:16s} {clusters:4d} clusters  {time.perf_counter() - start:6.2f} s  "
                  f"inertia {model.inertia_:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 25000], help="pool sizes")
    parser.add_argument("--labeled", type=int, nargs="+", default=[0, 200], help="labeled counts")
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 40], help="k per selection")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--components", type=int, default=30, help="mixture components")
    parser.add_argument("--spread", type=float, default=0.8, help="noise std relative to the centres' scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="OpenMP/BLAS threads per case (default: the libraries' own, all cores)")
    parser.add_argument("--compare-kmeans", action="store_true")
    for name, kind in (("strategy", str), ("vectors", str), ("labeled", int), ("pool-start", int), ("k", int)):
        parser.add_argument(f"--child-{name}", type=kind, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_strategy:
        return run_child(args)
    print(f"load average (1, 5, 15 min) before: {load_average()}   cores: {os.cpu_count()}   "
          f"threads per case: {args.threads or 'library default'}")
    if args.compare_kmeans:
        compare_kmeans(args)
        return print(f"load average after: {load_average()}")
    print(f"{'strategy':24s} {'pool':>6s} {'labeled':>7s} {'k':>3s} {'seconds':>8s} {'peak MB':>8s}")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            vectors_file = Path(folder) / f"vectors{size}.npy"
            np.save(vectors_file, synthetic_embeddings(size + max(args.labeled), args.dim, args.components,
                                                       args.spread, args.seed))
            for strategy in args.strategies:
                for labeled in args.labeled if strategy in USES_LABELED else [0]:
                    for k in args.budgets:
                        case = run_case(vectors_file, max(args.labeled), strategy, labeled, k, args.seed, args.threads)
                        print(f"{strategy:24s} {size:6d} {labeled:7d} {k:3d} {case['seconds']:8.2f} "
                              f"{case['peak_mb']:8.1f}", flush=True)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
