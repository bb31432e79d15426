"""Musical statistics of a piece, and set-vs-set comparison as in Yang & Lerch (2018).

A piece is its `data_prep.notes.Notes` (`Vocabulary.decode_notes` gives them), parallel arrays:
pitch (MIDI numbers), velocity (1..127), start_s and end_s (seconds).

`piece_features(notes)` returns one value per feature: a float for the scalar
features, a small normalised histogram (1-D array) for the distribution features.
`compare_sets(a, b)` says how close set `a` (e.g. generated) is to reference set `b`
(the real test pieces) for each feature, with Yang & Lerch's relative measure: the
distribution of distances between pieces of the two sets (inter-set) against the
distribution of distances among the reference pieces (intra-set), both smoothed by
a Gaussian KDE; `overlap` is the area under the smaller of the two densities (1 =
indistinguishable) and `kl` is KL(intra || inter) in nats.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_prep.notes import Notes

# Inter-onset intervals and note durations, seconds: log-like bins from a 32nd note
# at fast tempo to long holds.
TIME_BIN_EDGES_S = np.array([0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, np.inf])

_MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])
_MINOR = np.array([0, 2, 3, 5, 7, 8, 10])
# 24 scales (12 major, 12 natural minor) as pitch-class membership masks.
SCALES_24x12 = np.zeros((24, 12), bool)
for _root in range(12):
    SCALES_24x12[_root, (_MAJOR + _root) % 12] = True
    SCALES_24x12[12 + _root, (_MINOR + _root) % 12] = True

SCALAR_FEATURES = (
    "pitch_range",  # semitones between the lowest and highest note
    "used_pitches",  # distinct MIDI pitches
    "used_pitch_classes",  # distinct pitch classes (0..12)
    "pitch_class_entropy",  # bits, of the pitch-class histogram (0..log2 12)
    "polyphony",  # mean number of sounding notes while any note sounds
    "note_density",  # notes per second of the piece's span
    "ioi_mean_s",  # mean interval between distinct onsets
    "duration_mean_s",  # mean note length
    "velocity_mean",
    "velocity_std",
    "scale_consistency",  # best fraction of notes inside one major or minor scale
)
HISTOGRAM_FEATURES = (
    "pitch_class_histogram",  # 12 bins, C..B, fraction of notes
    "ioi_histogram",  # TIME_BIN_EDGES_S bins
    "duration_histogram",  # TIME_BIN_EDGES_S bins
)
FEATURES = SCALAR_FEATURES + HISTOGRAM_FEATURES


def _normalised(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts, dtype=np.float64)


def onset_intervals_s(start_s: np.ndarray) -> np.ndarray:
    """Gaps between successive distinct onsets (a chord is one onset), seconds."""
    onsets = np.unique(np.round(np.asarray(start_s, np.float64), 6))
    return np.diff(onsets)


def polyphony(start_s: np.ndarray, end_s: np.ndarray) -> float:
    """Time-weighted mean count of sounding notes over the time when at least one sounds."""
    if len(start_s) == 0:
        return 0.0
    times = np.concatenate([start_s, end_s])
    delta = np.concatenate([np.ones(len(start_s)), -np.ones(len(end_s))])
    order = np.lexsort((delta, times))  # at equal times, offsets (-1) before onsets
    times, delta = times[order], delta[order]
    sounding = np.cumsum(delta)[:-1]
    span = np.diff(times)
    busy = sounding > 0
    total = span[busy].sum()
    return float((sounding[busy] * span[busy]).sum() / total) if total > 0 else 0.0


def onset_polyphony(start_s: np.ndarray, end_s: np.ndarray) -> float:
    """Mean, over distinct onset times t, of the notes sounding at t (start <= t < end).

    This is what droning shows in: a held note that never ends is counted at every later
    onset. Real four-part chorales give about 4.
    """
    if len(start_s) == 0:
        return 0.0
    onsets = np.unique(np.asarray(start_s, np.float64))
    started = np.searchsorted(np.sort(start_s), onsets, side="right")  # notes with start <= t
    ended = np.searchsorted(np.sort(end_s), onsets, side="right")  # notes with end <= t
    return float(np.mean(started - ended))


COHERENCE = ("onset_polyphony", "mean_note_s", "share_notes_ge_4s")
LONG_NOTE_S = 4.0


def note_coherence(notes: Notes) -> dict[str, float]:
    """Per piece: onset_polyphony, mean note length (s) and the share of notes >= 4 s."""
    _, _, start_s, end_s = notes
    length_s = np.asarray(end_s, np.float64) - np.asarray(start_s, np.float64)
    return {
        "onset_polyphony": onset_polyphony(start_s, end_s),
        "mean_note_s": float(length_s.mean()) if len(length_s) else 0.0,
        "share_notes_ge_4s": float((length_s >= LONG_NOTE_S).mean()) if len(length_s) else 0.0,
    }


def scale_consistency(pitch: np.ndarray) -> float:
    """Largest fraction of notes whose pitch class lies in one of the 24 major/minor scales."""
    if len(pitch) == 0:
        return 0.0
    pcs = np.bincount(np.asarray(pitch) % 12, minlength=12)
    return float((SCALES_24x12 @ pcs).max() / len(pitch))


def piece_features(notes: Notes) -> dict[str, float | np.ndarray]:
    """Every feature of FEATURES for one piece. An empty piece gives zeros."""
    pitch, velocity, start_s, end_s = (np.asarray(a) for a in notes)
    pitch = pitch.astype(np.int64)
    start_s, end_s = start_s.astype(np.float64), end_s.astype(np.float64)
    n = len(pitch)
    nbins = len(TIME_BIN_EDGES_S) - 1
    if n == 0:
        out: dict = {k: 0.0 for k in SCALAR_FEATURES}
        out.update(
            pitch_class_histogram=np.zeros(12), ioi_histogram=np.zeros(nbins), duration_histogram=np.zeros(nbins)
        )
        return out
    pc_hist = _normalised(np.bincount(pitch % 12, minlength=12).astype(np.float64))
    nz = pc_hist[pc_hist > 0]
    ioi = onset_intervals_s(start_s)
    dur = end_s - start_s
    span = float(end_s.max() - start_s.min())
    return {
        "pitch_range": float(pitch.max() - pitch.min()),
        "used_pitches": float(len(np.unique(pitch))),
        "used_pitch_classes": float(len(np.unique(pitch % 12))),
        "pitch_class_entropy": float(-(nz * np.log2(nz)).sum()),
        "polyphony": polyphony(start_s, end_s),
        "note_density": n / span if span > 0 else 0.0,
        "ioi_mean_s": float(ioi.mean()) if len(ioi) else 0.0,
        "duration_mean_s": float(dur.mean()),
        "velocity_mean": float(np.mean(velocity)),
        "velocity_std": float(np.std(velocity)),
        "scale_consistency": scale_consistency(pitch),
        "pitch_class_histogram": pc_hist,
        "ioi_histogram": _normalised(np.histogram(ioi, TIME_BIN_EDGES_S)[0].astype(np.float64)),
        "duration_histogram": _normalised(np.histogram(dur, TIME_BIN_EDGES_S)[0].astype(np.float64)),
    }


def feature_table(pieces: Sequence[Notes]) -> dict[str, np.ndarray]:
    """Features of many pieces: name -> values_N (scalar) or values_NxB (histogram)."""
    rows = [piece_features(p) for p in pieces]
    return {k: np.asarray([r[k] for r in rows], np.float64) for k in FEATURES}


# ----------------------------------------------------------------------------- set comparison


def _as_2d(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return values[:, None] if values.ndim == 1 else values


def pairwise_distances(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distances between the pieces of a and b (or among a: each pair once)."""
    a2 = _as_2d(a)
    if b is None:
        i, j = np.triu_indices(len(a2), k=1)
        return np.linalg.norm(a2[i] - a2[j], axis=1)
    b2 = _as_2d(b)
    return np.linalg.norm(a2[:, None, :] - b2[None, :, :], axis=-1).ravel()


