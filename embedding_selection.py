"""Choosing a set of images from embedding vectors: N x D pool vectors (and M x D labeled ones) in,
pool positions out, in the order chosen. Nothing here knows about models, files or flags.

- `k_center_greedy`  Sener & Savarese's core-set (k-center greedy, the labeled vectors as centres).
- `typiclust`        Hacohen et al. 2022, TPC_RP: the most typical vector of each large uncovered cluster.
- `probcover`        Yehuda et al. 2022: greedy maximum coverage of delta-balls, delta from cluster purity.
- `alps`             ALPS as MedCAL-Bench adapts it to images: the vector nearest each k-means centre.
- `mask_difference_diverse`  ours: the best mask-difference score of each k-means cluster of the pool.

Which vector per image. Use the spatial mean of the encoder's top FPN level (`backbone_fpn[-1]` of
`LoRA_Sam.encode`, B x 256 x S/16 x S/16, taken before SAM2 adds `no_mem_embed`), L2-normalised to unit
length: one 256-d vector per image. Why this one: it is the level the mask decoders read (the image
embedding), so it describes what SAM2 segments from; it is what MedCAL-Bench, the cold-start benchmark
that includes SAM2, averages per image (`vision_features`, spatial mean); averaging over positions makes
the vector independent of where the lesion sits and of the image size. `no_mem_embed` is one constant
vector added at every position for every image: it carries nothing about the image, so it is left out.
L2 normalisation is what TypiClust and ProbCover do to their self-supervised features (their code
normalises features before k-means, k-NN and balls): on the unit sphere ||a - b||^2 = 2 - 2 cos(a, b),
so every Euclidean rule below compares the directions of two vectors, not a per-image scale that would
otherwise weigh in every distance, and distances lie in [0, 2] whatever the dataset, so a ball radius
means the same everywhere. (MedCAL-Bench feeds its means unnormalised; that is the one difference.)

Common rules. Distances are Euclidean. Every function is seeded (k-means: scikit-learn, k-means++
initialisation, `random_state=seed`, one initialisation) and deterministic for the same input, seed
and thread count; ties go to the lowest position. `k = 0` returns an empty selection; `k` larger than
the pool, a negative `k`, arrays that are not N x D, non-finite values and labeled vectors of another
dimension raise `EmbeddingSelectionError`. When the pool has fewer distinct vectors than the
clusters asked for, k-means makes one cluster per distinct vector and the cluster rule continues
round-robin (see `round_robin`). No step holds an n x n matrix: pairwise distances over all vectors are
computed in row blocks, each pair once (`pair_blocks`), and ProbCover's ball graph is sparse.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
from scipy import sparse
from scipy.spatial.distance import cdist
from sklearn.cluster import KMeans
from sklearn.metrics import pairwise_distances_argmin_min
from sklearn.neighbors import NearestNeighbors

TYPICALITY_NEIGHBOURS = 20  # TypiClust's K: typicality from the 20 nearest neighbours in the cluster
PURITY = 0.95  # ProbCover's alpha: the fraction of pure balls delta must keep
CHUNK_BYTES = 64 << 20  # a block of pairwise distances holds at most this much
T = TypeVar("T")


class EmbeddingSelectionError(ValueError):
    """Bad input to a selection: array shapes, dimensions, non-finite values, k, delta."""


# --------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------


def as_vectors(array: object, name: str, dim: Optional[int] = None) -> np.ndarray:
    """`array` as a float64 N x D array; an empty 1-D array (nothing labeled) becomes 0 x dim."""
    vectors = np.asarray(array, dtype=np.float64)
    if vectors.ndim == 1 and vectors.size == 0 and dim is not None:
        vectors = vectors.reshape(0, dim)
    if vectors.ndim != 2:
        raise EmbeddingSelectionError(f"{name}: expected an N x D array of vectors, got shape {vectors.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise EmbeddingSelectionError(
            f"{name}: vectors of dimension {vectors.shape[1]}, the pool's are {dim} (embeddings of another model?)")
    if not np.isfinite(vectors).all():
        raise EmbeddingSelectionError(f"{name}: {int((~np.isfinite(vectors)).any(axis=1).sum())} vector(s) "
                                      "hold NaN or infinite values")
    return vectors


def checked_budget(k: object, pool_size: int) -> int:
    """k as an int in [0, pool_size]."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise EmbeddingSelectionError(f"k must be an integer, got {k!r}")
    if k < 0:
        raise EmbeddingSelectionError(f"k must be >= 0, got {k}")
    if k > pool_size:
        raise EmbeddingSelectionError(f"k = {k} images asked from a pool of {pool_size}: k must be at most the "
                                      "pool size")
    return int(k)


