"""Where pieces come from: `--source=KIND:ARG` specs -> work items -> notes.

A source spec lists its pieces cheaply (`list_items`, no parsing), then each piece is
loaded on its own (`load`), usually in a worker process. Every piece has a stable id,
the path of its file relative to the source root, its labels (style, composer) and a
split key: pieces with the same key always land in the same split.

    midi_dir:PATH    every *.mid / *.midi below PATH (any case), no labels.
    maestro:PATH     MAESTRO: its metadata csv/json (PATH is the folder or the file).
                     MAESTRO's own split; style and composer from canonical_composer.
    asap:PATH        ASAP: metadata.csv, the performances, labelled with the composer;
                     all performances of one score share a split.
    music21:NAMES    the corpus inside the music21 wheel (no download). NAMES is a comma
                     list of collections, each optionally limited: `bach:100,palestrina`.
                     See MUSIC21_COLLECTIONS; any other corpus folder works too.

Scores (music21) are converted music21 -> MIDI -> the same MIDI reader as every other
source. music21's MIDI writer is its own statement of how a score sounds (ties,
tempo marks, chords, voices, grace notes, and it expands repeats as a performance
plays them). Scores carry no dynamics, so every note gets SCORE_VELOCITY.
ABC tunebooks hold many tunes per file: each tune is its own piece, `FILE#N` (N counts
tunes from 1 in file order).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import unicodedata
import warnings

from data_prep import midi
from data_prep.notes import Notes
from data_prep.vocab import normalize_label
from mgpt.errors import UserError

SOURCE_KINDS = ("midi_dir", "maestro", "asap", "music21")
SPLITS = ("train", "validation", "test")
SCORE_VELOCITY = 80  # mezzo-forte: scores have no dynamics and must still render audibly.
_SPEC_HELP = "expected midi_dir:PATH, maestro:PATH, asap:PATH or music21:NAMES"


@dataclasses.dataclass(frozen=True)
class Item:
    """One piece to convert. Small and picklable: it travels to worker processes."""

    source: str  # one of SOURCE_KINDS
    root: str  # source root folder
    path: str  # file path relative to root, '/'-separated
    piece_id: str  # stable and unique within the source
    split_key: str  # pieces with equal keys share a split
    style: str = ""  # normalized label, '' if none
    composer: str = ""
    split: str = ""  # the source's own split, '' if it has none
    tune: int = 0  # 1-based tune number inside a multi-tune ABC file, 0 for a whole file
    unreadable: str = ""  # why this listed path (a folder that could not be listed) gives no piece


@dataclasses.dataclass(frozen=True)
class Collection:
    """A named part of the music21 corpus."""

    globs: tuple[str, ...]  # relative to the corpus folder
    style: str
    composer: str = ""
    exclude: str = ""  # regex on the file name
    tune_filter: str = ""  # regex an ABC tune's text must match
    split_key: str = ""  # regex on the file name; group 1 groups variants of one piece


MUSIC21_COLLECTIONS: dict[str, Collection] = {
    # ~400 chorale harmonisations; variants of one chorale (bwv248.64-s, -6) share a split.
    "bach": Collection(("bach/*.mxl", "bach/*.xml"), "bach", "Johann Sebastian Bach", split_key=r"^(bwv\d+(?:\.\d+)?)"),
    "palestrina": Collection(("palestrina/*.krn",), "palestrina", "Giovanni Pierluigi da Palestrina"),
    "monteverdi": Collection(("monteverdi/*.mxl",), "monteverdi", "Claudio Monteverdi", exclude=r"_old\."),
    "trecento": Collection(("trecento/*.xml", "trecento/*.mxl"), "trecento"),
    "ryansmammoth": Collection(("ryansMammoth/*.abc",), "folk_british_irish"),
    "oneills1850": Collection(("oneills1850/*.abc",), "folk_british_irish"),
    # Essen holds songs from many places (China, Luxembourg...): keep those from Germany.
    "essenfolksong": Collection(
        ("essenFolksong/*.abc",), "folk_german", exclude=r"^test", tune_filter=r"(?m)^O:.*Deutschland"
    ),
}
_SCORE_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn", ".abc", ".mid", ".midi")


def split_spec(spec: str) -> tuple[str, str]:
    """'maestro:/data/maestro' -> ('maestro', '/data/maestro'); a UserError names the spec."""
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in SOURCE_KINDS or not arg:
        raise UserError(f"--source={spec}: {_SPEC_HELP}")
    return kind, arg


def list_items(spec: str) -> list[Item]:
    """All pieces of one source spec, in a stable order. ValueError names the spec."""
    kind, arg = split_spec(spec)
    lister = {"midi_dir": _list_midi_dir, "maestro": _list_maestro, "asap": _list_asap}.get(kind)
    if lister is None:
        return _list_music21(spec, arg)
    root = os.path.abspath(os.path.expanduser(arg))
    if not os.path.exists(root):
        raise UserError(f"--source={spec}: {root} does not exist")
    return lister(spec, root)


def load(item: Item, **read_opts) -> tuple[Notes, str]:
    """An item's notes and composer (from the file's metadata when the item has none).

    Raises midi.SkipPiece with the reason when the piece cannot be used.
    """
    if item.unreadable:
        raise midi.SkipPiece(item.unreadable)
    full = os.path.join(item.root, item.path)
    if item.source != "music21" or full.lower().endswith((".mid", ".midi")):
        limit = read_opts.get("max_file_bytes", midi.MAX_FILE_BYTES)
        try:
            with open(full, "rb") as f:
                size = os.fstat(f.fileno()).st_size  # the real size: only limit + 1 bytes are read
                if size > limit:
                    raise midi.SkipPiece(midi.too_large(size, limit))
                data = f.read(limit + 1)
        except OSError as e:
            raise midi.SkipPiece(f"cannot read: {e.strerror or e}") from None
        notes = midi.read_midi(data, **read_opts)
        if item.source == "music21":
            notes = notes.with_velocity(SCORE_VELOCITY)
        return notes, item.composer
    return _load_score(item, **read_opts)


def assign_split(item: Item, percents: tuple[float, float, float] = (90, 5, 5)) -> str:
    """The item's split: the source's own, else a stable hash of its split key."""
    if item.split:
        return item.split
    digest = hashlib.sha256(f"{item.source}:{item.split_key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64 * sum(percents)
    if u < percents[0]:
        return "train"
    return "validation" if u < percents[0] + percents[1] else "test"


def style_label(text: str) -> str:
    """'Frédéric Chopin' -> 'frederic_chopin' (accents folded before normalize_label)."""
    if not text or not text.strip():
        return ""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return normalize_label(ascii_text)


# ----------------------------------------------------------------------------- midi_dir
def _list_midi_dir(spec: str, root: str) -> list[Item]:
    if not os.path.isdir(root):
        raise UserError(f"--source={spec}: {root} is not a folder")
    items, unreadable = [], []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable.append):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith((".mid", ".midi")):
                rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                items.append(Item("midi_dir", root, rel, rel, rel))
    # A folder os.walk cannot list is an input too: it goes to skipped.jsonl with the reason,
    # so that every input is accounted for.
    for error in unreadable:
        rel = os.path.relpath(error.filename, root).replace(os.sep, "/") + "/"
        items.append(Item("midi_dir", root, rel, rel, rel, unreadable=f"cannot read folder: {error.strerror or error}"))
    return items


# ----------------------------------------------------------------------------- maestro
def _list_maestro(spec: str, root: str) -> list[Item]:
    if os.path.isfile(root):
        meta, root = root, os.path.dirname(root)
    else:
        found = sorted(glob.glob(os.path.join(root, "maestro-v*.csv"))) or sorted(
            glob.glob(os.path.join(root, "maestro-v*.json"))
        )
        if not found:
            raise UserError(f"--source={spec}: no maestro-v*.csv or maestro-v*.json in {root}")
        meta = found[-1]  # the newest version when several are present
    rows = _read_metadata(spec, meta)
    items = []
    for row in rows:
        rel, split = row.get("midi_filename"), row.get("split")
        if not rel or split not in SPLITS:
            raise UserError(f"--source={spec}: {meta} needs midi_filename and split (train/validation/test)")
        composer = row.get("canonical_composer") or ""
        items.append(Item("maestro", root, rel, rel, rel, style_label(composer), composer, split=split))
    return items


def _read_table(path: str) -> list[dict]:
    """A csv, or MAESTRO's json (v3: column -> {row: value}; v1/v2: a list of rows)."""
    with open(path, encoding="utf-8") as f:
        if path.lower().endswith(".csv"):
            return list(csv.DictReader(f))
        data = json.load(f)
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        columns = {k: v for k, v in data.items() if isinstance(v, dict)}
        keys = sorted(next(iter(columns.values()), {}), key=lambda k: int(k) if k.isdigit() else k)
        return [{c: columns[c].get(k) for c in columns} for k in keys]
    raise ValueError("expected a list of rows or a mapping of columns")


