"""Dataset preparation: MIDI round trip, the fast reader, splits, junk, the TFDS dataset."""

import csv
import glob
import importlib.util
import json
import os
import subprocess
import sys

import note_seq
import numpy as np
import pytest

from data_prep import build, midi, sources, synthetic
from data_prep.vocab import Vocabulary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_TF = importlib.util.find_spec("tensorflow") is not None


def _write(folder, name, data):
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _records(path, split):
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(path))
    if split not in builder.info.splits:
        return []
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


@pytest.fixture(scope="module")
def midi_folder(tmp_path_factory):
    """40 small piano pieces in nested folders, with upper-case suffixes too."""
    folder = tmp_path_factory.mktemp("midi")
    for seed in range(40):
        name = f"set{seed % 3}/piece{seed}.{'MID' if seed % 5 == 0 else 'mid'}"
        _write(folder, name, synthetic.piano_midi(seed, num_notes=40))
    return str(folder)


@pytest.fixture(scope="module")
def midi_dataset(midi_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    return build.build_dataset([f"midi_dir:{midi_folder}"], out, num_workers=1, progress=False, verbose=False)


def test_the_same_files_give_the_same_records_in_the_same_order_wherever_they_lie(midi_folder, midi_dataset,
                                                                                 tmp_path):
    """Training reads records by index, so their order is part of the data: a copy of the input
    folder elsewhere (another checkout, another machine) must give the same dataset."""
    import shutil

    moved = shutil.copytree(midi_folder, tmp_path / "elsewhere" / "midi")
    other = build.build_dataset([f"midi_dir:{moved}"], tmp_path / "ds", num_workers=2, progress=False, verbose=False)
    for split in ("train", "test"):
        a, b = _records(midi_dataset, split), _records(other, split)
        assert [_text(r["piece_id"]) for r in a] == [_text(r["piece_id"]) for r in b] and len(a) > 1
        assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- MIDI
def test_round_trip_midi_ids_midi_keeps_every_note(tmp_path):
    vocab = Vocabulary()
    bin_size = vocab._velocity_bin_size
    for seed in range(6):
        data = synthetic.piano_midi(seed, num_notes=150)
        original = midi.read_midi(data, parser="note_seq")  # note-seq's notes, sustain applied
        ids = vocab.encode_notes(original.pitch, original.velocity, original.start_s, original.end_s)
        path = str(tmp_path / f"{seed}.mid")
        note_seq.sequence_proto_to_midi_file(vocab.decode(ids), path)
        back = note_seq.midi_file_to_note_sequence(path)

        a = np.lexsort((original.start_s, original.pitch))
        got = sorted(back.notes, key=lambda n: (n.pitch, n.start_time))
        assert len(got) == len(original)
        np.testing.assert_array_equal([n.pitch for n in got], original.pitch[a])
        assert np.abs(np.array([n.start_time for n in got]) - original.start_s[a]).max() <= 0.010
        assert np.abs(np.array([n.end_time for n in got]) - original.end_s[a]).max() <= 0.010
        assert np.abs(np.array([n.velocity for n in got]) - original.velocity[a]).max() < bin_size


def test_sustain_pedal_is_applied_before_encoding():
    data = synthetic.piano_midi(1, num_notes=100, sustain=True)
    with_pedal = midi.read_midi(data)
    dry = note_seq.midi_to_note_sequence(data)
    dry_end = np.sort([n.end_time for n in dry.notes])
    assert with_pedal.end_s.sum() > dry_end.sum() + 1.0  # the pedal lengthens notes


def _agree(data):
    """Both readers give the same notes, or both refuse the file."""
    try:
        fast = midi.read_midi(data, parser="fast")
    except midi.SkipPiece:
        fast = None
    try:
        ref = midi.read_midi(data, parser="note_seq")
    except midi.SkipPiece:
        ref = None
    assert (fast is None) == (ref is None)
    if fast is not None:
        for field in ("pitch", "velocity", "start_s", "end_s"):
            np.testing.assert_array_equal(getattr(fast, field), getattr(ref, field), err_msg=field)
    return fast is not None


@pytest.mark.filterwarnings("ignore:Tempo, Key or Time signature")
def test_fast_reader_gives_note_seqs_notes_exactly():
    files = [synthetic.piano_midi(s) for s in range(10)] + [synthetic.mixed_midi(s) for s in range(20)]
    import music21

    corpus_midi = os.path.join(os.path.dirname(music21.__file__), "midi", "testPrimitive", "*.mid")
    for path in sorted(glob.glob(corpus_midi)):
        with open(path, "rb") as f:
            files.append(f.read())
    assert all(_agree(data) for data in files)
    # Damaged files: both readers refuse the same ones and read the rest identically.
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(300):
        data = bytearray(files[rng.integers(len(files))])
        i = int(rng.integers(14, len(data)))
        if rng.random() < 0.7:
            data[i] = int(rng.integers(0, 256))
        else:
            del data[i : i + int(rng.integers(1, 4))]
        outcomes.add(_agree(bytes(data)))
    assert outcomes == {True, False}


# ----------------------------------------------------------------------------- sources and splits
def test_splits_are_disjoint_and_stable_across_runs(midi_folder, midi_dataset, tmp_path):
    again = build.build_dataset([f"midi_dir:{midi_folder}"], tmp_path, num_workers=1, progress=False, verbose=False)
    ids = {}
    for split in sources.SPLITS:
        first = sorted(_text(r["piece_id"]) for r in _records(midi_dataset, split))
        second = sorted(_text(r["piece_id"]) for r in _records(again, split))
        assert first == second
        ids[split] = set(first)
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    assert sum(len(v) for v in ids.values()) == 40

    # The hash does not depend on the interpreter's string-hash seed.
    code = (
        "from data_prep import sources\n"
        "print([sources.assign_split(sources.Item('midi_dir', '/r', f'{i}.mid', f'{i}.mid', f'{i}.mid')) for i in range(50)])"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, PYTHONHASHSEED=seed),
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    items = [sources.Item("midi_dir", "/r", f"{i}.mid", f"{i}.mid", f"{i}.mid") for i in range(4000)]
    counts = {s: 0 for s in sources.SPLITS}
    for it in items:
        counts[sources.assign_split(it)] += 1
    assert 0.88 < counts["train"] / 4000 < 0.92 and 0.035 < counts["test"] / 4000 < 0.065


def test_time_stretched_copies_stay_in_the_training_split(midi_folder, midi_dataset, tmp_path):
    path = build.build_dataset(
        [f"midi_dir:{midi_folder}"], tmp_path, num_workers=1, time_stretch=True, progress=False, verbose=False
    )
    vocab = Vocabulary.load(path)
    plain = {_text(r["piece_id"]): r for r in _records(midi_dataset, "train")}
    stretched = _records(path, "train")
    assert len(stretched) == 5 * len(plain)
    for r in stretched:
        base, _, factor = _text(r["piece_id"]).partition("@x")
        assert base in plain
        if factor:
            ratio = vocab.seconds(r["tokens"]) / vocab.seconds(plain[base]["tokens"])
            assert abs(ratio - float(factor)) < 0.02
    for split in ("validation", "test"):
        assert all("@x" not in _text(r["piece_id"]) for r in _records(path, split))


def test_maestro_and_asap_layouts_keep_their_splits_and_composers(tmp_path):
    maestro = tmp_path / "maestro"
    rows = []
    for i, (split, composer) in enumerate(
        [
            ("train", "Frédéric Chopin"),
            ("validation", "Johann Sebastian Bach"),
            ("test", "Franz Liszt"),
            ("train", "Franz Liszt"),
        ]
    ):
        rel = f"2018/perf{i}.midi"
        _write(maestro, rel, synthetic.piano_midi(i, num_notes=30))
        rows.append(
            dict(
                canonical_composer=composer,
                canonical_title="t",
                split=split,
                year=2018,
                midi_filename=rel,
                audio_filename="",
                duration=1,
            )
        )
    columns = {k: {str(i): r[k] for i, r in enumerate(rows)} for k in rows[0]}  # MAESTRO v3's json layout
    (maestro / "maestro-v3.0.0.json").write_text(json.dumps(columns))

    asap = tmp_path / "asap"
    with open(asap / "metadata.csv" if asap.exists() else _make(asap) / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["composer", "title", "folder", "xml_score", "midi_score", "midi_performance"])
        w.writeheader()
        for score in range(6):
            for perf in range(3):
                rel = f"Bach/Fugue/bwv_{score}/P{perf}.mid"
                _write(asap, rel, synthetic.piano_midi(100 + score * 3 + perf, num_notes=20))
                w.writerow(
                    dict(
                        composer="Bach",
                        title="f",
                        folder=f"Bach/Fugue/bwv_{score}",
                        xml_score="",
                        midi_score="",
                        midi_performance=rel,
                    )
                )

    path = build.build_dataset(
        [f"maestro:{maestro}", f"asap:{asap}"], tmp_path / "out", num_workers=1, progress=False, verbose=False
    )
    by_split = {s: _records(path, s) for s in sources.SPLITS}
    got = {
        (_text(r["path"]), s, _text(r["style"]), _text(r["composer"]))
        for s, rs in by_split.items()
        for r in rs
        if _text(r["source"]) == "maestro"
    }
    assert got == {
        ("2018/perf0.midi", "train", "frederic_chopin", "Frédéric Chopin"),
        ("2018/perf1.midi", "validation", "johann_sebastian_bach", "Johann Sebastian Bach"),
        ("2018/perf2.midi", "test", "franz_liszt", "Franz Liszt"),
        ("2018/perf3.midi", "train", "franz_liszt", "Franz Liszt"),
    }
    score_split = {}
    for s, rs in by_split.items():
        for r in rs:
            if _text(r["source"]) == "asap":
                assert _text(r["style"]) == "bach" and _text(r["composer"]) == "Bach"
                score = os.path.dirname(_text(r["path"]))
                assert score_split.setdefault(score, s) == s  # every performance of a score together
    assert len(score_split) == 6
    assert "STYLE:frederic_chopin" in Vocabulary.load(path).tokens


def _make(folder):
    os.makedirs(folder, exist_ok=True)
    return folder


def test_small_music21_build(tmp_path):
    path = build.build_dataset(
        ["music21:bach:2,essenFolksong:2,ryansMammoth:1"], tmp_path, num_workers=1, progress=False, verbose=False
    )
    records = [r for s in sources.SPLITS for r in _records(path, s)]
    assert len(records) == 5
    vocab = Vocabulary.load(path)
    assert {"STYLE:bach", "STYLE:folk_german", "STYLE:folk_british_irish"} <= set(vocab.tokens)
    for r in records:
        tokens = r["tokens"]
        assert tokens.dtype == np.int32 and len(tokens) > 20 and vocab.is_event(tokens).all()
        # Scores have no dynamics: one velocity for every note.
        velocities = {t for t in vocab.describe(tokens) if t.startswith("VELOCITY:")}
        assert velocities == {f"VELOCITY:{int(vocab.velocity_to_bin(sources.SCORE_VELOCITY))}"}
        assert _text(r["source"]) == "music21"
        style, pid = _text(r["style"]), _text(r["piece_id"])
        assert pid.startswith(_text(r["path"]))
        if style == "bach":
            assert _text(r["composer"]) == "Johann Sebastian Bach" and pid.startswith("bach/bwv")
        if style == "folk_german":
            assert pid.startswith("essenFolksong/") and "#" in pid


def test_dataset_stores_note_lengths_per_style(tmp_path):
    path = build.build_dataset(["music21:bach:3,essenFolksong:3"], tmp_path, num_workers=1, progress=False,
                               verbose=False, split_percents=(100, 0, 0))
    table = json.loads((path / "build.json").read_text())["note_seconds"]
    assert {"bach", "folk_german", "all"} <= set(table)
    vocab = Vocabulary.load(path)
    lengths = {s: [] for s in ("bach", "folk_german")}
    for r in _records(path, "train"):
        lengths[_text(r["style"])].append(vocab.note_lengths(r["tokens"]))
    for style, arrays in lengths.items():
        x = np.concatenate(arrays)
        row = table[style]
        assert row["notes"] == len(x) and row["mean"] == pytest.approx(x.mean(), abs=1e-4)
        assert row["p99.5"] == pytest.approx(np.percentile(x, 99.5), abs=1e-4) and row["max"] >= row["p99.5"]
        assert 0 < row["p50"] <= row["p90"] <= row["p99"] <= row["p99.5"] <= row["p99.9"]
    assert table["all"]["notes"] == table["bach"]["notes"] + table["folk_german"]["notes"]


def test_music21_collections_list_stable_piece_ids():
    items = sources.list_items("music21:essenFolksong:30,bach:10")
    assert items == sources.list_items("music21:essenFolksong:30,bach:10")
    assert len(items) == 40 and len({it.piece_id for it in items}) == 40
    assert {it.style for it in items} == {"folk_german", "bach"}
    with pytest.raises(ValueError, match="music21:nosuch"):
        sources.list_items("music21:nosuch")


# ----------------------------------------------------------------------------- junk
def test_bad_files_are_skipped_with_a_reason_and_every_input_is_accounted_for(tmp_path):
    folder = tmp_path / "junk"
    expected = synthetic.junk_files(str(folder))
    for i in range(3):
        _write(folder, f"good{i}.mid", synthetic.piano_midi(i, num_notes=30))
    _write(folder, "readme.txt", b"not an input: wrong suffix")
    path = build.build_dataset([f"midi_dir:{folder}"], tmp_path / "out", num_workers=1, progress=False, verbose=False)
    kept = {_text(r["path"]) for s in sources.SPLITS for r in _records(path, s)}
    with open(path / "skipped.jsonl") as f:
        skipped = {row["path"]: row["reason"] for row in map(json.loads, f)}
    assert kept == {"good0.mid", "good1.mid", "good2.mid"}
    assert set(skipped) == set(expected)
    for rel, reason in expected.items():
        assert skipped[rel].startswith(reason), (rel, skipped[rel])


def test_huge_files_are_skipped(tmp_path):
    with pytest.raises(midi.SkipPiece, match="too large"):
        midi.read_midi(synthetic.piano_midi(0, num_notes=200), max_file_bytes=1000)
    with pytest.raises(midi.SkipPiece, match="too long"):
        midi.read_midi(synthetic.piano_midi(0, num_notes=200), max_seconds=5.0)


def test_a_run_with_no_usable_input_says_why(tmp_path):
    folder = tmp_path / "junk"
    synthetic.junk_files(str(folder))
    with pytest.raises(ValueError, match="none of the 8 inputs could be used"):
        build.build_dataset([f"midi_dir:{folder}"], tmp_path / "out", num_workers=1, progress=False, verbose=False)


# ----------------------------------------------------------------------------- the dataset
def test_dataset_loads_with_tfds_and_grain_without_tensorflow(midi_dataset):
    code = (
        "import json, sys, grain, numpy as np, tensorflow_datasets as tfds\n"
        "from data_prep.vocab import Vocabulary\n"
        f"path = {str(midi_dataset)!r}\n"
        "builder = tfds.builder_from_directory(path)\n"
        "source = builder.as_data_source('train')\n"
        "ds = grain.MapDataset.source(source)\n"
        "r = ds[0]\n"
        "assert set(r) == {'tokens', 'piece_id', 'path', 'source', 'style', 'composer'}, set(r)\n"
        "assert r['tokens'].dtype == np.int32 and r['tokens'].ndim == 1\n"
        "vocab = Vocabulary.load(path)\n"
        "assert all(vocab.is_event(ds[i]['tokens']).all() for i in range(len(ds)))\n"
        "print(json.dumps([len(ds), sorted(builder.info.splits), 'tensorflow' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    n, splits, tf_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert n > 30 and "train" in splits
    assert HAVE_TF or not tf_loaded  # loading never needs TensorFlow


def test_interrupted_build_never_looks_complete(midi_folder, tmp_path, monkeypatch):
    real_read = build._Spool.read

    def read_then_die(self, split):
        for i, record in enumerate(real_read(self, split)):
            if i == 3:
                raise KeyboardInterrupt
            yield record

    monkeypatch.setattr(build._Spool, "read", read_then_die)
    with pytest.raises(KeyboardInterrupt):
        build.build_dataset([f"midi_dir:{midi_folder}"], tmp_path, num_workers=1, progress=False, verbose=False)
    path = build.dataset_path(tmp_path)
    assert not path.exists() and not build.is_complete(path)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".spool")]

    monkeypatch.setattr(build._Spool, "read", real_read)
    assert (
        build.build_dataset([f"midi_dir:{midi_folder}"], tmp_path, num_workers=1, progress=False, verbose=False) == path
    )
    assert build.is_complete(path)


