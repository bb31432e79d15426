"""Evaluation: n-gram baseline, musical features, originality search, style classifier, LSTM, report."""

import math

import numpy as np
import pytest

from mgpt import features as F
from mgpt import ngram, originality
from mgpt import style_classifier as sc


def notes_of(rows):
    """[(pitch, velocity, start_s, end_s), ...] -> the parallel arrays decode_notes gives."""
    a = np.asarray(rows, np.float64).reshape(-1, 4)
    return a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2], a[:, 3]


# ----------------------------------------------------------------------------- n-gram


def test_kneser_ney_matches_hand_computed_bigram_probabilities():
    # Vocabulary {0: PAD, 1, 2, 3}; one training piece [1, 2, 1, 2, 3]; D = 0.5 at both orders.
    # Bigrams: (1,2) x2, (2,1), (2,3). Unigram continuation counts: 1 each for 1, 2, 3 (3 types).
    # P1(w) = (1 - .5)/3 + .5 * 3/3 * 1/4 = 7/24 for w in {1,2,3}.
    # P(2|1) = (2 - .5)/2 + .5 * 1/2 * 7/24 = 79/96 ; P(3|2) = (1 - .5)/2 + .5 * 2/2 * 7/24 = 19/48.
    lm = ngram.KneserNey(2, 4, discounts=[0.5, 0.5]).fit([np.array([1, 2, 1, 2, 3])])
    lp = lm.log_probs(np.array([1, 2, 3]))
    np.testing.assert_allclose(lp, [math.log(79 / 96), math.log(19 / 48)], rtol=1e-12)
    nats, count = lm.nll([np.array([1, 2, 3])])
    assert count == 2 and nats == pytest.approx(-math.log(79 / 96) - math.log(19 / 48))


def test_kneser_ney_distributions_sum_to_one_in_seen_and_unseen_contexts():
    rng = np.random.default_rng(0)
    v = 12
    train = [rng.integers(1, v, size=rng.integers(5, 40)) for _ in range(30)]
    lm = ngram.KneserNey(5, v).fit(train)
    for context in (train[0][:6], np.array([3, 3, 3, 3, 3, 3]), np.array([11, 1, 2])):
        total = sum(math.exp(lm.log_probs(np.append(context, w))[-1]) for w in range(v))
        assert total == pytest.approx(1.0, abs=1e-9)


def test_kneser_ney_prefers_the_training_pattern():
    train = [np.array([5] + [1, 2, 3, 4] * 20)] * 3
    lm = ngram.KneserNey(5, 8).fit(train)
    seen, _ = lm.nll([np.array([5, 1, 2, 3, 4, 1, 2, 3, 4])])
    shuffled, _ = lm.nll([np.array([5, 4, 3, 2, 1, 4, 3, 2, 1])])
    assert seen < 0.1 * shuffled


# ----------------------------------------------------------------------------- features

C_MAJOR_SCALE = notes_of([(p, 80, 0.5 * i, 0.5 * (i + 1)) for i, p in enumerate([60, 62, 64, 65, 67, 69, 71, 72])])


def test_features_of_a_c_major_scale():
    f = F.piece_features(C_MAJOR_SCALE)
    assert f["pitch_range"] == 12
    assert f["used_pitches"] == 8
    assert f["used_pitch_classes"] == 7
    np.testing.assert_allclose(f["pitch_class_histogram"], np.array([2, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1]) / 8)
    assert f["pitch_class_entropy"] == pytest.approx(2.75)  # -(1/4 log2 1/4 + 6 * 1/8 log2 1/8)
    assert f["polyphony"] == pytest.approx(1.0)
    assert f["note_density"] == pytest.approx(2.0)  # 8 notes in 4 s
    assert f["ioi_mean_s"] == pytest.approx(0.5)
    assert f["duration_mean_s"] == pytest.approx(0.5)
    assert f["velocity_mean"] == 80 and f["velocity_std"] == 0
    assert f["scale_consistency"] == 1.0
    ioi_bin = np.searchsorted(F.TIME_BIN_EDGES_S, 0.5, side="right") - 1
    assert f["ioi_histogram"][ioi_bin] == 1.0 and f["duration_histogram"][ioi_bin] == 1.0


def test_features_of_a_chord_then_a_note():
    # C-E-G for 1 s (velocities 40, 60, 80), then D alone for 1 s (velocity 100).
    piece = notes_of([(60, 40, 0, 1), (64, 60, 0, 1), (67, 80, 0, 1), (62, 100, 1, 2)])
    f = F.piece_features(piece)
    assert f["polyphony"] == pytest.approx(2.0)  # 3 sounding for 1 s, 1 for 1 s
    assert f["ioi_mean_s"] == pytest.approx(1.0)  # the chord is one onset
    assert f["note_density"] == pytest.approx(2.0)
    assert f["velocity_mean"] == pytest.approx(70.0)
    assert f["velocity_std"] == pytest.approx(np.std([40, 60, 80, 100]))
    assert f["pitch_range"] == 7


