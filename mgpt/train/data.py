"""Dataset -> grain pipeline -> {'inputs', 'targets', 'mask', 'positions', 'segment_ids'} batches.

A training row holds `seq_len + 1` tokens; the model reads `inputs_BxL = row[:, :-1]`
and predicts `targets_BxL = row[:, 1:]`. Rows are built from pieces like this:

- Every segment starts with the piece's conditioning token (`vocab.style_id(style)`),
  and the piece itself ends with EOS.
- A piece longer than a row is cut at random offsets, one crop per `seq_len` events of
  it each epoch (its (piece, chunk) items, so long pieces are trained in proportion to
  their length), and the crop still starts with the conditioning token, so every row is
  conditioned. A crop that starts mid-piece also carries the state in force at its start,
  right after the conditioning token (`Vocabulary.carried_state`): the VELOCITY in force,
  then a NOTE_ON for each note still sounding. The model is trained to predict that
  VELOCITY (without it, it learns that pieces may begin with no loudness set); the
  carried NOTE_ONs are given, never targets. Without them a crop shows NOTE_OFFs of notes
  it never saw begin, and the model learned that a NOTE_ON need not be closed: Bach
  samples droned with 11.8 notes sounding at each onset against 4.0 in real chorales.
  Evaluation segments after a piece's first carry the same state, all of it given.
- Shorter pieces are packed best-fit into rows (grain's packer). Each keeps the
  packer's segment id (1, 2, ... within a row; 0 for PAD) and its positions, which
  restart at 0: the model attends only within a segment, so a packed piece is scored
  exactly as if it were alone. What is left over is PAD.
- On the training split each piece is transposed by a random number of semitones in
  [-transpose, transpose] before cropping (`vocab.transpose` drops notes pushed out of
  range); validation and test are never transposed.
- Style dropout (training split only): with probability `style_dropout` a segment's
  conditioning token becomes STYLE:unknown, so the one model also learns the
  unconditional distribution that classifier-free guidance (`mgpt.sample`, `guidance`)
  mixes against. Its draw comes last from the segment's rng, so 0 leaves every row as before.
- Fill in the middle (training split only, `fim_rate` > 0, the vocabulary `with_fim()`):
  that share of training segments is rearranged as prefix | suffix | middle with FIM
  marker tokens (mgpt/sample/fim.py has the layout and which tokens are targets). Its draws come
  after style dropout's, so 0 leaves every row as before. Validation and test segments stay
  plain: the trainer's validation nats/event remain comparable with models trained
  without FIM, and infilling is measured by its own script (`python -m mgpt.eval.infill`).

- Controls (a vocabulary `with_controls()`, config.data.control_seconds > 0; data_prep/controls.py):
  each piece, after its transposition, gets its segments' control tokens (note density,
  polyphony, register, loudness, mode) at its start and after the TIME_SHIFT that opens each
  next segment, and a crop that opens mid-segment carries them after STYLE
  (`Vocabulary.carried_state`). They are given, never targets. In training each token is
  dropped with probability `control_dropout`, independently, so any subset can be asked for.

`mask_BxL` is 1 where the target is to be predicted and 0 where it is given: PAD and
conditioning tokens always, carried NOTE_ONs always, and in evaluation the carried
VELOCITY too, so validation nats/event count each event of a piece and its EOS exactly
once. Segments carry this
flag as a `loss` feature through packing.

`positions_BxL` and `segment_ids_BxL` belong to the inputs (row[:, :-1]), like the
tokens the model reads.

Iterators are grain `DatasetIterator`s: `get_state()` / `set_state()` make the
training position part of a checkpoint (see mgpt/train/loop.py). The training stream is cut
into data shards with their own seeds (see `train_dataset`), so that neither the hosts'
randomness nor the saved position depends on the host count.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from etils import epath

from data_prep import controls as controls_lib
from data_prep.vocab import Vocabulary
from mgpt.sample import fim as fim_lib
from mgpt.errors import MissingInput, UserError

SPLITS = ("train", "validation", "test")


def record_text(value: Any) -> str:
    """Record strings may come back from the data source as bytes."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return record_text(value.item())
    return str(value)