def test_ensure_dataset_builds_the_demo_once_then_reuses_it(midi_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "DEMO_SOURCES", (f"midi_dir:{midi_folder}",))
    opts = dict(num_workers=1, progress=False, verbose=False)
    path = build.ensure_dataset(tmp_path, **opts)
    assert build.is_complete(path) and path == build.dataset_path(tmp_path)

    real_build = build._build

    def no_rebuild(*args, **kwargs):
        raise AssertionError("ensure_dataset rebuilt a complete dataset")

    monkeypatch.setattr(build, "_build", no_rebuild)
    assert build.ensure_dataset(tmp_path, **opts) == path
    # A demo built from another subset (an older mgpt) is replaced.
    monkeypatch.setattr(build, "_build", real_build)
    monkeypatch.setattr(build, "DEMO_SOURCES", (f"midi_dir:{midi_folder}/set1",))
    assert build.ensure_dataset(tmp_path, **opts) == path
    assert {_text(r["path"]) for s in sources.SPLITS for r in _records(path, s)} == {
        f"piece{i}.{'MID' if i % 5 == 0 else 'mid'}" for i in range(1, 40, 3)
    }


def test_an_existing_dataset_is_only_replaced_on_request(midi_folder, midi_dataset):
    output_dir = midi_dataset.parent.parent
    with pytest.raises(ValueError, match="overwrite"):
        build.build_dataset([f"midi_dir:{midi_folder}"], output_dir, num_workers=1, progress=False, verbose=False)


