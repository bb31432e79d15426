"""Control attributes computed from the data (data_prep/controls.py) and their tokens."""

import json

import numpy as np
import pytest

from data_prep import controls
from data_prep.notes import Notes
from data_prep.vocab import Vocabulary
from mgpt.train import data as data_lib

SECONDS = 2.0


def _piece(seed: int, seconds: float = 21.0) -> Notes:
    """Random music whose density, chords, register, loudness and key change from segment to segment."""
    rng = np.random.default_rng(seed)
    pitch, velocity, start, end = [], [], [], []
    t, busy = 0.0, {}
    while t < seconds:
        k = int(t // 3)
        scale = np.array([0, 2, 4, 5, 7, 9, 11]) if k % 2 == 0 else np.array([0, 2, 3, 5, 7, 8, 10])
        base = 48 + 6 * (k % 4)
        chord = int(rng.integers(1, 1 + k % 4 + 1))
        for p in rng.choice(scale, chord, replace=False):
            p = base + 12 * int(rng.integers(0, 2)) + int(p)
            if busy.get(p, 0.0) > t:  # no unison overlaps: a MIDI file cannot keep them apart
                continue
            pitch.append(p)
            velocity.append(int(rng.integers(20 + 10 * (k % 5), 60 + 10 * (k % 5))))
            start.append(t)
            end.append(t + float(rng.choice([0.15, 0.3, 0.6, 1.2])))
            busy[p] = end[-1] + 0.02
        t += float(rng.choice([0.1, 0.25, 0.5, 1.0][k % 4:][:2]))
    return Notes(np.array(pitch), np.array(velocity), np.array(start), np.array(end))


@pytest.fixture(scope="module")
def vocab():
    plain = Vocabulary(["bach"])
    spec = controls.fit([plain.decode_notes(plain.encode_notes(*_piece(s))) for s in range(6)], SECONDS, 8)
    return plain.with_controls(spec)


def _levels_in_tokens(vocab, ids) -> dict[int, dict[str, int]]:
    """Segment index -> {control: level} read back from the control tokens of an id row."""
    step = 0
    seg = controls.segment_steps(vocab)
    out: dict[int, dict[str, int]] = {}
    for t in np.asarray(ids).tolist():
        token = vocab.token_of(t)
        if token.startswith("TIME_SHIFT:"):
            step += int(token.split(":")[1])
        elif token.startswith("CONTROL:"):
            name, level = token.split(":", 1)[1].split("=")
            out.setdefault(step // seg, {})[name] = (controls.MODES.index(level) + 1 if name == "mode"
                                                       else int(level))
    return out


def test_controls_agree_at_prep_training_and_evaluation(vocab, tmp_path):
    import note_seq

    from mgpt import render

    for seed in (10, 11, 12):
        ids = vocab.encode_notes(*_piece(seed))
        # Prep: the notes as the dataset holds them, the function the levels were fitted with.
        prep_SxA = controls.segment_levels(vocab.decode_notes(ids), vocab.controls)
        # Training: the data pipeline's rows, control tokens inserted at each segment's opening.
        segments = data_lib._Segments(vocab, seq_len=64)
        _, body = segments.body({"tokens": ids, "style": "bach"})
        training = _levels_in_tokens(vocab, body)
        # Evaluation: the piece written as MIDI and read back as mgpt.eval.inputs reads generated pieces.
        path = render.write_midi(vocab.decode(ids), tmp_path / f"{seed}.mid")
        notes = vocab.decode_notes(vocab.encode(note_seq.midi_file_to_note_sequence(str(path))))
        eval_SxA = controls.segment_levels(notes, vocab.controls, len(prep_SxA))
        np.testing.assert_array_equal(prep_SxA, eval_SxA)
        assert sorted(training) == list(range(len(prep_SxA)))
        for k, row in enumerate(prep_SxA):
            assert training[k] == {name: int(v) for name, v in zip(controls.ATTRIBUTES, row) if v > 0}
        # The levels move: the test would see a segment given another segment's values.
        assert all(len(np.unique(prep_SxA[:, a])) >= 3 for a in range(len(controls.ATTRIBUTES) - 1))


def test_a_crop_opening_mid_segment_carries_its_controls(vocab):
    ids = vocab.encode_notes(*_piece(20))
    segments = data_lib._Segments(vocab, seq_len=48)
    _, body = segments.body({"tokens": ids, "style": "bach"})
    levels = _levels_in_tokens(vocab, body)
    rows = segments.consecutive(vocab.style_id("bach"), body)
    assert len(rows) > 4
    seg = controls.segment_steps(vocab)
    start, carried_controls = 0, 0
    for row in rows:
        tokens, loss = row["tokens"], row["loss"]
        assert not np.any(loss[vocab.is_control(tokens)])  # given, never targets
        if start:
            carried = vocab.carried_state(body, start, limit=24)
            in_force = [t for t in carried if vocab.is_control(t)]
            step = int(sum(int(vocab.token_of(t).split(":")[1]) for t in body[:start]
                           if vocab.token_of(t).startswith("TIME_SHIFT:")))
            expected = levels[step // seg]
            read = _levels_in_tokens(vocab, in_force)
            # What the segment's opening wrote before the crop: all of it unless the crop opens inside the group.
            assert read.get(0, {}).items() <= expected.items()
            assert tokens[1:1 + len(in_force)].tolist() == in_force
            carried_controls += len(in_force)
        start += len(tokens) - 1 - len(vocab.carried_state(body, start, limit=24)) if start else len(tokens) - 1
    assert carried_controls > 0
    # Evaluation segments still predict each event and EOS once: the controls add no targets.
    assert sum(int(r["loss"].sum()) for r in rows) == int(np.sum(~vocab.is_control(body)))


def test_control_dropout_leaves_tokens_out_independently(vocab):
    ids = vocab.encode_notes(*_piece(30))
    segments = data_lib._Segments(vocab, seq_len=64)
    full = segments.body({"tokens": ids, "style": "bach"})[1]
    n_full = int(vocab.is_control(full).sum())
    none = segments.body({"tokens": ids, "style": "bach"}, rng=np.random.default_rng(0), control_dropout=1.0)[1]
    half = segments.body({"tokens": ids, "style": "bach"}, rng=np.random.default_rng(0), control_dropout=0.5)[1]
    assert not vocab.is_control(none).any()
    assert 0.3 * n_full < int(vocab.is_control(half).sum()) < 0.7 * n_full
    # Dropping tokens never moves an event.
    for row in (none, half):
        np.testing.assert_array_equal(row[~vocab.is_control(row)], full[~vocab.is_control(full)])


def test_mode_by_key_profile():
    c_major = np.bincount(np.array([0, 2, 4, 5, 7, 9, 11, 0, 4, 7]), minlength=12)
    a_minor = np.bincount(np.array([9, 11, 0, 2, 4, 5, 8, 9, 0, 4, 9]), minlength=12)
    assert controls.mode_of(c_major) == 1
    assert controls.mode_of(a_minor) == 2
    assert controls.mode_of(np.ones(12)) == 3 and controls.mode_of(np.zeros(12)) == 3


def test_a_vocabulary_without_controls_reads_and_writes_as_before(vocab, tmp_path):
    plain = Vocabulary(["bach"], fim=True)
    written = plain.to_json()
    assert "controls" not in written and plain.size == plain.control_offset == len(written["tokens"])
    assert Vocabulary.from_json(json.loads(json.dumps(written))).to_json() == written
    # With controls every earlier id keeps its meaning; the spec round-trips through vocab.json.
    base = Vocabulary(["bach"])
    assert vocab.tokens[:base.size] == base.tokens and vocab.size == base.size + 4 * 8 + 3
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path) == vocab and Vocabulary.load(tmp_path).controls == vocab.controls
    with pytest.raises(ValueError, match="no control tokens"):
        plain.control_id("density", 3)


def test_a_run_keeps_the_controls_it_started_with(vocab):
    from mgpt.errors import UserError

    plain = Vocabulary(["bach"])
    assert data_lib.with_controls(plain, None, {"control_seconds": 0.0}, resumed=False) is plain
    assert data_lib.with_controls(vocab, None, {"control_seconds": 0.0}, resumed=True) is vocab
    assert data_lib.with_controls(vocab, None, {"control_seconds": SECONDS}, resumed=True) is vocab
    with pytest.raises(UserError, match="config.data.control_seconds=3: the run's vocabulary has 2 s segments"):
        data_lib.with_controls(vocab, None, {"control_seconds": 3.0}, resumed=True)
    with pytest.raises(UserError, match="resumed or warm-started model's vocabulary has no control tokens"):
        data_lib.with_controls(plain, None, {"control_seconds": 2.0}, resumed=True)


def test_fit_records_the_levels_each_control_has():
    plain = Vocabulary(["bach"])
    pieces = [plain.decode_notes(plain.encode_notes(*_piece(s))) for s in range(4)]
    one_velocity = [Notes(n.pitch, np.full(len(n.pitch), 77), n.start_s, n.end_s) for n in pieces]
    spec = controls.fit(one_velocity, SECONDS, 8)
    assert spec["seen"]["loudness"] == [4]  # every segment ties with every edge: the mid-rank
    assert spec["seen"]["density"] == sorted(set(spec["seen"]["density"])) and len(spec["seen"]["density"]) >= 6
    levels = np.concatenate([controls.segment_levels(n, spec) for n in one_velocity])
    for a, name in enumerate(controls.ATTRIBUTES):
        assert sorted(set(levels[:, a].tolist()) - {0}) == spec["seen"][name]
    assert Vocabulary.from_json(plain.with_controls(spec).to_json()).controls["seen"] == spec["seen"]


def test_fit_counts_each_styles_levels():
    # The contrast style (mgpt.sample.controls.contrast_styles) reads how often each style's training
    # segments have each level: counted from the same levels `segment_levels` gives every stage.
    plain = Vocabulary(["bach", "folk"])
    pieces = [plain.decode_notes(plain.encode_notes(*_piece(s, seconds=9.0 + 3 * s))) for s in range(5)]
    styles = ["bach", "folk", "bach", "folk", "folk"]
    spec = controls.fit(pieces, SECONDS, 8, styles=styles)
    assert sorted(spec["by_style"]) == ["bach", "folk"]
    for style in ("bach", "folk"):
        levels = np.concatenate([controls.segment_levels(n, spec) for n, s in zip(pieces, styles) if s == style])
        for a, name in enumerate(controls.ATTRIBUTES):
            counts = spec["by_style"][style][name]
            assert len(counts) == (4 if name == "mode" else 9)
            assert counts == np.bincount(levels[:, a], minlength=len(counts)).tolist()
    # Without styles, the spec is as before; a vocabulary keeps the counts through its JSON.
    assert "by_style" not in controls.fit(pieces, SECONDS, 8)
    assert Vocabulary.from_json(plain.with_controls(spec).to_json()).controls["by_style"] == spec["by_style"]