def kde(samples: np.ndarray, grid: np.ndarray, bandwidth: float | None = None) -> np.ndarray:
    """Gaussian KDE density on `grid` (Scott's rule; a floor keeps constant samples finite)."""
    samples = np.asarray(samples, np.float64)
    if len(samples) == 0:
        return np.zeros_like(grid)
    if bandwidth is None:
        spread = samples.std()
        scale = max(abs(grid[-1] - grid[0]), 1e-12)
        bandwidth = max(1.06 * spread * len(samples) ** -0.2, 0.01 * scale)
    z = (grid[:, None] - samples[None, :]) / bandwidth
    # Chunk-free: grids are ~512 points and sample sets are subsampled to a few thousand.
    return np.exp(-0.5 * z * z).sum(axis=1) / (len(samples) * bandwidth * np.sqrt(2 * np.pi))


def overlap_and_kl(p_samples: np.ndarray, q_samples: np.ndarray, num_points: int = 512) -> tuple[float, float]:
    """(overlap area, KL(p || q) in nats) of the KDEs of two 1-D sample sets."""
    p_samples, q_samples = np.asarray(p_samples, np.float64), np.asarray(q_samples, np.float64)
    if len(p_samples) == 0 or len(q_samples) == 0:
        return float("nan"), float("nan")
    both = np.concatenate([p_samples, q_samples])
    lo, hi = both.min(), both.max()
    pad = 0.1 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.1
    grid = np.linspace(lo - pad, hi + pad, num_points)
    dx = grid[1] - grid[0]
    p, q = kde(p_samples, grid), kde(q_samples, grid)
    p, q = p / max(p.sum() * dx, 1e-300), q / max(q.sum() * dx, 1e-300)
    overlap = float(np.minimum(p, q).sum() * dx)
    eps = 1e-10
    kl = float((p * np.log((p + eps) / (q + eps))).sum() * dx)
    return overlap, max(kl, 0.0)