def test_worker_processes_give_the_same_dataset(midi_folder, midi_dataset, tmp_path):
    path = build.build_dataset([f"midi_dir:{midi_folder}"], tmp_path, num_workers=2, progress=False, verbose=False)
    for split in sources.SPLITS:
        a = {_text(r["piece_id"]): r["tokens"].tolist() for r in _records(midi_dataset, split)}
        b = {_text(r["piece_id"]): r["tokens"].tolist() for r in _records(path, split)}
        assert a == b


# ----------------------------------------------------------------------------- the command line
def _cli(*args):
    code = "import runpy, sys\nsys.argv = ['build'] + sys.argv[1:]\nrunpy.run_module('data_prep.build', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_bad_source_gives_one_line_naming_it(tmp_path):
    for spec in ("nosuch:thing", f"midi_dir:{tmp_path}/missing", "music21:bach,nosuchcollection"):
        out = _cli(f"--source={spec}", f"--output_dir={tmp_path}/out")
        assert out.returncode != 0
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and spec in lines[0], out.stderr


@pytest.mark.skipif(HAVE_TF, reason="TensorFlow is installed here")
def test_tfrecord_without_tensorflow_stops_at_once(tmp_path):
    out = _cli("--source=music21:bach", f"--output_dir={tmp_path}/out", "--file_format=tfrecord")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensorflow" in lines[0].lower() and "tfrecord" in lines[0], out.stderr
    assert not os.path.exists(f"{tmp_path}/out")