def open_source(dataset_dir: str | os.PathLike, split: str, training_only: bool = False) -> Sequence[dict]:
    """The random-access TFDS data source of one split (records as in data_prep.build).

    `training_only`: records hold only what training reads ('tokens', 'style'), parsed
    straight from the stored tf.Example: 74 against 198 µs per MAESTRO-length record,
    as TFDS decodes every text feature too."""
    import tensorflow_datasets as tfds

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        builder = tfds.builder_from_directory(os.fspath(dataset_dir))
    except Exception as e:  # tfds raises several types for a missing/garbled directory
        raise MissingInput(f"{dataset_dir}: not a TFDS dataset directory ({e})") from None
    if split not in builder.info.splits:  # data_prep leaves out splits with no pieces
        raise MissingInput(f"{dataset_dir}: the dataset has no {split!r} split")
    if "tfrecord" in str(builder.info.file_format).lower():  # grain needs random access
        raise MissingInput(f"{dataset_dir}: a TFRecord dataset, and training reads ArrayRecord; rebuild it "
                           "with python -m data_prep.build --file_format=array_record")
    _check_shards(builder.info.splits[split], dataset_dir, split)
    if training_only:
        raw = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        return _TrainingRecords(raw)
    return builder.as_data_source(split)


def _check_shards(split_info, dataset_dir, split: str) -> None:
    """Every record file of the split holds the records the dataset's metadata counts.

    Reads only each file's footer (its index), so a whole dataset is checked in moments at
    start-up, not when a truncated or emptied shard is first read: for a validation shard,
    hours later at the first evaluation."""
    from array_record.python import array_record_module

    for path, expected in zip(split_info.filepaths, split_info.shard_lengths):
        try:
            reader = array_record_module.ArrayRecordReader(os.fspath(path))
            try:
                found = reader.num_records()
            finally:
                reader.close()
        except Exception as e:  # noqa: BLE001 - riegeli reports damage as several types
            found, why = None, str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        else:
            why = f"{found:,} of its {expected:,} records"
        if found != expected:
            raise UserError(f"{dataset_dir}: the {split} shard {path} is damaged or truncated ({why}); "
                               "rebuild the dataset (python -m data_prep.build ... --overwrite)")


def resolve_dataset(dataset_dir: str) -> epath.Path:
    """config.data.dataset_dir -> the TFDS dataset directory (building the demo on first use)."""
    from data_prep import build

    path = epath.Path(dataset_dir)
    if "://" not in dataset_dir:  # a build killed mid-swap left the dataset at *.replaced: put it back
        build.recover_swap(path)  # dataset_dir is the dataset itself
        build.recover_swap(build.dataset_path(path))  # or the build's output dir
    if (path / "vocab.json").exists():
        return path
    if dataset_dir.rstrip("/") == build.DEMO_DIR or path.resolve() == epath.Path(build.DEMO_DIR).resolve():
        import jax

        if jax.process_index() == 0 and not build.is_complete(build.dataset_path(dataset_dir)):
            print(f"building the demo dataset in {dataset_dir} (first use, a few minutes)", flush=True)
        return epath.Path(build.ensure_dataset(dataset_dir))
    found = datasets_below(path) if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise UserError(f"config.data.dataset_dir={dataset_dir}: holds {len(found)} datasets "
                        f"({', '.join(map(str, found))}); give one of them")
    raise UserError(
        f"config.data.dataset_dir={dataset_dir}: no dataset there (build one with python -m data_prep.build)"
    )


def datasets_below(path: epath.Path) -> list[epath.Path]:
    """Datasets one or two folders below `path`: a build's output dir holds mgpt_events/1.0.0.

    Listed level by level (etils cannot glob `**` on every filesystem); a build's hidden
    work folders and a dataset being swapped out (*.replaced) are not datasets.
    """
    def subdirs(folder):
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and not p.name.endswith(".replaced"))

    def is_dataset(folder):
        return (folder / "vocab.json").exists() and (folder / "dataset_info.json").exists()

    found = []
    for child in subdirs(path):
        if is_dataset(child):
            found.append(child)
        else:
            found.extend(grandchild for grandchild in subdirs(child) if is_dataset(grandchild))
    return found


