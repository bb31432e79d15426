"""Dataset -> grain pipeline -> {'inputs', 'targets', 'mask'} batches.

A training row holds `seq_len + 1` tokens; the model reads `inputs_BxL = row[:, :-1]`
and predicts `targets_BxL = row[:, 1:]`. Rows are built from pieces like this:

- Every segment starts with the piece's conditioning token (`vocab.style_id(style)`),
  and the piece itself ends with EOS.
- A piece longer than a row is cut at a random offset (a fresh crop every epoch), and
  the crop still starts with the conditioning token, so every row is conditioned. A crop
  that starts mid-piece also carries the state in force at its start, right after the
  conditioning token (`Vocabulary.carried_state`): the VELOCITY in force, then a NOTE_ON
  for each note still sounding. The model is trained to predict that VELOCITY (without
  it, it learns that pieces may begin with no loudness set); the carried NOTE_ONs are
  given, never targets. Without them a crop shows NOTE_OFFs of notes it never saw
  begin, and the model learned that a NOTE_ON need not be closed: Bach samples droned
  with 11.8 notes sounding at each onset against 4.0 in real chorales. Evaluation
  segments after a piece's first carry the same state, all of it given.
- Shorter pieces are packed best-fit into rows (grain's packer); the EOS that ends each
  piece separates it from the next one. What is left over is PAD.
- On the training split each piece is transposed by a random number of semitones in
  [-transpose, transpose] before cropping (`vocab.transpose` drops notes pushed out of
  range); validation and test are never transposed.
- Style dropout (training split only): with probability `style_dropout` a segment's
  conditioning token becomes STYLE:unknown, so the one model also learns the
  unconditional distribution that classifier-free guidance (`mgpt.sample`, `guidance`)
  mixes against. Its draw comes last from the segment's rng, so 0 leaves every row as before.

`mask_BxL` is 1 where the target is to be predicted and 0 where it is given: PAD and
conditioning tokens always, carried NOTE_ONs always, and in evaluation the carried
VELOCITY too, so validation nats/event count each event of a piece and its EOS exactly
once. Segments carry this
flag as a `loss` feature through packing.

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
        if self.seq_len < 2:  # room for STYLE, a carried token and at least one event
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")

    def body(self, record: dict, semitones: int = 0) -> tuple[int, np.ndarray]:
        ids = np.asarray(record["tokens"], np.int32)
        if semitones:
            ids = self.vocab.transpose(ids, semitones)
        body = np.concatenate([ids, np.asarray([self.vocab.eos_id], np.int32)])
        return self.vocab.style_id(record_text(record["style"])), body

    def carried(self, body: np.ndarray, start: int) -> list[int]:
        """The carried context of a segment opening at body[start] (`Vocabulary.carried_state`),
        at most half a row: a pathological chord never crowds the events out."""
        return self.vocab.carried_state(body, start, limit=self.seq_len // 2)

    def segment(self, style: int, body: np.ndarray, start: int, predict_carried: bool) -> dict:
        """STYLE, the carried state, then body from `start`: seq_len + 1 tokens at most.

        Of the carried tokens only the leading VELOCITY may be a target (`predict_carried`,
        in training): it teaches the model to set a loudness when a piece opens. The carried
        NOTE_ONs are always given. They are not events of the piece at this point but a
        summary of what sounds, and the sampler always writes them itself; predicting them
        would teach the model to open pieces on chords struck before time began.
        """
        carried = self.carried(body, start)
        piece = body[start : start + self.seq_len - len(carried)]
        target = np.zeros(len(carried), np.int32)
        if predict_carried and carried and self.vocab.is_velocity(carried[0]):
            target[0] = 1
        return {
            "tokens": np.concatenate([np.asarray([style] + carried, np.int32), piece]),
            "loss": np.concatenate([[0], target, np.ones(len(piece), np.int32)]).astype(np.int32),
        }

    def consecutive(self, style: int, body: np.ndarray) -> list[dict]:
        """Segments covering every token of body exactly once, in order."""
        out, start = [], 0
        while start < len(body):
            out.append(self.segment(style, body, start, predict_carried=False))
            start += int(out[-1]["loss"].sum())  # the body tokens it holds (carried ones are given)
        return out

    def random_start(self, body: np.ndarray, rng: np.random.Generator) -> int:
        """A crop start whose row ends at a uniformly drawn position of body.

        Drawing the end rather than the start keeps every event, the last ones and EOS
        included, equally likely to be a target whatever the carried state's length.
        """
        room = self.seq_len  # one slot of the seq_len + 1 row is the style token
        if len(body) <= room:
            return 0
        end = int(rng.integers(room, len(body) + 1))
        start = end - room
        for _ in range(2):  # the carried length depends on the start: settle it (it rarely moves)
            start = min(end - 1, end - room + len(self.carried(body, start))) if end > room else 0
        return start


def piece_segments(tokens: np.ndarray, style: str, vocab: Vocabulary, seq_len: int) -> list[dict]:
    """The evaluation cut of one piece: {'tokens', 'loss'} segments of at most seq_len + 1
    tokens, each STYLE (+ carried VELOCITY) then the next events; `loss` marks the tokens
    to predict, which cover the piece's events and EOS exactly once."""
    segments = _Segments(vocab, seq_len)
    style_id, body = segments.body({"tokens": tokens, "style": style})
    return segments.consecutive(style_id, body)


