"""What generated pieces are judged against, built once from the real pieces.

The feature tables of the real pieces and their train-vs-test ceiling, the style
classifier and the copy index: `references` builds them, drawing from one rng in
that order, so that every section and every guidance value sees the same ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from data_prep.notes import Notes, crop
from data_prep.vocab import UNKNOWN_STYLE, Vocabulary
from mgpt.music import features as F
from mgpt.music import originality as orig
from mgpt.eval.inputs import Options, Piece, window_crop
from mgpt.music import style_classifier as sc


@dataclasses.dataclass
class References:
    """What generated pieces are judged against, built once from the real pieces (`references`)."""

    train: Sequence[Piece]
    test: Sequence[Piece]
    train_notes: list
    test_notes: list
    tables: dict  # feature tables of the real 'test' and (subsampled) 'train' pieces
    train_vs_test: dict  # the features' ceiling
    classifier: object  # a StyleClassifier fitted on the labelled train pieces, or None
    labelled: int  # labelled train pieces it saw
    styles: list  # the labelled styles
    index: orig.CopyIndex
    used: list  # train pieces in the index
    total_notes: int
    notes: list  # remarks for the report


def references(vocab: Vocabulary, train: Sequence[Piece], test: Sequence[Piece], o: Options,
               rng: np.random.Generator, log=print) -> References:
    """The feature ceiling, the style classifier and the copy index (rng draws in that order)."""
    notes = []
    log("features: per-piece statistics")
    train_notes = [vocab.decode_notes(p.tokens) for p in train]
    test_notes = [vocab.decode_notes(p.tokens) for p in test]
    feat_train_idx = np.arange(len(train))
    if len(train) > o.max_feature_pieces:
        feat_train_idx = np.sort(rng.choice(len(train), o.max_feature_pieces, replace=False))
        notes.append(f"features: train ceiling uses {o.max_feature_pieces} of {len(train)} train pieces")
    tables = {
        "test": F.feature_table([crop(n, o.crop_seconds) for n in test_notes]),
        "train": F.feature_table([crop(train_notes[i], o.crop_seconds) for i in feat_train_idx]),
    }
    train_vs_test = F.compare_sets(tables["train"], tables["test"], seed=o.seed)

    labelled = [(n, p.style_name) for n, p in zip(train_notes, train) if p.style_name != UNKNOWN_STYLE]
    styles_known = sorted({s for _, s in labelled})
    clf = None
    if len(styles_known) >= 2:
        log(f"style: classifier on {len(labelled)} labelled train pieces, {len(styles_known)} styles")
        clf = fit_classifier(labelled, o, rng)

    order = rng.permutation(len(train))
    used, total_notes = [], 0
    for i in order:
        if total_notes >= o.max_train_notes:
            break
        used.append(int(i))
        total_notes += len(train_notes[i])
    used.sort()
    if len(used) < len(train):
        notes.append(
            f"originality: searched {len(used)} of {len(train)} train pieces ({total_notes:,} notes; "
            f"--max_train_notes={o.max_train_notes:,}), so copies from the others are not found"
        )
    for name in F.SCALAR_FEATURES:  # said after the remarks above, as the report has always listed them
        if np.std(tables["test"][name]) == 0:
            notes.append(
                f"features: {name} is the same ({tables['test'][name][0]:g}) in every real test piece (a "
                "property of the corpus, e.g. scores without dynamics), so its train-vs-test ceiling is trivially 1"
            )
    log(f"originality: suffix array over {total_notes:,} notes of {len(used)} train pieces")
    index = orig.CopyIndex([train_notes[i] for i in used], vocab.steps_per_second)
    return References(train, test, train_notes, test_notes, tables, train_vs_test, clf, len(labelled), styles_known,
                      index, used, total_notes, notes)


def mean_of(cmp: dict, key: str) -> float:
    vals = [v[key] for v in cmp.values() if v.get(key) is not None and np.isfinite(v[key])]
    return float(np.mean(vals)) if vals else float("nan")


def fit_classifier(labelled: Sequence[tuple[Notes, str]], o: Options, rng: np.random.Generator) -> sc.StyleClassifier:
    """The style classifier on (notes, style) pairs: each piece's first o.crop_seconds, and again
    as a random window of that length (rng), so that it does not learn only how pieces begin."""
    x = [crop(n, o.crop_seconds) for n, _ in labelled] + [window_crop(n, o.crop_seconds, rng) for n, _ in labelled]
    return sc.StyleClassifier(seed=o.seed).fit(x, [s for _, s in labelled] * 2)
