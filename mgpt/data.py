"""Dataset -> grain pipeline -> {'inputs', 'targets', 'mask', 'positions', 'segment_ids'} batches.

A training row holds `seq_len + 1` tokens; the model reads `inputs_BxL = row[:, :-1]`
and predicts `targets_BxL = row[:, 1:]`. Rows are built from pieces like this:

- Every segment starts with the piece's conditioning token (`vocab.style_id(style)`),
  and the piece itself ends with EOS.
- A piece longer than a row is cut at a random offset (a fresh crop every epoch), and
  the crop still starts with the conditioning token, so every row is conditioned. A crop
  that starts mid-piece also carries the VELOCITY event in force at its start (the last
  one before it), right after the conditioning token, and the model is trained to
  predict it: without it the model learns that pieces may begin with no loudness set,
  and samples start at the decoder's default velocity. Evaluation segments after a
  piece's first carry it too, as given context.
- Shorter pieces are packed best-fit into rows (grain's packer). Each keeps the
  packer's segment id (1, 2, ... within a row; 0 for PAD) and its positions, which
  restart at 0: the model attends only within a segment, so a packed piece is scored
  exactly as if it were alone. What is left over is PAD.
- On the training split each piece is transposed by a random number of semitones in
  [-transpose, transpose] before cropping (`vocab.transpose` drops notes pushed out of
  range); validation and test are never transposed.

`mask_BxL` is 1 where the target is to be predicted and 0 where it is given: PAD and
conditioning tokens always, and in evaluation the carried VELOCITY too, so validation
nats/event count each event of a piece and its EOS exactly once. Segments carry this
flag as a `loss` feature through packing.

`positions_BxL` and `segment_ids_BxL` belong to the inputs (row[:, :-1]), like the
tokens the model reads.

Iterators are grain `DatasetIterator`s: `get_state()` / `set_state()` make the
training position part of a checkpoint (see mgpt/train.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from data_prep.vocab import Vocabulary

SPLITS = ("train", "validation", "test")


def record_text(value: Any) -> str:
    """Record strings may come back from the data source as bytes."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return record_text(value.item())
    return str(value)


def open_source(dataset_dir: str | os.PathLike, split: str) -> Sequence[dict]:
    """The random-access TFDS data source of one split (records as in data_prep.build)."""
    import tensorflow_datasets as tfds

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        builder = tfds.builder_from_directory(os.fspath(dataset_dir))
    except Exception as e:  # tfds raises several types for a missing/garbled directory
        raise FileNotFoundError(f"{dataset_dir}: not a TFDS dataset directory ({e})") from None
    if split not in builder.info.splits:  # data_prep leaves out splits with no pieces
        raise FileNotFoundError(f"{dataset_dir}: the dataset has no {split!r} split")
    return builder.as_data_source(split)


@dataclasses.dataclass(frozen=True)
class _Segments:
    """Shared piece -> segment logic for the train (random) and eval (exhaustive) paths."""

    vocab: Vocabulary
    seq_len: int

    def __post_init__(self):
        if self.seq_len < 2:  # room for STYLE, a carried VELOCITY and at least one event
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")

    def body(self, record: dict, semitones: int = 0) -> tuple[int, np.ndarray]:
        ids = np.asarray(record["tokens"], np.int32)
        if semitones:
            ids = self.vocab.transpose(ids, semitones)
        body = np.concatenate([ids, np.asarray([self.vocab.eos_id], np.int32)])
        return self.vocab.style_id(record_text(record["style"])), body

    def segment(self, style: int, body: np.ndarray, start: int, predict_carried: bool) -> dict:
        """STYLE, the carried velocity, then body from `start`: seq_len + 1 tokens at most."""
        carried = self.vocab.carried_velocity(body, start)
        piece = body[start : start + self.seq_len - len(carried)]
        return {
            "tokens": np.concatenate([np.asarray([style] + carried, np.int32), piece]),
            "loss": np.concatenate([[0], np.full(len(carried), int(predict_carried)), np.ones(len(piece))]).astype(
                np.int32),
        }

    def consecutive(self, style: int, body: np.ndarray) -> list[dict]:
        """Segments covering every token of body exactly once, in order."""
        out, start = [], 0
        while start < len(body):
            out.append(self.segment(style, body, start, predict_carried=False))
            start += len(out[-1]["tokens"]) - 1 - len(self.vocab.carried_velocity(body, start))
        return out


def piece_segments(tokens: np.ndarray, style: str, vocab: Vocabulary, seq_len: int) -> list[dict]:
    """The evaluation cut of one piece: {'tokens', 'loss'} segments of at most seq_len + 1
    tokens, each STYLE (+ carried VELOCITY) then the next events; `loss` marks the tokens
    to predict, which cover the piece's events and EOS exactly once."""
    segments = _Segments(vocab, seq_len)
    style_id, body = segments.body({"tokens": tokens, "style": style})
    return segments.consecutive(style_id, body)


class _RandomSegment(grain.transforms.RandomMap):
    """record -> one segment of at most seq_len + 1 tokens (random transpose and crop)."""

    def __init__(self, segments: _Segments, transpose: int):
        self._segments = segments
        self._transpose = transpose

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        semitones = int(rng.integers(-self._transpose, self._transpose + 1)) if self._transpose else 0
        style, body = self._segments.body(record, semitones)
        room = self._segments.seq_len  # one slot of the seq_len + 1 row is the style token
        start = 0
        if len(body) > room:
            # A crop with a carried velocity holds one event fewer, so its start may be one
            # later: the piece's last events and EOS stay reachable either way.
            start = int(rng.integers(0, len(body) - room + 2))
            if start + room - len(self._segments.vocab.carried_velocity(body, start)) > len(body):
                start = len(body) - room  # that last start fills a row only with a carried velocity
        return self._segments.segment(style, body, start, predict_carried=True)