def _subsample(d: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return d if len(d) <= limit else rng.choice(d, limit, replace=False)


def compare_sets(
    candidate: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    *,
    max_distances: int = 4000,
    seed: int = 0,
) -> dict[str, dict]:
    """Per feature: how close `candidate` pieces are to `reference` pieces (Yang & Lerch 2018).

    Both arguments are `feature_table` outputs. For each feature: the mean/std of each set
    (absolute measure), and overlap / KL between the reference intra-set distance
    distribution and the candidate-to-reference inter-set one (relative measure).
    Returns {feature: {'overlap', 'kl', 'candidate_mean', 'candidate_std',
    'reference_mean', 'reference_std'}} (means of histograms are per-bin lists).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name in FEATURES:
        c, r = np.asarray(candidate[name]), np.asarray(reference[name])
        if len(c) == 0 or len(r) < 2:
            out[name] = {"overlap": float("nan"), "kl": float("nan")}
            continue
        intra = _subsample(pairwise_distances(r), max_distances, rng)
        inter = _subsample(pairwise_distances(c, r), max_distances, rng)
        overlap, kl = overlap_and_kl(intra, inter)

        def stat(x, f):
            v = f(x, axis=0)
            return v.tolist() if np.ndim(v) else float(v)

        out[name] = {
            "overlap": overlap,
            "kl": kl,
            "candidate_mean": stat(c, np.mean),
            "candidate_std": stat(c, np.std),
            "reference_mean": stat(r, np.mean),
            "reference_std": stat(r, np.std),
        }
    return out


def plot_feature(
    name: str, sets: dict[str, np.ndarray], path: str, *, reference: str = "test"
) -> None:
    """PNG of one feature across named sets (e.g. generated / test / train).

    Scalars: KDE of the per-piece values. Histograms: the mean histogram of each set.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    colors = {"generated": "tab:red", "test": "tab:blue", "train": "tab:gray"}
    first = np.asarray(next(iter(sets.values())))
    if first.ndim == 1:
        allv = np.concatenate([np.asarray(v, np.float64) for v in sets.values() if len(v)])
        lo, hi = allv.min(), allv.max()
        pad = 0.1 * (hi - lo) if hi > lo else 1.0
        grid = np.linspace(lo - pad, hi + pad, 400)
        for label, v in sets.items():
            if len(v):
                ax.plot(grid, kde(np.asarray(v, np.float64), grid), label=f"{label} (n={len(v)})",
                        color=colors.get(label), lw=2 if label == reference else 1.5)
        ax.set_xlabel(name)
        ax.set_ylabel("density")
    else:
        width = 0.8 / max(len(sets), 1)
        bins = np.arange(first.shape[1])
        for k, (label, v) in enumerate(sets.items()):
            if len(v):
                ax.bar(bins + k * width, np.asarray(v).mean(axis=0), width, label=f"{label} (n={len(v)})",
                       color=colors.get(label))
        if name == "pitch_class_histogram":
            ticks = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
        else:
            ticks = [f"<{e:g}" for e in TIME_BIN_EDGES_S[1:-1]] + [f">={TIME_BIN_EDGES_S[-2]:g}"]
        ax.set_xticks(bins + width * (len(sets) - 1) / 2, ticks, rotation=45 if len(ticks) > 12 else 0, fontsize=7)
        ax.set_ylabel("mean fraction")
        ax.set_xlabel(name + (" (seconds)" if name != "pitch_class_histogram" else ""))
    ax.set_title(name)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.12, right=0.98, top=0.9, bottom=0.22)
    fig.savefig(path, dpi=90)
    plt.close(fig)