def checked_inputs(pool: object, labeled: object, k: object) -> Tuple[np.ndarray, np.ndarray, int]:
    """pool N x D, labeled M x D (None or an empty array: nothing labeled), k in [0, N]."""
    pool_vectors = as_vectors(pool, "pool")
    dim = pool_vectors.shape[1]
    labeled_vectors = np.zeros((0, dim)) if labeled is None else as_vectors(labeled, "labeled", dim)
    return pool_vectors, labeled_vectors, checked_budget(k, len(pool_vectors))


def no_selection() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------------------
# shared parts: k-means, round-robin over clusters, row-blocked all-pairs distances
# --------------------------------------------------------------------------------------


def cluster_labels(vectors: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """N x D -> N k-means cluster ids (scikit-learn KMeans, k-means++, one initialisation, random_state=seed).

    Plain (Lloyd) k-means, as the papers. Measured on 25,200 x 256 synthetic embeddings, 2 cores
    (`benchmarks/bench_embedding_selection.py --compare-kmeans`, load average 2.2): KMeans 0.26 / 2.4
    / 7.1 s for 4 / 204 / 240 clusters, MiniBatchKMeans 0.38 / 1.1 / 4.0 s with a 5 / 0.5 / 0.7 %
    higher inertia. Every strategy stays far under its 60 s target with plain k-means, so the
    mini-batch approximation (which TypiClust's code switches to above 50 clusters) is not used.
    With fewer distinct vectors than `n_clusters` there is one cluster per distinct vector.
    """
    distinct = len(np.unique(vectors, axis=0))
    n_clusters = max(1, min(n_clusters, distinct))
    if n_clusters == 1:
        return np.zeros(len(vectors), dtype=np.int64)
    kmeans = KMeans(n_clusters=n_clusters, init="k-means++", n_init=1, random_state=seed)
    return kmeans.fit_predict(vectors).astype(np.int64)


def cluster_members(labels: np.ndarray) -> List[np.ndarray]:
    """N cluster ids -> for each id present, the positions holding it (ascending)."""
    order = np.argsort(labels, kind="stable")
    boundaries = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, boundaries)


def round_robin(ranked_groups: Sequence[np.ndarray], k: int) -> np.ndarray:
    """k positions from groups visited in order, one per group per round.

    ranked_groups: the clusters in the order they are visited, each its candidate positions best first.
    Round 1 takes each group's best candidate, round 2 each group's second, and so on (groups with
    no candidate left are skipped), as TypiClust's code cycles through its clusters when the budget
    exceeds them. Stops at k picks or when every candidate is taken.
    """
    rounds = np.concatenate([np.arange(len(group)) for group in ranked_groups] or [no_selection()])
    visit = np.concatenate([np.full(len(group), g) for g, group in enumerate(ranked_groups)] or [no_selection()])
    positions = np.concatenate(list(ranked_groups) or [no_selection()])
    return positions[np.lexsort((visit, rounds))[:k]].astype(np.int64)


def ranked(candidates: np.ndarray, badness: np.ndarray) -> np.ndarray:
    """candidates sorted by badness ascending, ties by position."""
    return candidates[np.lexsort((candidates, badness))]