class _AllSegments(grain.experimental.FlatMapTransform):
    """record -> consecutive segments covering the whole piece (deterministic, for eval)."""

    max_fan_out = 1 << 20

    def __init__(self, segments: _Segments):
        self._segments = segments

    def flat_map(self, record: dict) -> list[dict]:
        style, body = self._segments.body(record)
        return self._segments.consecutive(style, body)


BATCH_KEYS = ("inputs", "targets", "mask", "positions", "segment_ids")


def batch_shapes(batch_size: int, seq_len: int) -> dict[str, tuple[tuple[int, int], type]]:
    """{key: (shape, dtype)} of a model batch, for abstract (AOT) compiles of the train step."""
    return {k: ((batch_size, seq_len), np.float32 if k == "mask" else np.int32) for k in BATCH_KEYS}


def _to_model_batch(packed: dict) -> dict:
    rows_BxL1 = np.asarray(packed["tokens"], np.int32)
    return {
        "inputs": rows_BxL1[:, :-1],
        "targets": rows_BxL1[:, 1:],
        "mask": np.asarray(packed["loss"], np.float32)[:, 1:],  # packing pads it with 0
        # Shifted with the inputs: the token at i is read at position positions[i] of piece segment_ids[i].
        "positions": np.asarray(packed["tokens_positions"], np.int32)[:, :-1],
        "segment_ids": np.asarray(packed["tokens_segment_ids"], np.int32)[:, :-1],
    }


def _pack(ds: grain.IterDataset, seq_len: int, num_bins: int, seed: int, shuffle: bool):
    keep = ("tokens", "loss", "tokens_positions", "tokens_segment_ids")
    return grain.experimental.BestFitPackIterDataset(
        ds,
        length_struct={"tokens": seq_len + 1, "loss": seq_len + 1},
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle,
    ).map(lambda x: {k: x[k] for k in keep})


def _host_slice(source: Sequence[dict], process_index: int, process_count: int) -> grain.MapDataset:
    ds = grain.MapDataset.source(source)
    if process_count > 1:
        if len(ds) < process_count:
            raise ValueError(f"split has {len(ds)} pieces, fewer than the {process_count} hosts")
        ds = ds[process_index::process_count]
    return ds


def train_dataset(
    source: Sequence[dict],
    vocab: Vocabulary,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    transpose: int = 0,
    num_packing_bins: int = 64,
    read_threads: int = 1,
    prefetch: int = 2,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Endless shuffled training batches for this host.

    `batch_size` is this host's share of the global batch. Iterate with `iter(ds)`;
    the iterator's state is checkpointable. Each element: inputs/targets/positions/
    segment_ids int32[B, seq_len], mask float32[B, seq_len].
    """
    if len(source) == 0:
        raise ValueError("the training split is empty")
    ds = _host_slice(source, process_index, process_count)
    ds = ds.shuffle(seed=seed).repeat()
    ds = ds.random_map(_RandomSegment(_Segments(vocab, seq_len), transpose), seed=seed + 1)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * batch_size))
    ds = _pack(ds, seq_len, num_packing_bins, seed + 2, shuffle=True)
    ds = ds.batch(batch_size, drop_remainder=True).map(_to_model_batch)
    if prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def eval_batches(
    source: Sequence[dict],
    vocab: Vocabulary,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    num_packing_bins: int = 64,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict]:
    """A fixed list of `num_batches` evaluation batches for this host (every piece whole).

    Pieces are cut into consecutive segments (no crop, no transposition) and packed in
    order. Every host returns exactly `num_batches` batches: when its pieces run out the
    rest are all-PAD rows with mask 0, so multi-host eval steps stay in lockstep and
    the masked mean over all of them is exact. Returns fewer tokens than exist when the
    split is larger than `num_batches` rows allow.
    """
    ds = _host_slice(source, process_index, process_count).to_iter_dataset()
    ds = grain.experimental.FlatMapIterDataset(ds, _AllSegments(_Segments(vocab, seq_len)))
    ds = _pack(ds, seq_len, num_packing_bins, 0, shuffle=False)
    ds = ds.batch(batch_size, drop_remainder=False).map(_to_model_batch)
    out = []
    for batch in ds:
        if len(out) == num_batches:
            break
        rows = batch["inputs"].shape[0]
        if rows < batch_size:  # the last partial batch: pad with masked rows
            batch = {k: np.pad(v, ((0, batch_size - rows), (0, 0))) for k, v in batch.items()}
        out.append(batch)
    empty = {k: np.zeros(shape, dtype) for k, (shape, dtype) in batch_shapes(batch_size, seq_len).items()}
    out += [empty] * (num_batches - len(out))
    return out


def padding_fraction(batches, pad_id: int = 0) -> float:
    """Fraction of target positions in `batches` that are PAD."""
    total = pads = 0
    for batch in batches:
        total += batch["targets"].size
        pads += int((batch["targets"] == pad_id).sum())
    return pads / max(total, 1)
