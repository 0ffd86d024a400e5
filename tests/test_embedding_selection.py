"""embedding_selection: each rule on small point sets whose answer is worked out by hand in the comments,
the fallbacks, bad input, determinism, and row-blocked distances equal to a direct computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

import embedding_selection as es

# Three blobs far apart (k-means into 3 clusters can only find them), sizes 6 (A), 4 (B), 3 (C).
BLOBS = np.array([
    [0, 101],  # 0 C
    [102, 0],  # 1 B
    [1, 0],  # 2 A
    [0, 0],  # 3 A
    [101, 0],  # 4 B
    [0, 1],  # 5 A
    [3, 3],  # 6 A
    [100, 0],  # 7 B
    [0, 100],  # 8 C
    [-1, 0],  # 9 A
    [105, 0],  # 10 B
    [0, -1],  # 11 A
    [0, 103],  # 12 C
], dtype=float)


# --------------------------------------------------------------------------------------
# k-center greedy
# --------------------------------------------------------------------------------------


def test_coreset_starts_nearest_the_mean_without_labels():
    pool = np.array([[10, 0], [1, 1], [0, 10], [-9, -9]], dtype=float)
    # mean (0.5, 0.5): nearest is (1, 1) -> 1. Farthest from it: (10,0) and (0,10) at sqrt(82),
    # (-9,-9) at sqrt(200) -> 3. Then (10,0): min(sqrt(82), sqrt(442)), (0,10): min(sqrt(82), sqrt(442)),
    # a tie -> the lower position 0, then 2.
    assert es.k_center_greedy(pool, None, 4).tolist() == [1, 3, 0, 2]
    assert es.k_center_greedy(pool, np.zeros((0, 2)), 2).tolist() == [1, 3]


def test_coreset_takes_labeled_vectors_as_centres():
    labeled = np.array([[0, 0]], dtype=float)
    pool = np.array([[1, 0], [5, 0], [0, 3], [-4, -3]], dtype=float)
    # distances to (0,0): 1, 5, 3, 5 -> tie of 1 and 3 at 5 -> 1. To {(0,0),(5,0)}: 1, -, 3,
    # min(5, sqrt(90)) = 5 -> 3. To {.., (-4,-3)}: 1, -, min(3, sqrt(52)) = 3 -> 2, then 0.
    assert es.k_center_greedy(pool, labeled, 4).tolist() == [1, 3, 2, 0]


def test_coreset_takes_the_lowest_free_position_when_all_coincide_with_centres():
    pool = np.array([[1, 1], [2, 2], [1, 1]], dtype=float)
    labeled = np.array([[1, 1], [2, 2]], dtype=float)
    # every pool vector is at distance 0 from a centre: positions 0, 1, 2 in order
    assert es.k_center_greedy(pool, labeled, 3).tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------------
# TypiClust
# --------------------------------------------------------------------------------------


def test_typiclust_takes_the_most_typical_vector_of_the_largest_clusters():
    # A (6 vectors, K = 5): mean distance of (0,0) = (1+1+1+1+sqrt(18))/5 = 1.65; (1,0) and (0,1)
    # (1+2+2 sqrt(2)+sqrt(13))/5 = 1.89; the others more -> (0,0) = 3.
    # B (4 vectors, K = 3): (100,0) (1+2+5)/3, (101,0) (1+1+4)/3 = 2, (102,0) (2+1+3)/3 = 2, (105,0) 4:
    # a tie of 4 and 1 -> the lower position 1. (With K = size // 2, the official code's, 4 wins alone.)
    # C (3 vectors, K = 2): (0,100) (1+3)/2, (0,101) (1+2)/2 = 1.5, (0,103) (3+2)/2 -> 0.
    # Visited largest first: A, B, C.
    assert es.typiclust(BLOBS, None, 3, seed=0).tolist() == [3, 1, 0]


def test_typiclust_never_picks_from_a_cluster_holding_a_labeled_vector():
    # |L| + k = 3 clusters = the blobs; A (the largest) holds the labeled vector: B then C.
    assert es.typiclust(BLOBS, np.array([[0.5, 0.5]]), 2, seed=0).tolist() == [1, 0]
    # labeled in B: A then C
    assert es.typiclust(BLOBS, np.array([[103.0, 0.0]]), 2, seed=0).tolist() == [3, 0]


def test_typiclust_typicality_uses_at_most_20_neighbours():
    # One cluster (k = 1, nothing labeled): 21 vectors at x = 0..20 and 10 at x = 1000..1009.
    # With 20 neighbours a vector of the first group sees only its own group: x = 10 has
    # 2 (1 + ... + 10) / 20 = 5.5, x = 9 has (45 + 66) / 20 = 5.55 -> x = 10 (position 10).
    # With all 30 the far group pulls the winner towards it: x = 15 (mean (135 + 9895) / 30 = 334.3).
    line = np.concatenate([np.arange(21), 1000 + np.arange(10)]).astype(float)
    pool = np.stack([line, np.zeros_like(line)], axis=1)
    assert es.typiclust(pool, None, 1, seed=0).tolist() == [10]


def test_typiclust_continues_round_robin_when_clusters_run_out():
    # two distinct vectors, k = 3: two clusters {0, 1} (size 2) and {2}; round 1: 0 (tie at mean
    # distance 0 -> lower position), 2; round 2: 1.
    pool = np.array([[0, 0], [0, 0], [5, 5]], dtype=float)
    assert es.typiclust(pool, None, 3, seed=0).tolist() == [0, 2, 1]


def test_cluster_counts_are_labeled_plus_k(monkeypatch):
    asked = []
    real = es.cluster_labels
    monkeypatch.setattr(es, "cluster_labels", lambda v, n, seed: asked.append((len(v), n)) or real(v, n, seed))
    labeled = np.array([[0.5, 0.5], [103.0, 0.0]])
    es.typiclust(BLOBS, labeled, 2, seed=0)
    es.probcover(BLOBS, labeled, 3, seed=0)
    es.alps(BLOBS, 3, seed=0)
    es.mask_difference_diverse(BLOBS, np.arange(13.0), 4, seed=0)
    assert asked == [(15, 4), (15, 5), (13, 3), (13, 4)]


# --------------------------------------------------------------------------------------
# ProbCover
# --------------------------------------------------------------------------------------


def test_purity_delta_on_a_line_by_hand():
    # cluster 0 at x = 0..8 and 10, cluster 1 at x = 13..22. Distance to the other cluster:
    # 13, 12, ..., 5 (x = 0..8), 3 (x = 10); 3, 4, ..., 12 (x = 13..22).
    # Ascending: 3, 3, 4, 5, 5, ... B(x) (radius delta, strict) is pure iff delta <= that distance.
    # purity 0.95 of 20: 19 pure balls -> the 19th largest = 3; 0.90 -> 18th largest = 4; 0.85 -> 5.
    x = np.concatenate([np.arange(9), [10], np.arange(13, 23)]).astype(float)
    vectors = np.stack([x, np.zeros_like(x)], axis=1)
    labels = np.array([0] * 10 + [1] * 10)
    assert es.purity_delta(vectors, labels, 0.95) == 3.0
    assert es.purity_delta(vectors, labels, 0.90) == 4.0
    assert es.purity_delta(vectors, labels, 0.85) == 5.0
    assert es.purity_delta(vectors, np.zeros(20, dtype=int)) == math.inf


def test_probcover_delta_from_purity_and_strict_balls():
    pool = np.array([[10, 0], [0, 0], [30, 0], [1, 0], [11, 0], [31, 0]], dtype=float)
    # 3 clusters: {0,1}, {10,11}, {30,31}. Distance to another cluster: 10, 9, 9, 10, 19, 20 ->
    # all 6 balls pure needs delta <= 9 -> delta = 9. Strict balls of radius 9 hold exactly the own
    # pair ((1,0)-(10,0) is 9, not inside): every gain is 2, ties -> lowest position: 0 (covers
    # 10, 11), then 1 (covers 0, 1), then 2. (Balls with <= would give (1,0) and (10,0) gain 3.)
    assert es.probcover(pool, None, 3, seed=0).tolist() == [0, 1, 2]


PROBCOVER_POOL = np.array([
    [10.5, 0.5], [1, 0], [20, 0], [0, 0], [-1, 0], [11, 0], [0, 1], [10, 0], [0, -1],
], dtype=float)


def test_probcover_greedy_coverage_with_a_given_delta():
    # delta = 2: (0,0)'s ball holds all 5 of A; (1,0)'s holds 4 ((-1,0) is at 2, not inside); each of
    # B's three holds B; (20,0) holds itself. Greedy: 3 (5 new), 0 (3 new, lowest of B), 2 (1 new).
    assert es.probcover(PROBCOVER_POOL, None, 3, delta=2.0).tolist() == [3, 0, 2]


def test_probcover_counts_labeled_balls_as_covered_and_falls_back_to_k_center():
    # the labeled (10.2, 0) covers B. Greedy: 3 (5 new), 2 (1 new); then nothing is left to cover, so
    # k-center greedy from {(10.2,0), (0,0), (20,0)}: A's four others are all at 1 -> 1, then (-1,0),
    # (0,1), (0,-1) are still at 1 -> 4.
    labeled = np.array([[10.2, 0.0]])
    assert es.probcover(PROBCOVER_POOL, labeled, 4, delta=2.0).tolist() == [3, 2, 1, 4]


def test_probcover_with_one_cluster_is_the_k_center_fallback():
    # k = 1 and nothing labeled: one cluster, every ball pure at any delta (delta = inf): the pick is
    # the vector nearest the mean (5/3, 0) -> (1, 0) = 2.
    pool = np.array([[0, 0], [4, 0], [1, 0]], dtype=float)
    assert es.probcover(pool, None, 1, seed=0).tolist() == [2]


# --------------------------------------------------------------------------------------
# ALPS, diversity-aware mask difference
# --------------------------------------------------------------------------------------


def test_alps_takes_the_vector_nearest_each_centre_largest_cluster_first():
    # A's mean (0.5, 0.5): (1,0), (0,0), (0,1) all at sqrt(0.5) -> the lowest position 2.
    # B's mean (102, 0) -> 1. C's mean (0, 101.33) -> (0, 101) = 0.
    assert es.alps(BLOBS, 3, seed=0).tolist() == [2, 1, 0]


def test_mask_difference_diverse_takes_at_most_one_near_duplicate():
    pool = np.array([[0, 0], [0.1, 0], [0, 0.1], [0.1, 0.1], [100, 0], [101, 0], [0, 100], [0, 101]])
    scores = np.array([0.90, 0.95, 0.92, 0.91, 0.50, 0.30, 0.20, 0.60])
    near_duplicates = {0, 1, 2, 3}
    assert set(np.argsort(-scores)[:3].tolist()) <= near_duplicates  # plain top-3: three near-duplicates
    # 3 clusters = the three groups; the best of each: 1 (0.95), 4 (0.50), 7 (0.60), by score
    chosen = es.mask_difference_diverse(pool, scores, 3, seed=0).tolist()
    assert chosen == [1, 7, 4]
    assert len(near_duplicates & set(chosen)) == 1


def test_mask_difference_diverse_continues_with_the_next_best_score():
    # two distinct vectors, k = 3: clusters {0, 2} and {1}; round 1 by score: 2 (0.9), 1 (0.5); round 2: 0
    pool = np.array([[0, 0], [5, 5], [0, 0]], dtype=float)
    assert es.mask_difference_diverse(pool, np.array([0.1, 0.5, 0.9]), 3, seed=0).tolist() == [2, 1, 0]


# --------------------------------------------------------------------------------------
# every rule: bad input, k = 0, determinism
# --------------------------------------------------------------------------------------

RULES = {
    "coreset": lambda pool, labeled, k: es.k_center_greedy(pool, labeled, k),
    "typiclust": lambda pool, labeled, k: es.typiclust(pool, labeled, k, seed=3),
    "probcover": lambda pool, labeled, k: es.probcover(pool, labeled, k, seed=3),
    "alps": lambda pool, labeled, k: es.alps(pool, k, seed=3),
    "mask_difference_diverse": lambda pool, labeled, k: es.mask_difference_diverse(
        pool, np.linspace(0, 1, len(np.asarray(pool))), k, seed=3),
}
USES_LABELED = ("coreset", "typiclust", "probcover")


@pytest.mark.parametrize("name", sorted(RULES))
def test_bad_input_is_a_typed_error(name):
    rule = RULES[name]
    pool = np.arange(12.0).reshape(6, 2)
    with pytest.raises(es.EmbeddingSelectionError, match="at most the pool size"):
        rule(pool, None, 7)
    with pytest.raises(es.EmbeddingSelectionError, match="at most the pool size"):
        rule(np.zeros((0, 2)), None, 1)
    with pytest.raises(es.EmbeddingSelectionError, match=">= 0"):
        rule(pool, None, -1)
    with pytest.raises(es.EmbeddingSelectionError, match="integer"):
        rule(pool, None, 2.0)
    with pytest.raises(es.EmbeddingSelectionError, match="N x D"):
        rule(np.arange(6.0), None, 1)
    bad = pool.copy()
    bad[2, 1] = np.nan
    with pytest.raises(es.EmbeddingSelectionError, match="NaN"):
        rule(bad, None, 1)
    if name in USES_LABELED:
        with pytest.raises(es.EmbeddingSelectionError, match="dimension 3, the pool's are 2"):
            rule(pool, np.zeros((2, 3)), 1)


@pytest.mark.parametrize("name", sorted(RULES))
def test_k_zero_and_an_empty_pool_select_nothing(name):
    assert RULES[name](np.arange(12.0).reshape(6, 2), None, 0).tolist() == []
    assert RULES[name](np.zeros((0, 4)), None, 0).tolist() == []


@pytest.mark.parametrize("name", sorted(RULES))
def test_seeded_and_deterministic(name):
    rng = np.random.default_rng(7)
    pool = rng.normal(size=(120, 8))
    labeled = rng.normal(size=(10, 8)) if name in USES_LABELED else None
    first = RULES[name](pool, labeled, 9)
    assert len(set(first.tolist())) == 9 and first.min() >= 0 and first.max() < 120
    assert RULES[name](pool.copy(), labeled, 9).tolist() == first.tolist()
    assert RULES[name](pool, np.zeros(0) if labeled is None else labeled, 9).tolist() == first.tolist()


def test_other_bad_parameters():
    pool = np.arange(12.0).reshape(6, 2)
    with pytest.raises(es.EmbeddingSelectionError, match="delta must be a positive number"):
        es.probcover(pool, None, 2, delta=0.0)
    with pytest.raises(es.EmbeddingSelectionError, match=r"shape \(6,\)"):
        es.mask_difference_diverse(pool, np.ones(5), 2)
    with pytest.raises(es.EmbeddingSelectionError, match="NaN or infinite"):
        es.mask_difference_diverse(pool, np.array([1, 2, np.inf, 4, 5, 6.0]), 2)


# --------------------------------------------------------------------------------------
# row blocks (no n x n matrix): the same answers as a direct computation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 7, 40])
def test_row_blocks_give_the_direct_distances(monkeypatch, rows):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(40, 5))
    labels = rng.integers(0, 3, size=40)
    direct = cdist(vectors, vectors)
    # r(x) = min over vectors of another cluster of |x - y|
    expected_r = np.where(labels[:, None] == labels[None, :], np.inf, direct).min(axis=1)
    delta = float(np.median(direct))
    monkeypatch.setattr(es, "CHUNK_BYTES", 4 * 40 * rows)  # blocks of `rows` rows: rows s.. against vectors s..39
    blocks = es.pair_blocks(vectors, lambda block, start: (start, block.copy()))
    assert [start for start, _ in blocks] == list(range(0, 40, rows))
    for start, block in blocks:
        np.testing.assert_allclose(block, direct[start:start + rows, start:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(es.nearest_in_other_cluster(vectors, labels), expected_r, rtol=1e-5)
    graph = es.ball_graph(vectors, delta).toarray()
    clear = np.abs(direct - delta) > 1e-4  # float32 blocks: pairs this close to delta may fall either side
    assert clear.mean() > 0.9 and graph.diagonal().all()
    assert np.array_equal(graph[clear], (direct < delta)[clear])