# ----------------------------------------------------------------------------- asap
def _read_metadata(spec: str, meta: str) -> list[dict]:
    try:
        return _read_table(meta)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--source={spec}: cannot read {meta}: {e}") from None


def _list_asap(spec: str, root: str) -> list[Item]:
    meta = os.path.join(root, "metadata.csv")
    if not os.path.isfile(meta):
        raise UserError(f"--source={spec}: no metadata.csv in {root} (expected the ASAP layout)")
    rows = _read_metadata(spec, meta)
    items = []
    for row in rows:
        rel = row.get("midi_performance")
        if not rel:
            raise UserError(f"--source={spec}: {meta} has no midi_performance column")
        # All performances of one score share its folder: that is the split key.
        score = row.get("folder") or row.get("midi_score") or rel
        composer = row.get("composer") or ""
        items.append(Item("asap", root, rel, rel, score, style_label(composer), composer))
    return items


# ----------------------------------------------------------------------------- music21
def music21_root() -> str:
    import music21.corpus

    return os.path.dirname(os.path.abspath(music21.corpus.__file__))


def _list_music21(spec: str, arg: str) -> list[Item]:
    root = music21_root()
    items = []
    for entry in arg.split(","):
        name, _, limit = entry.strip().partition(":")
        collection = MUSIC21_COLLECTIONS.get(name.lower())
        if collection is None:
            folder = os.path.join(root, name)
            if not name or name.startswith(("_", ".")) or not os.path.isdir(folder):
                known = ", ".join(sorted(MUSIC21_COLLECTIONS))
                raise UserError(f"--source={spec}: unknown music21 collection {name!r} (known: {known})")
            collection = Collection((f"{name}/**/*",), style_label(name))
        try:
            limit_n = int(limit) if limit else None
        except ValueError:
            raise UserError(f"--source={spec}: {entry!r}: the limit after ':' must be a number") from None
        found = _collection_items(root, collection)
        items.extend(sample(found, limit_n) if limit_n is not None else found)
    return items