def choose_vocab(dataset_path: epath.Path, workdir: epath.Path, init_from: str) -> Vocabulary:
    """The run's vocabulary: the resumed run's, else the warm start's, else the dataset's.

    A warm start keeps its own vocabulary (so its embedding rows keep their meaning);
    the dataset's event layout must match it, while its style labels may differ
    (labels the checkpoint doesn't know are conditioned on STYLE:unknown).
    """
    from mgpt.train import checkpoint as ckpt_lib

    run_vocab_path = workdir / "vocab.json"
    try:  # a damaged or hand-edited vocab.json is a one-line error naming the file
        dataset_vocab = Vocabulary.load(dataset_path)
        run_vocab = None
        if run_vocab_path.exists():
            text = run_vocab_path.read_text()
            try:
                data = json.loads(text)
            except ValueError as e:
                raise ValueError(f"{run_vocab_path}: not valid JSON ({e})") from None
            run_vocab = Vocabulary.from_json(data, origin=str(run_vocab_path))
    except ValueError as e:
        raise UserError(f"{e}; rebuild it or restore the original") from None
    if run_vocab is not None:
        return _same_events(run_vocab, dataset_vocab, dataset_path, f"the run in {workdir}")
    if init_from:
        try:
            root, step = ckpt_lib.locate(init_from)
        except OSError:  # missing, or a file (NotADirectoryError)
            raise UserError(f"config.init_from={init_from}: no checkpoints there (give a run's workdir)") from None
        try:
            vocab = Vocabulary.from_json(ckpt_lib.read_json_item(root, step, "vocab"), origin=f"{init_from} vocab")
        except (OSError, ValueError) as e:
            why = f"no vocab item ({e.strerror})" if isinstance(e, OSError) else f"its vocab item is damaged ({e})"
            raise UserError(f"config.init_from={init_from}: checkpoint step {step} has {why}; "
                            "give a complete run's workdir") from None
        return _same_events(vocab, dataset_vocab, dataset_path, f"config.init_from={init_from}")
    return dataset_vocab


def with_controls(vocab: Vocabulary, dataset_path, data_config, resumed: bool, log=print) -> Vocabulary:
    """The run's vocabulary with control tokens when config.data.control_seconds > 0: levels fitted on
    the training split (data_prep.controls.fit) for a new run; a resumed or warm-started one keeps its own."""
    seconds = float(data_config.get("control_seconds", 0.0) or 0.0)
    if vocab.controls is not None:
        if seconds and seconds != vocab.controls["seconds"]:
            raise UserError(f"config.data.control_seconds={seconds:g}: the run's vocabulary has "
                            f"{vocab.controls['seconds']:g} s segments; resume with that, or start a new run")
        return vocab
    if not seconds:
        return vocab
    if resumed:
        raise UserError("config.data.control_seconds: the resumed or warm-started model's vocabulary has no control "
                        "tokens; start a new run (or set data.control_seconds=0)")
    source = open_source(dataset_path, "train", training_only=True)
    levels = int(data_config.get("control_levels", controls_lib.DEFAULT_LEVELS))
    spec = controls_lib.fit((vocab.decode_notes(source[i]["tokens"]) for i in range(len(source))), seconds, levels,
                           styles=(vocab.style_name(record_text(source[i]["style"])) for i in range(len(source))))
    log(f"controls: {levels} levels per control over {seconds:g} s segments, fitted on {len(source)} training pieces")
    return vocab.with_controls(spec)


def style_level_counts(vocab: Vocabulary, dataset_path) -> dict:
    """The control spec's 'by_style' (`data_prep.controls.style_counts`) of the training split at
    `dataset_path`, under `vocab`'s own control levels: for a model trained before `fit` stored it."""
    source = open_source(dataset_path, "train", training_only=True)
    levels, labels = [np.zeros((0, len(controls_lib.ATTRIBUTES)), np.int64)], []
    for i in range(len(source)):
        notes = vocab.decode_notes(source[i]["tokens"])
        if len(notes.pitch):
            levels.append(controls_lib.segment_levels(notes, vocab.controls))
            labels += [vocab.style_name(record_text(source[i]["style"]))] * len(levels[-1])
    return controls_lib.style_counts(np.concatenate(levels), labels, vocab.controls["levels"])


def check_same_events(vocab: Vocabulary, dataset_path, owner: str, field: str = "config.data.dataset_dir") -> None:
    """A UserError naming `field` unless every event id of `vocab` (a model's, `owner`'s)
    means the same in the dataset at `dataset_path`; style labels may differ."""
    try:
        dataset_vocab = Vocabulary.load(dataset_path)
    except ValueError as e:
        raise UserError(f"{e}; rebuild it or restore the original") from None
    _same_events(vocab, dataset_vocab, dataset_path, owner, field)


