"""Does a generated piece copy its training data? Longest verbatim spans, n-gram reuse.

A piece becomes a string of note-to-note steps: notes sorted by (onset, pitch), and
step i = (pitch[i+1] - pitch[i], onset[i+1] - onset[i] in time steps). Two spans of
notes match when their steps are equal, i.e. the same melody/voicing with the same
rhythm, in any transposition (intervals, not pitches), at the same tempo. A span of
m steps covers m + 1 notes; its length in seconds is from its first to its last
onset.

`CopyIndex(training_pieces)` builds a suffix array over all training steps (numpy
prefix doubling, O(N log N)); `matching_statistics(piece)` then gives, for every
position of a query, the longest span starting there that occurs anywhere in the
training set (binary search on the suffix array). From that:
- the longest copied span (notes and seconds) and where it came from,
- the share of the query's n-note windows that occur in the training set.

`training_index(dataset_path, vocab)` is the index of a dataset's whole train split,
built once and cached beside the dataset as `copy_index.npz` (plain arrays, no pickle),
for the sampler's copy guard (`mgpt.generate --max_copy_seconds`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from data_prep.notes import Notes

_SEPARATOR = 0  # between training pieces; never produced by `note_steps`
_WINDOW = 256  # steps compared per lookup; a match this long is redone over the whole query


def note_steps(notes: Notes, steps_per_second: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(codes_S, onsets_N): transposition-invariant step codes (all > 0) and sorted onsets (s).

    S = N - 1 for N notes. Codes order like the (interval, ioi) pairs they encode.
    """
    pitch, _, start_s, _ = notes
    pitch = np.asarray(pitch, np.int64)
    onset_steps = np.floor(np.asarray(start_s, np.float64) * steps_per_second + 0.5).astype(np.int64)
    order = np.lexsort((pitch, onset_steps))
    pitch, onset_steps = pitch[order], onset_steps[order]
    interval = np.clip(np.diff(pitch), -127, 127) + 128  # 1..255
    ioi = np.clip(np.diff(onset_steps), 0, (1 << 22) - 1)
    codes = ioi * 256 + interval  # >= 1, so never the separator
    return codes.astype(np.int64), onset_steps / float(steps_per_second)


def suffix_array(codes: np.ndarray) -> np.ndarray:
    """Start positions of all suffixes of `codes` in lexicographic order (prefix doubling)."""
    n = len(codes)
    if n == 0:
        return np.zeros(0, np.int64)
    _, rank = np.unique(codes, return_inverse=True)
    rank = rank.astype(np.int64)
    k = 1
    while True:
        second = np.full(n, -1, np.int64)
        second[: n - k] = rank[k:] if k < n else second[:0]
        sa = np.lexsort((second, rank))
        key_r, key_s = rank[sa], second[sa]
        new_group = np.ones(n, bool)
        new_group[1:] = (key_r[1:] != key_r[:-1]) | (key_s[1:] != key_s[:-1])
        new_rank = np.empty(n, np.int64)
        new_rank[sa] = np.cumsum(new_group) - 1
        rank = new_rank
        if new_group.all() or k >= n:
            return sa.astype(np.int64)
        k *= 2


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    if m == 0:
        return 0
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


@dataclasses.dataclass
class Copy:
    """The longest copied span of one piece."""

    notes: int  # notes in the span (steps + 1); 0 if not even two notes match
    seconds: float  # first to last onset of the longest-in-seconds span
    seconds_notes: int  # notes of that longest-in-seconds span
    train_piece: int  # index (into the training pieces) of the source of the longest-in-seconds span
    query_start: int  # note index in the query where that span starts


class CopyIndex:
    """Suffix array over the note steps of every training piece."""

    def __init__(self, pieces: Sequence[Notes], steps_per_second: int = 100):
        self.steps_per_second = steps_per_second
        parts, owner = [], []
        for i, notes in enumerate(pieces):
            codes, _ = note_steps(notes, steps_per_second)
            parts += [codes, np.array([_SEPARATOR], np.int64)]
            owner.append(np.full(len(codes) + 1, i, np.int64))
        self.codes = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        self.owner = np.concatenate(owner) if owner else np.zeros(0, np.int64)
        self.num_pieces = len(pieces)
        self.sa = suffix_array(self.codes)
        # Big-endian 4-byte codes compare as bytes exactly as the codes compare as numbers.
        self._bytes = self.codes.astype(">u4").tobytes()

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything the index is, as plain arrays (for np.savez; `from_arrays` inverts it)."""
        return {"codes": self.codes, "owner": self.owner, "sa": self.sa,
                "num_pieces": np.asarray(self.num_pieces), "steps_per_second": np.asarray(self.steps_per_second)}

    @classmethod
    def from_arrays(cls, arrays) -> "CopyIndex":
        index = cls.__new__(cls)
        index.codes, index.owner, index.sa = (np.asarray(arrays[k], np.int64) for k in ("codes", "owner", "sa"))
        index.num_pieces = int(arrays["num_pieces"])
        index.steps_per_second = int(arrays["steps_per_second"])
        index._bytes = index.codes.astype(">u4").tobytes()
        return index

    def _suffix_bytes(self, pos: int, length: int) -> bytes:
        return self._bytes[4 * pos : 4 * (pos + length)]

    def longest_match_at(self, query: np.ndarray, start: int) -> tuple[int, int]:
        """(length in steps, training position) of the longest training span equal to query[start:...]."""
        if len(self.sa) == 0 or start >= len(query):
            return 0, -1
        best, where = self._search(query[start : start + _WINDOW])
        if best == _WINDOW:  # a very long copy: compare whole suffixes to measure it exactly
            best, where = self._search(query[start:])
        return best, where

    def _search(self, q: np.ndarray) -> tuple[int, int]:
        qb = q.astype(">u4").tobytes()
        lo, hi = 0, len(self.sa)
        while lo < hi:  # the first suffix >= q, comparing len(q) codes
            mid = (lo + hi) // 2
            if self._suffix_bytes(int(self.sa[mid]), len(q)) < qb:
                lo = mid + 1
            else:
                hi = mid
        best, where = 0, -1
        for idx in (lo - 1, lo):  # the longest common prefix is with a neighbour of the insertion point
            if 0 <= idx < len(self.sa):
                pos = int(self.sa[idx])
                m = _common_prefix(q, self.codes[pos : pos + len(q)])
                if m > best:
                    best, where = m, pos
        return best, where

    def matching_statistics(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ms_S, where_S): for each step i, the longest training span starting at query[i], and where."""
        ms = np.zeros(len(query), np.int64)
        where = np.full(len(query), -1, np.int64)
        for i in range(len(query)):
            ms[i], where[i] = self.longest_match_at(query, i)
        return ms, where

    def longest_copy(self, notes: Notes) -> tuple[Copy, np.ndarray]:
        """The piece's longest copied span, and its matching statistics (for n-gram shares)."""
        codes, onsets = note_steps(notes, self.steps_per_second)
        ms, where = self.matching_statistics(codes)
        if len(codes) == 0 or ms.max() == 0:
            return Copy(0, 0.0, 0, -1, -1), ms
        idx = np.arange(len(codes))
        seconds = onsets[idx + ms] - onsets[idx]
        i = int(np.argmax(seconds))
        owner = int(self.owner[where[i]]) if where[i] >= 0 else -1
        return Copy(int(ms.max()) + 1, float(seconds[i]), int(ms[i]) + 1, owner, i), ms