def test_cli_prints_the_dataset_path_last(midi_folder, tmp_path):
    out = _cli(
        f"--source=midi_dir:{midi_folder}",
        f"--output_dir={tmp_path}",
        "--num_workers=1",
        "--max_pieces=5",
        "--num_velocity_bins=8",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last == str(build.dataset_path(tmp_path)) and build.is_complete(last)
    assert "train" in out.stdout and "events/s" in out.stdout
    vocab = Vocabulary.load(last)
    assert vocab.num_velocity_bins == 8
    records = [r for s in sources.SPLITS for r in _records(last, s)]
    assert len(records) == 5 and all(vocab.is_event(r["tokens"]).all() for r in records)


@pytest.mark.skipif(not HAVE_TF, reason="needs TensorFlow: pip install 'mgpt[tf]' (the tf extra)")
def test_tfrecord_dataset_reads_back_with_tf_data(midi_folder, tmp_path):
    import tensorflow as tf

    path = build.build_dataset([f"midi_dir:{midi_folder}"], tmp_path / "out", num_workers=1, progress=False,
                               verbose=False, file_format="tfrecord", max_pieces=5)
    files = sorted(glob.glob(os.path.join(path, "*train.tfrecord*")))
    assert files, os.listdir(path)
    spec = {"tokens": tf.io.VarLenFeature(tf.int64), "style": tf.io.FixedLenFeature([], tf.string),
            "piece_id": tf.io.FixedLenFeature([], tf.string), "composer": tf.io.FixedLenFeature([], tf.string),
            "source": tf.io.FixedLenFeature([], tf.string), "path": tf.io.FixedLenFeature([], tf.string)}
    records = [tf.io.parse_single_example(x, spec) for x in tf.data.TFRecordDataset(files)]
    assert records
    vocab = Vocabulary.load(path)
    for r in records:
        ids = tf.sparse.to_dense(r["tokens"]).numpy()
        assert len(ids) > 0 and ids.min() >= vocab.note_on_offset and ids.max() < vocab.style_offset
    # The same records through TFDS's own reader.
    import tensorflow_datasets as tfds

    assert len(list(tfds.builder_from_directory(path).as_dataset(split="train"))) == len(records)
    # Training reads ArrayRecord only (random access): one line says so.
    from mgpt.train import data as data_lib

    with pytest.raises(FileNotFoundError, match="a TFRecord dataset, and training reads ArrayRecord"):
        data_lib.open_source(path, "train")