def _collection_items(root: str, c: Collection) -> list[Item]:
    paths = sorted({p for g in c.globs for p in glob.glob(os.path.join(root, g), recursive=True)})
    items = []
    for full in paths:
        name = os.path.basename(full)
        if not name.lower().endswith(_SCORE_SUFFIXES) or (c.exclude and re.search(c.exclude, name)):
            continue
        rel = os.path.relpath(full, root).replace(os.sep, "/")
        m = re.search(c.split_key, name) if c.split_key else None
        key = os.path.dirname(rel) + "/" + m.group(1) if m else rel
        if not name.lower().endswith(".abc"):
            items.append(Item("music21", root, rel, rel, key, c.style, c.composer))
            continue
        _, tunes = _abc_tunes(full)
        for n, tune in enumerate(tunes, start=1):
            if c.tune_filter and not re.search(c.tune_filter, tune):
                continue
            piece_id = rel if len(tunes) == 1 else f"{rel}#{n}"
            items.append(Item("music21", root, rel, piece_id, piece_id, c.style, c.composer, tune=n))
    return items


def sample(items: list[Item], n: int | None) -> list[Item]:
    """A stable pseudo-random subset of n items (by hashed id), kept in listing order."""
    if n is None or n >= len(items):
        return items
    rank = sorted(items, key=lambda it: hashlib.sha256(it.piece_id.encode()).digest())
    keep = {it.piece_id for it in rank[:n]}
    return [it for it in items if it.piece_id in keep]