def ngram_share(ms: np.ndarray, n: int) -> tuple[int, int]:
    """(n-note windows found in training, all n-note windows) from matching statistics."""
    steps = n - 1
    total = max(len(ms) - steps + 1, 0)
    return int(np.sum(ms[:total] >= steps)), total


def originality_report(
    index: CopyIndex, pieces: Sequence[Notes], *, ngram_sizes: Sequence[int] = (8, 16), threshold_s: float = 8.0
) -> dict:
    """Longest copies per piece, flagged pieces, and pooled n-gram shares for a set of pieces."""
    per_piece, found = [], {n: [0, 0] for n in ngram_sizes}
    for notes in pieces:
        copy, ms = index.longest_copy(notes)
        per_piece.append(dataclasses.asdict(copy))
        for n in ngram_sizes:
            f, t = ngram_share(ms, n)
            found[n][0] += f
            found[n][1] += t
    secs = np.asarray([p["seconds"] for p in per_piece], np.float64)
    notes = np.asarray([p["notes"] for p in per_piece], np.float64)
    return {
        "pieces": per_piece,
        "threshold_s": threshold_s,
        "flagged": [i for i, s in enumerate(secs.tolist()) if s >= threshold_s],
        "longest_copy_s_max": float(secs.max()) if len(secs) else 0.0,
        "longest_copy_s_median": float(np.median(secs)) if len(secs) else 0.0,
        "longest_copy_notes_max": float(notes.max()) if len(notes) else 0.0,
        "longest_copy_notes_median": float(np.median(notes)) if len(notes) else 0.0,
        "ngram_share": {
            str(n): (found[n][0] / found[n][1] if found[n][1] else float("nan")) for n in ngram_sizes
        },
        "ngram_windows": {str(n): found[n][1] for n in ngram_sizes},
    }


# ----------------------------------------------------------------------------- the train split's index, cached

INDEX_FILE = "copy_index.npz"
_INDEX_FORMAT = 1  # bump when note_steps or the arrays change meaning


def _fingerprint(dataset_path: pathlib.Path, vocab) -> str:
    """What the cached index depends on: the dataset's build record (rewritten by every build;
    dataset_info.json when there is none), the time grid and the index format."""
    h = hashlib.sha256(f"format {_INDEX_FORMAT}; steps/s {vocab.steps_per_second}".encode())
    for name in ("build.json", "dataset_info.json"):
        if (dataset_path / name).is_file():
            h.update((dataset_path / name).read_bytes())
            break
    return h.hexdigest()


def training_index(dataset_path: str | os.PathLike, vocab) -> tuple[CopyIndex, list[str]]:
    """(index over every train piece, their piece ids), from `dataset_path/copy_index.npz` when
    it matches the dataset, else built from the train split and cached there (atomically; a
    dataset folder we may not write to just means building it each time)."""
    dataset_path = pathlib.Path(dataset_path)
    path = dataset_path / INDEX_FILE
    fingerprint = _fingerprint(dataset_path, vocab)
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) == fingerprint:
                return CopyIndex.from_arrays(z), [str(x) for x in z["piece_ids"]]
    except (OSError, KeyError, ValueError):  # absent, cut short or from another format: rebuild
        pass
    from mgpt.train import data as data_lib

    source = data_lib.open_source(dataset_path, "train")
    notes, piece_ids = [], []
    for i in range(len(source)):
        record = source[i]
        notes.append(vocab.decode_notes(np.asarray(record["tokens"], np.int32)))
        piece_ids.append(data_lib.record_text(record["piece_id"]))
    index = CopyIndex(notes, vocab.steps_per_second)
    tmp = path.with_name(f"{INDEX_FILE}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.asarray(fingerprint), piece_ids=np.asarray(piece_ids, dtype=str),
                     **index.arrays())
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half
    except OSError as e:
        tmp.unlink(missing_ok=True)
        print(f"warning: cannot cache the copy index in {dataset_path} ({e.strerror}); it is rebuilt each run",
              file=sys.stderr, flush=True)
    return index, piece_ids