def pair_blocks(vectors: np.ndarray, reduce: Callable[[np.ndarray, int], T]) -> List[T]:
    """Euclidean distances of every pair of N x D vectors, each pair once, one block of rows at a time.

    reduce(block, start) gets the float32 distances from vectors [start, start + rows) to vectors
    [start, N): block[i, j] = |v[start + i] - v[start + j]|, so block[i, i] (exactly 0) is the vector
    itself, and pairs below the diagonal are left to the earlier blocks (distance is symmetric: half
    the work of full rows). Its results come back in order. A block holds at most CHUNK_BYTES.
    Computed as sqrt(|x|^2 + |y|^2 - 2 x.y) in float32: half the time of float64 (these passes are
    ProbCover's cost at 25,000 x 256), with an error of about 1e-5 on unit vectors, far below any
    ball radius that matters; small integer coordinates are exact.
    """
    data = vectors.astype(np.float32)
    squared_norms = np.einsum("nd,nd->n", data, data)
    rows = max(1, CHUNK_BYTES // (4 * max(len(data), 1)))
    results = []
    for start in range(0, len(data), rows):
        stop = min(start + rows, len(data))
        block = data[start:stop] @ data[start:].T
        block *= -2
        block += squared_norms[start:stop, None]
        block += squared_norms[None, start:]
        np.maximum(block, 0, out=block)
        block[np.arange(stop - start), np.arange(stop - start)] = 0
        results.append(reduce(np.sqrt(block, out=block), start))
    return results


# --------------------------------------------------------------------------------------
# core-set: k-center greedy
# --------------------------------------------------------------------------------------


def k_center_greedy(pool: np.ndarray, labeled: Optional[np.ndarray], k: int) -> np.ndarray:
    """Sener & Savarese's core-set selection (k-center greedy): pool N x D, labeled M x D -> k positions.

    The labeled vectors are the initial centres; each step picks the pool vector farthest from its
    nearest centre and makes it a centre. With nothing labeled, the first centre is the pool vector
    nearest the pool's mean. If every remaining vector coincides with a centre (duplicates), the
    remaining picks are the lowest positions not yet taken. Cost: N x M distances once, then N per pick.
    """
    pool, labeled, k = checked_inputs(pool, labeled, k)
    if k == 0:
        return no_selection()
    return farthest_first(pool, labeled, k, np.zeros(len(pool), dtype=bool))


def farthest_first(pool: np.ndarray, centres: np.ndarray, k: int, taken: np.ndarray) -> np.ndarray:
    """k-center greedy order of `k` pool vectors not `taken` (N bools), given C x D initial centres
    (none: the first pick is the untaken vector nearest the pool's mean)."""
    taken = taken.copy()
    chosen: List[int] = []
    if len(centres) == 0:
        to_mean = cdist(pool, pool.mean(axis=0, keepdims=True))[:, 0]
        chosen.append(int(np.argmin(np.where(taken, np.inf, to_mean))))
        taken[chosen[0]] = True
        centres = pool[chosen]
    nearest = pairwise_distances_argmin_min(pool, centres)[1]
    while len(chosen) < k:
        pick = int(np.argmax(np.where(taken, -1.0, nearest)))
        chosen.append(pick)
        taken[pick] = True
        nearest = np.minimum(nearest, cdist(pool, pool[pick:pick + 1])[:, 0])
    return np.asarray(chosen, dtype=np.int64)


# --------------------------------------------------------------------------------------
# TypiClust (TPC_RP)
# --------------------------------------------------------------------------------------


def typiclust(pool: np.ndarray, labeled: Optional[np.ndarray], k: int, seed: int = 0) -> np.ndarray:
    """Hacohen et al. 2022, TPC_RP: pool N x D, labeled M x D -> k pool positions.

    1. k-means (seeded, see `cluster_labels`) of labeled + pool into M + k clusters.
    2. Clusters ordered by how many labeled vectors they hold (fewest first), then by size (largest
       first), then by their lowest pool position: with at least k clusters free of labeled vectors,
       the k largest of those are visited, largest first, one pick each.
    3. From each, its most typical pool vector: typicality(x) = 1 / mean distance from x to its
       min(20, n - 1) nearest neighbours among the cluster's n pool vectors (labeled members are left
       out, as in the official code; this only matters for round-robin picks from clusters holding
       labeled vectors), i.e. the smallest mean distance wins; ties go to the lowest position; a
       cluster with one pool vector gives that one.
    If fewer clusters than k hold a pool vector, picks continue round-robin in the same order with each
    cluster's next most typical vector, as the official code cycles through its clusters.

    Differences from the official code (avihu111/TypiClust, deep-al/pycls/al/typiclust.py), each said:
    distances are Euclidean (its faiss IndexFlatL2 returns squared ones, the paper says distance);
    clusters of 5 or fewer vectors are not dropped (they come last by size anyway, and dropping them
    would leave pools of ten images without any cluster); the cluster count is not capped at 500
    (M + k stays far below it here); a second pick from a cluster keeps the first pass's typicality
    instead of recomputing it without the first pick.
    """
    pool, labeled, k = checked_inputs(pool, labeled, k)
    if k == 0:
        return no_selection()
    vectors = np.concatenate([labeled, pool])
    labels = cluster_labels(vectors, len(labeled) + k, seed)
    visit_order = typiclust_visit_order(cluster_members(labels), len(labeled))[:k]
    return round_robin([most_typical_first(vectors, members, len(labeled)) for members in visit_order], k)


def typiclust_visit_order(clusters: List[np.ndarray], n_labeled: int) -> List[np.ndarray]:
    """Clusters (members as positions in labeled + pool, labeled first) holding a pool vector, by
    (labeled members ascending, size descending, lowest member position ascending)."""
    with_pool = [members for members in clusters if (members >= n_labeled).any()]
    keys = [(int((members < n_labeled).sum()), -len(members), int(members[members >= n_labeled].min()))
            for members in with_pool]
    return [with_pool[i] for i in sorted(range(len(with_pool)), key=keys.__getitem__)]


def most_typical_first(vectors: np.ndarray, members: np.ndarray, n_labeled: int) -> np.ndarray:
    """The cluster's pool vectors (as pool positions), most typical first (see `typiclust`)."""
    in_pool = members[members >= n_labeled]
    neighbours = min(TYPICALITY_NEIGHBOURS, len(in_pool) - 1)
    if neighbours == 0:
        return in_pool - n_labeled
    search = NearestNeighbors(n_neighbors=neighbours).fit(vectors[in_pool])
    mean_distance = search.kneighbors()[0].mean(axis=1)  # no query given: a vector is not its own neighbour
    return ranked(in_pool - n_labeled, mean_distance)


# --------------------------------------------------------------------------------------
# ProbCover
# --------------------------------------------------------------------------------------


def probcover(pool: np.ndarray, labeled: Optional[np.ndarray], k: int, delta: Optional[float] = None,
              seed: int = 0) -> np.ndarray:
    """Yehuda et al. 2022: pool N x D, labeled M x D -> k pool positions.

    Every vector x has the ball B(x) = {y : |x - y| < delta} (labeled and pool vectors alike; strict,
    as the official code's graph). delta, unless given: `purity_delta` against a k-means partition
    (seeded) of labeled + pool into M + k clusters. Greedy maximum coverage: the labeled vectors' balls
    count as covered; each step picks the pool vector whose ball holds the most vectors not yet
    covered (ties: lowest position) and covers them. The ball graph is sparse, built in row blocks; it
    holds one entry per pair closer than delta, so its size is the data's: about N^2 / (M + k) entries
    if the balls grew to fill their clusters.

    Fallback, when nothing more can be covered before k picks (every vector lies in a chosen or
    labeled ball): the remaining picks are k-center greedy (`farthest_first`) from the labeled and
    chosen vectors, i.e. next the vector farthest from all of them, the one the balls cover worst.
    (The official code would take the argmax of all-zero degrees: vector 0, a labeled or chosen one.)
    A partition into one cluster (k = 1 with nothing labeled, or one distinct vector) makes every ball
    pure at any delta, so delta is infinite and the whole selection is that fallback, starting at the
    vector nearest the mean.
    """
    pool, labeled, k = checked_inputs(pool, labeled, k)
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float, np.number))
                              or not delta > 0):  # also catches NaN
        raise EmbeddingSelectionError(f"delta must be a positive number, got {delta!r}")
    if k == 0:
        return no_selection()
    vectors = np.concatenate([labeled, pool])
    if delta is None:
        delta = purity_delta(vectors, cluster_labels(vectors, len(labeled) + k, seed))
    covering = [] if math.isinf(delta) else greedy_coverage(ball_graph(vectors, delta), len(labeled), k)
    chosen = np.asarray(covering, dtype=np.int64) - len(labeled)
    taken = np.zeros(len(pool), dtype=bool)
    taken[chosen] = True
    rest = farthest_first(pool, np.concatenate([labeled, pool[chosen]]), k - len(chosen), taken)
    return np.concatenate([chosen, rest]).astype(np.int64)


