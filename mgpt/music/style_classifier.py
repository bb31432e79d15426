"""An independent style classifier: logistic regression on musical features.

It never sees the GPT. Trained on the real training split, it is the judge of style:
its accuracy on the real test split is the ceiling, and its accuracy on generated
pieces (against the style each was conditioned on) says whether conditioning works.

Features of a piece (`style_vector`): the scalar and histogram features of
`mgpt.music.features`, the octave histogram, and n-gram histograms of pitch classes
(bigrams) and melodic intervals (unigrams, bigrams) between successive notes in
(onset, pitch) order. Histograms are normalised, so piece length does not matter.
Training pieces are also added transposed (random shift within +-transpose), as the
GPT's own training data is, so key alone does not decide the verdict.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mgpt.music import features as F
from data_prep.notes import Notes

_MAX_INTERVAL = 12  # interval unigrams over -12..12 (clipped)
_MAX_BIGRAM_INTERVAL = 7  # interval bigrams over -7..7 (clipped)


def _hist(values: np.ndarray, size: int) -> np.ndarray:
    counts = np.bincount(values, minlength=size).astype(np.float64)
    return counts / counts.sum() if counts.sum() else counts


def style_vector(notes: Notes) -> np.ndarray:
    """One piece -> float64 feature vector (fixed length)."""
    feats = F.piece_features(notes)
    pitch, _, start_s, _ = (np.asarray(a) for a in notes)
    pitch = pitch.astype(np.int64)
    order = np.lexsort((pitch, start_s))
    p = pitch[order]
    iv = np.diff(p)
    uni = np.clip(iv, -_MAX_INTERVAL, _MAX_INTERVAL) + _MAX_INTERVAL
    b = np.clip(iv, -_MAX_BIGRAM_INTERVAL, _MAX_BIGRAM_INTERVAL) + _MAX_BIGRAM_INTERVAL
    nb = 2 * _MAX_BIGRAM_INTERVAL + 1
    pc = p % 12
    parts = [
        np.asarray([feats[k] for k in F.SCALAR_FEATURES], np.float64),
        np.asarray([p.mean() if len(p) else 0.0, p.std() if len(p) else 0.0]),
        feats["pitch_class_histogram"],
        feats["ioi_histogram"],
        feats["duration_histogram"],
        _hist(np.clip(p // 12, 0, 10), 11),
        _hist(uni, 2 * _MAX_INTERVAL + 1),
        _hist(b[:-1] * nb + b[1:], nb * nb),
        _hist(pc[:-1] * 12 + pc[1:], 144),
    ]
    return np.concatenate(parts)


def transpose_notes(notes: Notes, semitones: int) -> Notes:
    pitch, velocity, start_s, end_s = notes
    return Notes(np.clip(np.asarray(pitch) + semitones, 0, 127), velocity, start_s, end_s)


class StyleClassifier:
    """`StyleClassifier().fit(pieces, labels)`; `predict(pieces) -> labels`."""

    def __init__(self, *, C: float = 0.5, transpose: int = 5, seed: int = 0):
        self.C = C
        self.transpose = transpose
        self.seed = seed
        self.pipeline = None
        self.labels: list[str] = []

    def fit(self, pieces: Sequence[Notes], labels: Sequence[str]) -> "StyleClassifier":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if len(set(labels)) < 2:
            raise ValueError(f"style classifier: need at least two styles, got {sorted(set(labels))}")
        rng = np.random.default_rng(self.seed)
        x = [style_vector(p) for p in pieces]
        y = list(labels)
        if self.transpose:
            for p, label in zip(pieces, labels):
                shift = int(rng.integers(-self.transpose, self.transpose + 1))
                x.append(style_vector(transpose_notes(p, shift)))
                y.append(label)
        self.pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=3000))
        self.pipeline.fit(np.stack(x), np.asarray(y))
        self.labels = [str(c) for c in self.pipeline.classes_]
        return self

    def predict(self, pieces: Sequence[Notes]) -> list[str]:
        if not pieces:
            return []
        return [str(v) for v in self.pipeline.predict(np.stack([style_vector(p) for p in pieces]))]


def score(true: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, per-style recall and the confusion matrix (rows: true, columns: predicted)."""
    index = {label: i for i, label in enumerate(labels)}
    conf = np.zeros((len(labels), len(labels)), np.int64)
    for t, p in zip(true, predicted):
        if t in index and p in index:
            conf[index[t], index[p]] += 1
    n = int(conf.sum())
    per_style = {
        label: (float(conf[i, i] / conf[i].sum()) if conf[i].sum() else None) for label, i in index.items()
    }
    return {
        "accuracy": float(np.trace(conf) / n) if n else float("nan"),
        "count": n,
        "per_style": per_style,
        "labels": list(labels),
        "confusion": conf.tolist(),
    }


def plot_confusion(scores: dict[str, dict], path: str) -> None:
    """One PNG with a confusion matrix per entry of `scores` (e.g. real test, generated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 4), squeeze=False)
    for ax, (title, s) in zip(axes[0], scores.items()):
        conf = np.asarray(s["confusion"], np.float64)
        rows = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        labels = s["labels"]
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        for i in range(len(labels)):
            for j in range(len(labels)):
                if conf[i, j]:
                    ax.text(j, i, int(conf[i, j]), ha="center", va="center",
                            color="white" if rows[i, j] > 0.5 else "black", fontsize=8)
        ax.set_xlabel("classified as")
        ax.set_ylabel("true / conditioned style")
        ax.set_title(f"{title}: {100 * s['accuracy']:.0f}% of {s['count']}")
    fig.subplots_adjust(left=0.2, right=0.98, top=0.9, bottom=0.3, wspace=0.6)
    fig.savefig(path, dpi=90)
    plt.close(fig)