class _RandomSegment(grain.transforms.RandomMap):
    """record -> one segment of at most seq_len + 1 tokens (random transpose, crop, style dropout)."""

    def __init__(self, segments: _Segments, transpose: int, style_dropout: float = 0.0):
        self._segments = segments
        self._transpose = transpose
        self._style_dropout = style_dropout

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        semitones = int(rng.integers(-self._transpose, self._transpose + 1)) if self._transpose else 0
        style, body = self._segments.body(record, semitones)
        start = self._segments.random_start(body, rng)
        # Drawn last and only when on: with 0 the rng stream, hence every row, is unchanged.
        if self._style_dropout and rng.random() < self._style_dropout:
            style = self._segments.vocab.unknown_style_id
        return self._segments.segment(style, body, start, predict_carried=True)


class _AllSegments(grain.experimental.FlatMapTransform):
    """record -> consecutive segments covering the whole piece (deterministic, for eval)."""

    max_fan_out = 1 << 20

    def __init__(self, segments: _Segments):
        self._segments = segments

    def flat_map(self, record: dict) -> list[dict]:
        style, body = self._segments.body(record)
        return self._segments.consecutive(style, body)


def _to_model_batch(packed: dict) -> dict:
    rows_BxL1 = np.asarray(packed["tokens"], np.int32)
    return {
        "inputs": rows_BxL1[:, :-1],
        "targets": rows_BxL1[:, 1:],
        "mask": np.asarray(packed["loss"], np.float32)[:, 1:],  # packing pads it with 0
    }


def _pack(ds: grain.IterDataset, seq_len: int, num_bins: int, seed: int, shuffle: bool):
    return grain.experimental.BestFitPackIterDataset(
        ds,
        length_struct={"tokens": seq_len + 1, "loss": seq_len + 1},
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle,
    ).map(lambda x: {"tokens": x["tokens"], "loss": x["loss"]})


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
    style_dropout: float = 0.0,
    num_packing_bins: int = 64,
    read_threads: int = 1,
    prefetch: int = 2,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Endless shuffled training batches for this host.

    `batch_size` is this host's share of the global batch. Iterate with `iter(ds)`;
    the iterator's state is checkpointable. Each element: inputs/targets int32[B, seq_len],
    mask float32[B, seq_len]. `style_dropout`: the share of segments conditioned on
    STYLE:unknown instead of their piece's style (see the module docstring).
    """
    if not 0 <= style_dropout < 1:
        raise ValueError(f"style_dropout must be in [0, 1), got {style_dropout}")
    if len(source) == 0:
        raise ValueError("the training split is empty")
    ds = _host_slice(source, process_index, process_count)
    ds = ds.shuffle(seed=seed).repeat()
    ds = ds.random_map(_RandomSegment(_Segments(vocab, seq_len), transpose, style_dropout), seed=seed + 1)
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
    empty = {
        "inputs": np.zeros((batch_size, seq_len), np.int32),
        "targets": np.zeros((batch_size, seq_len), np.int32),
        "mask": np.zeros((batch_size, seq_len), np.float32),
    }
    out += [empty] * (num_batches - len(out))
    return out


def padding_fraction(batches, pad_id: int = 0) -> float:
    """Fraction of target positions in `batches` that are PAD."""
    total = pads = 0
    for batch in batches:
        total += batch["targets"].size
        pads += int((batch["targets"] == pad_id).sum())
    return pads / max(total, 1)