def nearest_in_other_cluster(vectors: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """N x D vectors, N cluster ids -> N distances to the nearest vector of another cluster (inf if none)."""
    nearest = np.full(len(vectors), np.inf, dtype=np.float32)

    def reduce(block: np.ndarray, start: int) -> None:
        stop = start + len(block)
        block[labels[start:stop, None] == labels[None, start:]] = np.inf
        nearest[start:stop] = np.minimum(nearest[start:stop], block.min(axis=1))
        nearest[start:] = np.minimum(nearest[start:], block.min(axis=0))  # the same pairs seen from the columns

    pair_blocks(vectors, reduce)
    return nearest.astype(np.float64)


def purity_delta(vectors: np.ndarray, labels: np.ndarray, purity: float = PURITY) -> float:
    """The largest delta whose balls B(x) = {y : |x - y| < delta} are pure for at least `purity` of the
    vectors (a ball is pure when every vector in it has x's cluster id).

    B(x) is pure exactly when delta <= r(x), r(x) = distance from x to the nearest vector of another
    cluster; so purity(delta) = #{x : r(x) >= delta} / N, and the largest delta keeping it >= purity
    is the m-th largest r(x), m = ceil(purity * N). Exact (no grid of candidate deltas, unlike
    MedCAL-Bench's 100-step search); inf when there is one cluster.
    """
    if not 0 < purity <= 1:
        raise EmbeddingSelectionError(f"purity must be in (0, 1], got {purity}")
    needed = math.ceil(purity * len(vectors) - 1e-9)
    return float(np.sort(nearest_in_other_cluster(vectors, labels))[::-1][needed - 1])


def ball_graph(vectors: np.ndarray, delta: float) -> sparse.csr_matrix:
    """N x N sparse boolean matrix: row x holds the vectors y with |x - y| < delta (x itself included)."""
    def reduce(block: np.ndarray, start: int) -> Tuple[np.ndarray, np.ndarray]:
        rows, columns = np.nonzero(block < delta)
        upper = columns >= rows  # the block's leading square holds its pairs both ways: keep one
        return (rows[upper] + start).astype(np.int32), (columns[upper] + start).astype(np.int32)

    rows, columns = (np.concatenate(part) for part in zip(*pair_blocks(vectors, reduce)))
    mirrored = rows != columns
    rows, columns = np.concatenate([rows, columns[mirrored]]), np.concatenate([columns, rows[mirrored]])
    return sparse.csr_matrix((np.ones(len(rows), dtype=bool), (rows, columns)), shape=(len(vectors), len(vectors)))


def greedy_coverage(graph: sparse.csr_matrix, n_labeled: int, k: int) -> List[int]:
    """Up to k rows >= n_labeled of the ball graph, each covering the most vectors not yet covered.

    The first n_labeled rows (the labeled vectors' balls) start covered. Stops early when no ball
    adds anything (see `probcover`'s fallback).
    """
    uncovered = np.ones(graph.shape[0], dtype=np.int32)
    uncovered[graph[:n_labeled].indices] = 0
    chosen: List[int] = []
    for _ in range(k):
        gain = graph @ uncovered  # N: uncovered vectors in each ball
        gain[:n_labeled] = -1
        best = int(np.argmax(gain))
        if gain[best] <= 0:
            break
        chosen.append(best)
        uncovered[graph.indices[graph.indptr[best]:graph.indptr[best + 1]]] = 0
    return chosen


# --------------------------------------------------------------------------------------
# ALPS (MedCAL-Bench's image adaptation) and the diversity-aware mask difference
# --------------------------------------------------------------------------------------


def alps(pool: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """ALPS as MedCAL-Bench runs it on images: pool N x D -> k pool positions.

    k-means (seeded) of the pool into k clusters; from each cluster the vector nearest its centre (the
    mean of its members; ties: lowest position); clusters visited largest first (ties: lowest member
    position). This is MedCAL-Bench's "ALPS" (HiLab-git/MedCAL-Bench, FM-AL/select_samples.py): the
    original ALPS (Yuan et al. 2020) clusters BERT "surprisal embeddings" from masked-language-model
    losses; the benchmark replaces them with one foundation-model feature vector per image, which is
    what we have. It is a one-shot cold-start rule: it takes no labeled set (MedCAL-Bench selects the
    whole budget at once, before anything is labeled); with labeled images, TypiClust is its
    label-aware counterpart. The benchmark lists clusters in k-means id order, which carries no
    meaning; here the largest comes first, so a budget cut short keeps the most populous ones.
    """
    pool, _, k = checked_inputs(pool, None, k)
    if k == 0:
        return no_selection()
    clusters = cluster_members(cluster_labels(pool, k, seed))
    groups = [ranked(members, cdist(pool[members], pool[members].mean(axis=0, keepdims=True))[:, 0])
              for members in clusters]
    order = sorted(range(len(groups)), key=lambda g: (-len(groups[g]), int(groups[g].min())))
    return round_robin([groups[g] for g in order], k)


def mask_difference_diverse(pool: np.ndarray, scores: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Diversity-aware mask difference (ours): pool N x D embeddings, N mask-difference scores -> k positions.

    k-means (seeded) of the pool's embeddings into k clusters; from each cluster its highest-scoring
    image; the picks ordered by score, highest first (ties: lowest position). With fewer distinct
    embeddings than k, picks continue round-robin with each cluster's next-highest score.

    Why this design. Plain top-k by mask difference spends the budget on near-duplicates: photos of one
    lesion type that SAM2 finds equally hard score alike, and all k slots go to one kind of image.
    Clustering the pool into exactly k groups and taking the hardest image of each keeps the score as
    the only judge inside a cluster -- each pick is the image MD-SAM-AL itself would pick among images
    of that look -- and spends one slot per region of embedding space, so two near-duplicates, which
    land in one cluster, cannot both be chosen. It adds no parameter to tune: a score-weighted
    k-center would have to trade a score against a distance with a weight that has no natural value,
    and a radius rule would need a delta. It is "cluster, then the most informative per cluster", the
    pattern of diverse mini-batch active learning (Zhdanov 2019) and of TypiClust's cluster step, with
    mask difference in place of typicality. The labeled images are not used: the pool is a fresh
    draw each epoch and the rule only keeps this epoch's picks apart from each other.
    """
    pool, _, k = checked_inputs(pool, None, k)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(pool),):
        raise EmbeddingSelectionError(f"scores: expected one per pool vector, shape ({len(pool)},), got {scores.shape}")
    if not np.isfinite(scores).all():
        raise EmbeddingSelectionError(f"scores: {int((~np.isfinite(scores)).sum())} value(s) are NaN or infinite")
    if k == 0:
        return no_selection()
    groups = [ranked(members, -scores[members]) for members in cluster_members(cluster_labels(pool, k, seed))]
    order = sorted(range(len(groups)), key=lambda g: (-scores[groups[g][0]], int(groups[g][0])))
    return round_robin([groups[g] for g in order], k)