def _same_events(vocab: Vocabulary, dataset_vocab: Vocabulary, dataset_path, owner: str,
                 field: str = "config.data.dataset_dir") -> Vocabulary:
    """`vocab` if every event id means the same in the dataset; style labels may differ."""
    settings = lambda v: {k: x for k, x in v.to_json().items() if k not in ("tokens", "controls")}
    ours, theirs = settings(vocab), settings(dataset_vocab)
    differ = [f"{k}={theirs.get(k)!r} there, {ours.get(k)!r} in {owner}" for k in sorted(set(ours) | set(theirs))
              if ours.get(k) != theirs.get(k)]
    if not differ and vocab.tokens[:vocab.style_offset] != dataset_vocab.tokens[:dataset_vocab.style_offset]:
        differ = ["its event tokens differ"]
    if differ:
        raise UserError(
            f"{field}={dataset_path}: its event vocabulary differs ({'; '.join(differ)}); "
            "use a dataset built with the same settings"
        )
    return vocab



def validation_source(dataset_path: epath.Path, dataset_dir: str, process_count: int, log=print):
    """The validation split the trainer evaluates on, or None when the dataset has none (said by `log`).

    Each host evaluates its own pieces: a split with fewer pieces than hosts is a UserError
    now, at start-up, not at the first evaluation hours in."""
    try:
        source = open_source(dataset_path, "validation", training_only=True)
    except FileNotFoundError as e:
        log(f"{e}: training without validation")
        return None
    if len(source) < process_count:
        raise UserError(
            f"config.data.dataset_dir={dataset_dir}: the validation split has {len(source)} pieces, fewer "
            f"than the {process_count} hosts, and each host evaluates its own pieces; rebuild the dataset with a "
            "larger validation share (python -m data_prep.build --splits=TRAIN,VALIDATION,TEST)"
        )
    return source

class _TrainingRecords:
    """A TFDS raw-bytes source -> {'tokens': int32[n], 'style': bytes} records (picklable for workers)."""

    def __init__(self, raw: Sequence[bytes]):
        self._raw = raw

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, i: int) -> dict:
        from tensorflow_datasets.core.example_parser import tf_example_pb2

        feature = tf_example_pb2.Example.FromString(self._raw[i]).features.feature
        return {"tokens": np.asarray(feature["tokens"].int64_list.value, np.int32),
                "style": feature["style"].bytes_list.value[0]}


