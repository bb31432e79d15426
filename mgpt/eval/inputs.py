"""What every evaluation section reads: real pieces, generated pieces, models, options.

Also `jsonable`, which every section's dict goes through before it is written as JSON.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from data_prep import notes as notes_lib
from data_prep.notes import Notes
from data_prep.vocab import UNKNOWN_STYLE, Vocabulary, normalize_label
from mgpt.errors import UserError


@dataclasses.dataclass
class Piece:
    """One real piece: its event ids (no STYLE/EOS) and labels ('' = none)."""

    tokens: np.ndarray
    style: str = ""
    composer: str = ""
    piece_id: str = ""

    @property
    def style_name(self) -> str:
        return normalize_label(self.style) if self.style else UNKNOWN_STYLE


def check_same_events(vocab: Vocabulary, dataset_dir, owner: str, field: str) -> None:
    """A UserError naming `field` when the dataset's ids mean other events than `vocab`'s."""
    from mgpt.train import data as data_lib

    data_lib.check_same_events(vocab, dataset_dir, owner, field)


def load_split(dataset_dir: str | os.PathLike, split: str) -> list[Piece]:
    """Every piece of one split of a data_prep dataset."""
    from mgpt.train import data as data_lib

    source = data_lib.open_source(dataset_dir, split)
    pieces = []
    for i in range(len(source)):
        r = source[i]
        text = data_lib.record_text
        pieces.append(Piece(np.asarray(r["tokens"], np.int32), text(r["style"]), text(r["composer"]), text(r["piece_id"])))
    return pieces


def window_crop(notes: Notes, seconds: float, rng: np.random.Generator) -> Notes:
    """`seconds` of notes from a random offset, shifted to start at 0."""
    pitch, velocity, start_s, end_s = notes
    span = float(end_s.max()) if len(end_s) else 0.0
    if span <= seconds:
        return notes
    t0 = float(rng.uniform(0, span - seconds))
    keep = (start_s >= t0) & (start_s < t0 + seconds)
    return Notes(pitch[keep], velocity[keep], start_s[keep] - t0, np.minimum(end_s[keep], t0 + seconds) - t0)


@dataclasses.dataclass
class Generated:
    """One generated piece read back from its MIDI file."""

    file: str
    style: str  # the style it was conditioned on ('unconditional' if none)
    notes: Notes
    valid: bool
    seconds: float


def valid(generated: Sequence[Generated]) -> list[Generated]:
    """The generated pieces that parsed and have notes: the ones the musical sections judge."""
    return [g for g in generated if g.valid]


def read_generated(generated_dir: str | os.PathLike, vocab: Vocabulary) -> list[Generated]:
    """Pieces listed in generated_dir's manifest(s), read from their .mid files.

    Notes go through the vocabulary (encode, then decode_notes), so generated and
    real pieces are quantised identically. A file that does not parse or has no
    notes counts as invalid.
    """
    import note_seq

    from mgpt import render

    generated_dir = pathlib.Path(generated_dir)
    entries = render.read_all_manifests(generated_dir)
    if not entries:
        raise UserError(f"--generated_dir={generated_dir}: no manifest.jsonl with pieces there")
    out = []
    for e in entries:
        path = generated_dir / e["file"]
        try:
            ns = note_seq.midi_file_to_note_sequence(str(path))
            notes = vocab.decode_notes(vocab.encode(ns))
            valid = len(notes) > 0
        except Exception:  # any parse failure means the same thing here: an invalid file
            notes, valid = notes_lib.empty(), False
        out.append(Generated(e["file"], str(e.get("style", "unconditional")), notes, valid, notes.seconds))
    return out


@dataclasses.dataclass
class Options:
    ngram_order: int = 5
    crop_seconds: float = 30.0  # features/classifier compare every piece's first crop_seconds
    copy_threshold_s: float = 8.0
    ngram_sizes: tuple[int, ...] = (8, 16)
    max_train_notes: int = 2_000_000  # originality index: training pieces are subsampled beyond this
    max_feature_pieces: int = 1000  # train pieces in the feature ceiling (subsampled beyond this)
    batch_size: int = 16
    seed: int = 0


@dataclasses.dataclass
class Model:
    """A model to score: `model(tokens_BxL) -> logits_BxLxV`, with its training facts."""

    name: str
    model: object
    vocab: Vocabulary  # its own: style ids may differ between runs, event ids may not
    seq_len: int
    params: int
    tokens_seen: int | None = None
    step: int | None = None
    workdir: str = ""


def training_tokens(config, step: int) -> int:
    """Tokens (rows x seq_len) a run's optimizer has seen by `step`."""
    return int(step) * int(config.train.batch_size) * int(config.data.seq_len)


def model_from_run(name: str, workdir: str) -> tuple[Model, Vocabulary, object]:
    """(Model, its vocabulary, its config) of a trained run's latest checkpoint."""
    from mgpt.model import kinds as models
    from mgpt.train.checkpoint import restore_model

    model, vocab, config, step = restore_model(workdir)
    params = models.model_config(config.model, vocab.size).num_params()
    return Model(name, model, vocab, int(config.data.seq_len), params, training_tokens(config, step),
                 step, str(workdir)), vocab, config


def resolve_dataset(dataset_dir: str) -> pathlib.Path:
    """The dataset folder a run or --dataset_dir names (built on demand, as the trainer does)."""
    from mgpt.train import data as data_lib

    try:
        return pathlib.Path(str(data_lib.resolve_dataset(dataset_dir)))
    except UserError as e:  # it names config.data.dataset_dir: say which flag gave it
        raise UserError(f"--dataset_dir: {e}") from None


def jsonable(x):
    """numpy scalars/arrays -> Python; NaN/inf -> None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
