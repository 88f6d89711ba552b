"""Exact oracles for solution.stats: bootstrap identities, fold partitions, cross-fitting and its held-out hits."""

import numpy as np
import pytest

from solution.retrieval.metrics import per_query_recall, recall_from_hits
from solution.stats import crossfit, id_folds, kfold_crossfit, paired_bootstrap, t_quantile_975


def test_bootstrap_of_a_system_against_itself_is_exactly_zero_and_a_constant_difference_is_exact():
    hits = np.random.default_rng(0).random((57, 3)) < 0.5
    res = paired_bootstrap(hits, hits, n_resamples=300)
    assert (res.diff, res.low, res.high, res.significant) == (0.0, 0.0, 0.0, False)
    res = paired_bootstrap(per_query_recall(hits), per_query_recall(hits).copy())
    assert (res.diff, res.low, res.high) == (0.0, 0.0, 0.0)
    a, b = np.ones(20), np.zeros(20)
    res = paired_bootstrap(a, b, n_resamples=50)
    assert (res.diff, res.low, res.high, res.significant) == (100.0, 100.0, 100.0, True)
    res = paired_bootstrap(b, a, n_resamples=50)
    assert (res.diff, res.low, res.high, res.significant) == (-100.0, -100.0, -100.0, True)


def test_bootstrap_is_paired_seeded_and_checks_its_input():
    rng = np.random.default_rng(1)
    a = rng.random(40) < 0.5
    b = a.copy()
    b[:4] = ~b[:4]  # a and b differ on 4 queries only
    r1 = paired_bootstrap(a.astype(float), b.astype(float), n_resamples=200, seed=3)
    r2 = paired_bootstrap(a.astype(float), b.astype(float), n_resamples=200, seed=3, batch=7)
    assert r1 == r2  # same seed, any batching: the same resamples
    d = a.astype(float) - b.astype(float)
    idx = np.random.default_rng(3).integers(0, 40, size=(200, 40))
    want = np.quantile(100 * d[idx].mean(axis=1), [0.025, 0.975])
    assert (r1.low, r1.high) == tuple(want.tolist()) and r1.diff == 100 * d.mean()  # same indices for a and b
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="ci"):
        paired_bootstrap(np.ones(3), np.ones(3), ci=1.0)


@pytest.mark.parametrize("n, k", [(10, 2), (11, 3), (5, 5), (103, 7)])
def test_kfold_folds_partition_the_queries(n, k):
    folds = kfold_crossfit(n, k, seed=4)
    assert len(folds) == k
    assert np.array_equal(np.sort(np.concatenate(folds)), np.arange(n))  # disjoint and covering
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1 and all(np.all(np.diff(f) > 0) for f in folds)
    assert all(np.array_equal(x, y) for x, y in zip(folds, kfold_crossfit(n, k, seed=4)))
    for bad in (1, n + 1):
        with pytest.raises(ValueError, match="k"):
            kfold_crossfit(n, bad)


def test_crossfit_selects_on_train_scores_on_held_out_and_refits():
    rng = np.random.default_rng(2)
    values = (rng.random((30, 3)) < [0.2, 0.5, 0.8]).astype(float)  # per-query values of 3 systems
    seen = []

    def select(train):
        seen.append(len(train))
        return int(np.argmax(train.mean(axis=0)))

    def score(choice, test):
        return 100 * float(test[:, choice].mean())

    res = crossfit(select, score, values, k=5, seed=1)
    folds = kfold_crossfit(30, 5, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(res.folds, folds))
    assert seen == [24] * 5 + [30]
    want = [score(select(np.delete(values, f, axis=0)), values[f]) for f in folds]
    assert res.fold_scores == want and res.mean == np.mean(want)
    half = t_quantile_975(4) * np.std(want, ddof=1) / np.sqrt(5)
    assert (res.low, res.high) == (res.mean - half, res.mean + half)
    assert res.choice == int(np.argmax(values.mean(axis=0)))


def test_crossfit_by_query_ids_holds_each_query_out_under_the_choice_made_without_its_fold():
    """Folds by id (any order of the ids, the same folds); with per-query hits from ``score_fn`` each query's
    held-out hits are the ones of the choice made without its fold, and a fold's score their official recall."""
    ids = np.array([31, 7, 12, 99, 4, 58, 20])
    folds = id_folds(ids, 3, seed=2)
    assert [sorted(ids[f]) for f in folds] == [sorted(ids[::-1][f]) for f in id_folds(ids[::-1], 3, seed=2)]

    def score(choice, test):  # hits that depend on the choice: the sum of the training rows
        return np.stack([(test + choice) % m == 0 for m in (3, 2, 1)], axis=1)

    res = crossfit(lambda train: int(train.sum()), score, np.arange(7), k=3, seed=2, ids=ids)
    want = [score(int(np.delete(np.arange(7), f).sum()), f) for f in folds]
    assert all(np.array_equal(res.held_out[f], w) for f, w in zip(folds, want)) and res.choice == 21
    assert res.fold_scores == [recall_from_hits(w)["mean_recall"] for w in want]


def test_t_quantiles():
    assert t_quantile_975(1) == 12.7062 and t_quantile_975(4) == 2.7764
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in range(1, 200):
        assert abs(t_quantile_975(df) - scipy_stats.t.ppf(0.975, df)) < 1e-4