def test_chromatic_cluster_has_maximal_entropy_and_low_scale_consistency():
    piece = notes_of([(60 + i, 64, 0.25 * i, 0.25 * i + 0.2) for i in range(12)])
    f = F.piece_features(piece)
    assert f["pitch_class_entropy"] == pytest.approx(math.log2(12))
    assert f["scale_consistency"] == pytest.approx(7 / 12)
    assert f["used_pitch_classes"] == 12


def test_overlap_is_high_for_the_same_distribution_and_low_for_a_different_one():
    rng = np.random.default_rng(0)
    real = {k: rng.normal(5, 1, 60) if k in F.SCALAR_FEATURES else rng.dirichlet(np.ones(12), 60)
            for k in F.FEATURES}
    same = {k: rng.normal(5, 1, 60) if k in F.SCALAR_FEATURES else rng.dirichlet(np.ones(12), 60)
            for k in F.FEATURES}
    far = {k: rng.normal(15, 1, 60) if k in F.SCALAR_FEATURES else rng.dirichlet(np.ones(12) * 0.05, 60)
           for k in F.FEATURES}
    close, apart = F.compare_sets(same, real), F.compare_sets(far, real)
    for k in F.FEATURES:
        assert close[k]["overlap"] > 0.8, k
        assert apart[k]["overlap"] < close[k]["overlap"] - 0.3, k
        assert apart[k]["kl"] > close[k]["kl"], k


# ----------------------------------------------------------------------------- originality


def random_piece(rng, n, t0=0.0):
    pitch = rng.integers(48, 84, n)
    onset = t0 + np.cumsum(rng.choice([0.0, 0.12, 0.25, 0.37, 0.5, 0.75], n))
    return pitch, np.full(n, 64), onset, onset + 0.3


def test_originality_finds_a_planted_transposed_copy_and_none_elsewhere():
    rng = np.random.default_rng(1)
    train = [random_piece(rng, 300) for _ in range(5)]
    # 24 notes of training piece 3 (notes 100..123), transposed up 3 and moved in time, inside new material.
    p, v, s, e = train[3]
    span = slice(100, 124)
    cp, cs = p[span] + 3, s[span] - s[100] + 40.0
    a, b = random_piece(rng, 60), random_piece(rng, 60, t0=60.0)
    piece = (np.concatenate([a[0], cp, b[0]]), np.full(144, 64), np.concatenate([a[2], cs, b[2]]),
             np.concatenate([a[2], cs, b[2]]) + 0.3)
    index = originality.CopyIndex(train)
    copy, _ = index.longest_copy(piece)
    assert copy.notes >= 24 and copy.notes <= 26
    assert copy.train_piece == 3
    assert copy.seconds == pytest.approx(s[123] - s[100], abs=0.011)

    unrelated, _ = index.longest_copy(random_piece(rng, 200))
    assert unrelated.notes < 7

    report = originality.originality_report(index, [piece, random_piece(rng, 200)], threshold_s=5.0)
    assert report["flagged"] == [0]
    # A training piece is all copied: every 8- and 16-note window is found.
    self_report = originality.originality_report(index, [train[2]])
    assert self_report["ngram_share"] == {"8": 1.0, "16": 1.0}


def test_suffix_array_sorts_suffixes():
    codes = np.array([3, 1, 2, 3, 1, 2, 0, 3, 1], np.int64)
    sa = originality.suffix_array(codes)
    assert [tuple(codes[i:]) for i in sa] == sorted(tuple(codes[i:]) for i in range(len(codes)))


# ----------------------------------------------------------------------------- style classifier


def synthetic_style_piece(rng, style):
    n = int(rng.integers(30, 60))
    if style == "hymn":  # low, diatonic, slow, stepwise
        scale = np.array([0, 2, 4, 5, 7, 9, 11])
        pitch = 48 + scale[np.clip(np.cumsum(rng.integers(-1, 2, n)) % 7, 0, 6)] + 12 * rng.integers(0, 2, n)
        ioi = rng.choice([0.5, 1.0], n)
    else:  # "jig": high, chromatic leaps, fast
        pitch = rng.integers(66, 90, n)
        ioi = rng.choice([0.125, 0.25], n)
    onset = np.cumsum(ioi)
    return pitch, np.full(n, 70), onset, onset + 0.9 * ioi


def test_style_classifier_beats_chance_on_two_synthetic_styles():
    rng = np.random.default_rng(0)
    labels = ["hymn", "jig"] * 15
    clf = sc.StyleClassifier().fit([synthetic_style_piece(rng, s) for s in labels], labels)
    test_labels = ["hymn", "jig"] * 10
    predicted = clf.predict([synthetic_style_piece(rng, s) for s in test_labels])
    result = sc.score(test_labels, predicted, clf.labels)
    assert result["accuracy"] >= 0.9
    assert np.asarray(result["confusion"]).sum() == 20