@dataclasses.dataclass(frozen=True)
class _Segments:
    """Shared piece -> segment logic for the train (random) and eval (exhaustive) paths."""

    vocab: Vocabulary
    seq_len: int

    def __post_init__(self):
        if self.seq_len < 2:  # room for STYLE, a carried token and at least one event
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")

    def body(self, record: dict, semitones: int = 0, rng: np.random.Generator | None = None,
             control_dropout: float = 0.0) -> tuple[int, np.ndarray]:
        ids = np.asarray(record["tokens"], np.int32)
        if semitones:
            ids = self.vocab.transpose(ids, semitones)
        if self.vocab.controls is not None:  # computed on the notes as transposed: what the model sees
            ids = controls_lib.insert(self.vocab, ids, dropout=control_dropout, rng=rng)
        body = np.concatenate([ids, np.asarray([self.vocab.eos_id], np.int32)])
        return self.vocab.style_id(record_text(record["style"])), body

    def carried(self, body: np.ndarray, start: int) -> list[int]:
        """The carried context of a segment opening at body[start] (`Vocabulary.carried_state`),
        at most half a row: a pathological chord never crowds the events out."""
        return self.vocab.carried_state(body, start, limit=self.seq_len // 2)

    def segment(self, style: int, body: np.ndarray, start: int, predict_carried: bool, end: int | None = None) -> dict:
        """STYLE, the carried state, then body[start:end]: seq_len + 1 tokens at most.

        Of the carried tokens only the leading VELOCITY may be a target (`predict_carried`,
        in training): it teaches the model to set a loudness when a piece opens. The carried
        NOTE_ONs are always given. They are not events of the piece at this point but a
        summary of what sounds, and the sampler always writes them itself; predicting them
        would teach the model to open pieces on chords struck before time began.
        """
        carried = self.carried(body, start)
        stop = start + self.seq_len - len(carried)
        piece = body[start : stop if end is None else min(stop, end)]
        target = np.zeros(len(carried), np.int32)
        lead = int(np.sum(self.vocab.is_control(carried)))  # the controls in force come first, given
        if predict_carried and len(carried) > lead and self.vocab.is_velocity(carried[lead]):
            target[lead] = 1
        return {
            "tokens": np.concatenate([np.asarray([style] + carried, np.int32), piece]),
            "loss": np.concatenate([[0], target, (~self.vocab.is_control(piece)).astype(np.int32)]).astype(np.int32),
        }

    def fim_segment(self, style: int, body: np.ndarray, start: int, end: int, rng: np.random.Generator) -> dict | None:
        """The crop body[start:end] as a FIM row (mgpt/sample/fim.py), cut at two time boundaries drawn
        uniformly among those inside it; None when it has fewer than two or the row cannot fit.

        The crop is the plain segment's (same start, same end), so FIM rows see the same
        stretches of the pieces as plain ones; the suffix is shortened to fit the markers.
        """
        plain_end = start + self.seq_len - len(self.carried(body, start))
        end = min(end, plain_end)
        cuts = fim_lib.time_cuts(self.vocab, body, start + 1, end - 1)
        if len(cuts) < 2:
            return None
        i, j = np.sort(rng.choice(cuts, size=2, replace=False))
        row = fim_lib.training_row(self.vocab, style, body, start, end, int(i), int(j), self.carried, self.seq_len)
        if row is not None and self.vocab.controls is not None:  # control tokens are given, never targets
            row["loss"] = np.where(self.vocab.is_control(row["tokens"]), 0, row["loss"]).astype(np.int32)
        return row

    def consecutive(self, style: int, body: np.ndarray) -> list[dict]:
        """Segments covering every token of body exactly once, in order."""
        out, start = [], 0
        while start < len(body):
            carried = len(self.carried(body, start))
            out.append(self.segment(style, body, start, predict_carried=False))
            start += len(out[-1]["tokens"]) - 1 - carried  # the body tokens it holds
        return out

    def random_span(self, body: np.ndarray, rng: np.random.Generator, chunk: int = 0,
                    num_chunks: int = 1) -> tuple[int, int]:
        """(start, end) of a crop whose row ends at a uniformly drawn position `end` of body.

        Drawing the end rather than the start keeps every event, the last ones and EOS
        included, equally likely to be a target whatever the carried state's length.
        `chunk` of `num_chunks` (a long piece's (piece, chunk) items) draws the end in the
        chunk-th of num_chunks equal stretches of the possible ends, so that one epoch's
        crops of a piece spread over all of it.
        """
        room = self.seq_len  # one slot of the seq_len + 1 row is the style token
        if len(body) <= room:
            return 0, len(body)
        ends = len(body) - room + 1  # the possible ends: room .. len(body)
        low = chunk * ends // num_chunks
        end = room + int(rng.integers(low, max((chunk + 1) * ends // num_chunks, low + 1)))
        start = end - room
        while start > 0:  # the carried length depends on the start; the start only moves later
            need = min(end - 1, end - room + len(self.carried(body, start)))
            if need <= start:
                break
            start = need
        return start, end


def piece_segments(tokens: np.ndarray, style: str, vocab: Vocabulary, seq_len: int) -> list[dict]:
    """The evaluation cut of one piece: {'tokens', 'loss'} segments of at most seq_len + 1
    tokens, each STYLE (+ the carried state) then the next events; `loss` marks the tokens
    to predict, which cover the piece's events and EOS exactly once."""
    segments = _Segments(vocab, seq_len)
    style_id, body = segments.body({"tokens": tokens, "style": style})
    return segments.consecutive(style_id, body)


class _RandomSegment(grain.transforms.RandomMap):
    """record -> one segment of at most seq_len + 1 tokens (random transpose, crop, style dropout)."""

    def __init__(self, segments: _Segments, transpose: int, style_dropout: float = 0.0, fim_rate: float = 0.0,
                 control_dropout: float = 0.0):
        self._segments = segments
        self._transpose = transpose
        self._style_dropout = style_dropout
        self._fim_rate = fim_rate
        self._control_dropout = control_dropout

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        semitones = int(rng.integers(-self._transpose, self._transpose + 1)) if self._transpose else 0
        style, body = self._segments.body(record, semitones, rng, self._control_dropout)
        # Chunk j of a piece's c (see _ChunkSource) crops in the j-th c-th of the piece.
        start, end = self._segments.random_span(body, rng, int(record.get("chunk", 0)),
                                                int(record.get("num_chunks", 1)))
        # Drawn last and only when on: with 0 the rng stream, hence every row, is unchanged.
        if self._style_dropout and rng.random() < self._style_dropout:
            style = self._segments.vocab.unknown_style_id
        if self._fim_rate and rng.random() < self._fim_rate:
            row = self._segments.fim_segment(style, body, start, end, rng)
            if row is not None:
                return row
        return self._segments.segment(style, body, start, predict_carried=True, end=end)


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
    ).map(functools.partial(_select, keep=keep))  # a named function: worker processes pickle it


def _select(x: dict, keep: tuple[str, ...]) -> dict:
    return {k: x[k] for k in keep}


def _host_slice(source: Sequence[dict], process_index: int, process_count: int) -> grain.MapDataset:
    ds = grain.MapDataset.source(source)
    if process_count > 1:
        if len(ds) < process_count:
            raise ValueError(f"split has {len(ds)} pieces, fewer than the {process_count} hosts")
        ds = ds[process_index::process_count]
    return ds


def piece_lengths(source: Sequence[dict]) -> np.ndarray:
    """Events per piece of a split (one pass over the records at start-up)."""
    return np.asarray([len(source[i]["tokens"]) for i in range(len(source))], np.int64)


class _ChunkSource:
    """(piece, chunk) items: a piece of n events gives ceil((n + 1) / seq_len) items, each a
    crop of its own stretch of the piece. Long pieces are thus trained in proportion to their
    length, not once per epoch like a 50-event folk tune."""

    def __init__(self, source: Sequence[dict], lengths: np.ndarray, seq_len: int):
        self._source = source
        chunks_P = np.maximum(1, -(-(lengths + 1) // seq_len))  # + 1: the EOS
        self._piece_I = np.repeat(np.arange(len(lengths)), chunks_P)
        self._chunk_I = np.concatenate([np.arange(c) for c in chunks_P]) if len(chunks_P) else np.zeros(0, int)
        self._chunks_I = np.repeat(chunks_P, chunks_P)

    def __len__(self) -> int:
        return len(self._piece_I)

    def __getitem__(self, i: int) -> dict:
        record = dict(self._source[int(self._piece_I[i])])
        record["chunk"], record["num_chunks"] = int(self._chunk_I[i]), int(self._chunks_I[i])
        return record


def _shard_seeds(seed: int, shard: int) -> list[int]:
    """Seeds of the shuffle, the crops/transpositions and the packer of one data shard.

    grain seeds each by (seed, index within the shard); folding the shard in keeps every
    host's k-th piece from getting the same transposition and crop."""
    return [int(x) for x in np.random.SeedSequence([seed, shard]).generate_state(3)]


class _ShardedBatches(grain.IterDataset):
    """Concatenates, row-wise, one batch of each data shard this host owns."""

    def __init__(self, shards: dict[int, grain.IterDataset], num_shards: int):
        super().__init__(list(shards.values()))
        self.shard_ids = list(shards)
        self.num_shards = num_shards

    def __iter__(self):
        return _ShardedBatchesIterator(self)


class _ShardedBatchesIterator(grain.DatasetIterator):
    """State: {'num_shards': K, 'shards': {str(shard): that shard's grain state}}.

    The union of the hosts' states describes the whole run's data position, whatever the
    host count, so a run resumed on other hosts hands each one the shards it now owns."""

    def __init__(self, ds: _ShardedBatches):
        super().__init__([iter(p) for p in ds.parents])
        self._ids, self._num_shards = ds.shard_ids, ds.num_shards

    def __next__(self) -> dict:
        batches = [next(it) for it in self._parents]
        if len(batches) == 1:
            return batches[0]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self) -> dict:
        return {"num_shards": self._num_shards,
                "shards": {str(i): it.get_state() for i, it in zip(self._ids, self._parents)}}

    def set_state(self, state: dict) -> None:
        saved = state.get("num_shards")
        missing = [i for i in self._ids if str(i) not in state.get("shards", {})]
        if saved != self._num_shards or missing:
            raise ValueError(f"the saved data position is for {saved} data shards, this pipeline has "
                             f"{self._num_shards} (missing shards {missing})")
        for i, it in zip(self._ids, self._parents):
            it.set_state(state["shards"][str(i)])

    def close(self) -> None:
        for it in self._parents:
            if hasattr(it, "close"):
                it.close()


def init_worker(worker_index: int, worker_count: int) -> None:
    """Runs first in each grain worker process.

    Ctrl-C reaches the whole process group, and the trainer handles it (it saves, then
    stops its workers): a worker that took it too printed its own traceback. A worker
    whose trainer is gone (kill -9, the OOM killer) would live on, with multiprocessing's
    resource tracker, holding memory: it watches its parent and exits when that changes.
    (A parent-death signal would fire when the parent's thread that started the worker
    ends, and grain starts them from a prefetch thread.)"""
    import signal
    import threading
    import time

    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="mgpt-parent-watch", daemon=True).start()
    if parent == 1:  # already orphaned before the watch began
        os._exit(1)


def train_dataset(
    source: Sequence[dict],
    vocab: Vocabulary,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    transpose: int = 0,
    style_dropout: float = 0.0,
    fim_rate: float = 0.0,
    control_dropout: float = 0.0,
    num_packing_bins: int = 64,
    read_threads: int = 1,
    prefetch: int = 2,
    workers: int = 0,
    num_shards: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    lengths: np.ndarray | None = None,
) -> grain.IterDataset:
    """Endless shuffled training batches for this host.

    The run's data is cut into `num_shards` independent streams (0 = one per process), each
    with its own slice of the (piece, chunk) items, seeds and packer, and every global batch
    takes batch_size_global / num_shards rows from each, shard-major. Host i of n owns shards
    [i K/n, (i + 1) K/n), so the global batches, and a checkpoint's data position, do not
    depend on the host count: a run resumed on other hosts replays and skips nothing.

    `batch_size` is this host's share of the global batch. `workers` > 0 runs each shard's
    pipeline in that many grain worker processes (a different, still deterministic order).
    `lengths` (events per piece) is read from the source when not given. Iterate with
    `iter(ds)`; the iterator's state is checkpointable. Each element: inputs/targets/
    positions/segment_ids int32[B, seq_len], mask float32[B, seq_len].
    `style_dropout`: the share of segments conditioned on STYLE:unknown instead of their
    piece's style (see the module docstring). `fim_rate`: the share of segments rearranged for
    fill-in-the-middle; the vocabulary must then have the FIM tokens (`Vocabulary.with_fim`).
    `control_dropout`: with a vocabulary `with_controls()`, the chance each control token is left out.
    """
    if not 0 <= style_dropout < 1:
        raise ValueError(f"style_dropout must be in [0, 1), got {style_dropout}")
    if not 0 <= fim_rate <= 1:
        raise ValueError(f"fim_rate must be in [0, 1], got {fim_rate}")
    if fim_rate and not vocab.fim:
        raise ValueError("fim_rate > 0 needs a vocabulary with the FIM tokens (Vocabulary.with_fim())")
    if not 0 <= control_dropout <= 1:
        raise ValueError(f"control_dropout must be in [0, 1], got {control_dropout}")
    if len(source) == 0:
        raise ValueError("the training split is empty")
    num_shards = num_shards or process_count
    if num_shards % process_count:
        raise ValueError(f"the data is cut into {num_shards} shards, which {process_count} hosts cannot share "
                         "evenly; use a host count that divides it")
    own = num_shards // process_count
    if batch_size % own:
        raise ValueError(f"this host's {batch_size} rows per batch do not split over its {own} data shards")
    items = _ChunkSource(source, piece_lengths(source) if lengths is None else lengths, seq_len)
    if len(items) < num_shards:
        raise ValueError(f"the training split has {len(items)} pieces, fewer than the {num_shards} data shards")
    rows = batch_size // own
    if workers > 0:
        from absl import flags

        # grain's worker processes read its absl flags; outside an absl app (tests,
        # notebooks, benchmarks) nobody has parsed them, and the defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    shards = {}
    for shard in range(process_index * own, (process_index + 1) * own):
        shuffle_seed, crop_seed, pack_seed = _shard_seeds(seed, shard)
        ds = grain.MapDataset.source(items)[shard::num_shards].shuffle(seed=shuffle_seed).repeat()
        ds = ds.random_map(_RandomSegment(_Segments(vocab, seq_len), transpose, style_dropout, fim_rate,
                                          control_dropout), seed=crop_seed)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * rows))
        ds = _pack(ds, seq_len, num_packing_bins, pack_seed, shuffle=True)
        ds = ds.batch(rows, drop_remainder=True).map(_to_model_batch)
        if workers > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=init_worker)
        shards[shard] = ds
    ds = _ShardedBatches(shards, num_shards)
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