@functools.lru_cache(maxsize=4)
def _abc_tunes(path: str) -> tuple[str, tuple[str, ...]]:
    """An ABC file -> (file header, tunes), each tune from its X: line on."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # older tunebooks; every byte decodes
    parts = re.split(r"(?m)^(?=X:)", text.replace("\r\n", "\n"))
    return parts[0], tuple(parts[1:])


def _load_score(item: Item, **read_opts) -> tuple[Notes, str]:
    from music21 import converter, stream

    full = os.path.join(item.root, item.path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # music21 warns freely about notation it tolerates
        try:
            if item.tune:
                header, tunes = _abc_tunes(full)
                if item.tune > len(tunes):
                    raise midi.SkipPiece(f"no tune {item.tune} in the file")
                score = converter.parse(header + tunes[item.tune - 1], format="abc")
            else:
                # forceSource: never read or write music21's pickle cache.
                score = converter.parse(full, forceSource=True)
            if isinstance(score, stream.Opus):
                score = score.scores[0] if score.scores else score
            composer = item.composer or (score.metadata.composer if score.metadata else "") or ""
            data = score_to_midi(score)
        except midi.SkipPiece:
            raise
        except Exception as e:  # music21 raises many kinds of errors on notation it cannot read
            raise midi.SkipPiece(f"music21 cannot convert: {midi.one_line(e)}") from None
    notes = midi.read_midi(data, **read_opts, trusted=True).with_velocity(SCORE_VELOCITY)
    return notes, composer


def score_to_midi(score) -> bytes:
    """music21's own MIDI rendering (it expands repeats first), with two repairs.

    When music21 gives up on a score (badly formed repeat marks; the same time or key
    signature object met twice after expanding repeats), try again on a repaired copy:
    repeats played as written if they cannot be expanded, shared marks copied.
    """
    from music21 import bar, key, meter, repeat, stream, tempo
    from music21.midi import translate

    try:
        return translate.streamToMidiFile(score).writestr()
    except Exception:  # noqa: BLE001 - retried below; a second failure is reported
        pass
    try:
        score = score.expandRepeats()
    except Exception:  # noqa: BLE001 - music21's ExpanderException and friends
        score = copy.deepcopy(score)
        for m in score.recurse().getElementsByClass(stream.Measure):
            if isinstance(m.leftBarline, bar.Repeat):
                m.leftBarline = None
            if isinstance(m.rightBarline, bar.Repeat):
                m.rightBarline = None
        for mark in list(score.recurse().getElementsByClass(repeat.RepeatExpression)):
            if mark.activeSite is not None:
                mark.activeSite.remove(mark)
    seen = set()
    for site in list(score.recurse(streamsOnly=True, includeSelf=True)):
        for mark in list(site.getElementsByClass((meter.TimeSignature, key.KeySignature, tempo.MetronomeMark))):
            if id(mark) in seen:
                site.replace(mark, copy.deepcopy(mark))
            seen.add(id(mark))
    return translate.streamToMidiFile(score).writestr()
