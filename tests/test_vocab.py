"""The event vocabulary: note-seq's Performance encoding, transposition, vocab.json."""

import json

import note_seq
import numpy as np
import pytest
from note_seq import performance_lib, sequences_lib

from data_prep import synthetic
from data_prep.vocab import Vocabulary


def _note_seq_performance_ids(ns, vocab: Vocabulary) -> np.ndarray:
    """The reference: note-seq's own Performance events, mapped to our ids."""
    if any(cc.control_number == 64 for cc in ns.control_changes):
        ns = sequences_lib.apply_sustain_control_changes(ns)
    kept = note_seq.NoteSequence()
    kept.CopyFrom(ns)
    del kept.notes[:]
    for n in ns.notes:
        if not n.is_drum and vocab.min_pitch <= n.pitch <= vocab.max_pitch:
            kept.notes.add().CopyFrom(n)
    quantized = sequences_lib.quantize_note_sequence_absolute(kept, vocab.steps_per_second)
    performance = performance_lib.Performance(
        quantized, num_velocity_bins=vocab.num_velocity_bins, max_shift_steps=vocab.max_shift_steps
    )
    names = {
        performance_lib.PerformanceEvent.NOTE_ON: "NOTE_ON",
        performance_lib.PerformanceEvent.NOTE_OFF: "NOTE_OFF",
        performance_lib.PerformanceEvent.TIME_SHIFT: "TIME_SHIFT",
        performance_lib.PerformanceEvent.VELOCITY: "VELOCITY",
    }
    return np.asarray([vocab.id_of(f"{names[e.event_type]}:{e.event_value}") for e in performance], np.int32)


@pytest.mark.parametrize(
    "settings",
    [{}, {"num_velocity_bins": 8, "max_shift_steps": 37}, {"num_velocity_bins": 127, "steps_per_second": 50}],
)
def test_encoder_matches_note_seq_performance(settings):
    vocab = Vocabulary(["bach"], **settings)
    files = [synthetic.piano_midi(seed) for seed in range(6)] + [synthetic.mixed_midi(seed) for seed in range(6)]
    for data in files:
        ns = note_seq.midi_to_note_sequence(data)
        np.testing.assert_array_equal(vocab.encode(ns), _note_seq_performance_ids(ns, vocab))


def _ids(vocab, events):
    return np.asarray([vocab.id_of(e) for e in events], np.int32)


def test_transpose_drops_notes_pushed_out_of_range_and_never_wraps():
    vocab = Vocabulary()
    ids = _ids(
        vocab,
        [
            "VELOCITY:20",
            "NOTE_ON:21",
            "NOTE_ON:60",
            "NOTE_ON:108",
            "TIME_SHIFT:50",
            "NOTE_OFF:108",
            "TIME_SHIFT:10",
            "NOTE_OFF:21",
            "NOTE_OFF:60",
        ],
    )
    up = vocab.transpose(ids, 1)
    assert vocab.describe(up) == [
        "VELOCITY:20",
        "NOTE_ON:22",
        "NOTE_ON:61",
        "TIME_SHIFT:50",
        "TIME_SHIFT:10",
        "NOTE_OFF:22",
        "NOTE_OFF:61",
    ]
    down = vocab.transpose(ids, -1)
    assert vocab.describe(down) == [
        "VELOCITY:20",
        "NOTE_ON:59",
        "NOTE_ON:107",
        "TIME_SHIFT:50",
        "NOTE_OFF:107",
        "TIME_SHIFT:10",
        "NOTE_OFF:59",
    ]
    # Far enough, every note goes; timing and velocity events stay, nothing wraps around.
    assert vocab.describe(vocab.transpose(ids, 88)) == ["VELOCITY:20", "TIME_SHIFT:50", "TIME_SHIFT:10"]
    assert vocab.describe(vocab.transpose(ids, -88)) == ["VELOCITY:20", "TIME_SHIFT:50", "TIME_SHIFT:10"]
    # The edges themselves stay in range.
    assert vocab.describe(vocab.transpose(_ids(vocab, ["NOTE_ON:107", "NOTE_OFF:107"]), 1)) == [
        "NOTE_ON:108",
        "NOTE_OFF:108",
    ]
    assert vocab.describe(vocab.transpose(_ids(vocab, ["NOTE_ON:22", "NOTE_OFF:22"]), -1)) == [
        "NOTE_ON:21",
        "NOTE_OFF:21",
    ]


def test_transpose_keeps_the_timing_of_the_notes_that_remain():
    vocab = Vocabulary(["bach"])
    ids = vocab.encode(note_seq.midi_to_note_sequence(synthetic.piano_midi(3)))
    pitch, velocity, start, end = vocab.decode_notes(ids)
    for shift in (-7, 5, 30):
        t_pitch, t_velocity, t_start, t_end = vocab.decode_notes(vocab.transpose(ids, shift))
        kept = (pitch + shift >= vocab.min_pitch) & (pitch + shift <= vocab.max_pitch)
        assert 0 < kept.sum() <= len(pitch)
        order = np.lexsort((pitch[kept] + shift, start[kept]))
        np.testing.assert_array_equal(t_pitch, (pitch[kept] + shift)[order])
        np.testing.assert_allclose(t_start, start[kept][order])
        np.testing.assert_allclose(t_end, end[kept][order])
        np.testing.assert_array_equal(t_velocity, velocity[kept][order])
    # Style, EOS and PAD ids pass through untouched; zero is an exact copy.
    framed = np.concatenate([[vocab.style_id("bach")], ids, [vocab.eos_id, vocab.pad_id]]).astype(np.int32)
    out = vocab.transpose(framed, 2)
    assert out[0] == vocab.style_id("bach") and list(out[-2:]) == [vocab.eos_id, vocab.pad_id]
    assert out.dtype == np.int32
    same = vocab.transpose(framed, 0)
    np.testing.assert_array_equal(same, framed)
    assert same is not framed


def test_vocab_json_lists_readable_tokens_and_round_trips(tmp_path):
    vocab = Vocabulary(["J. S. Bach", "folk_german"], num_velocity_bins=16)
    vocab.save(tmp_path / "vocab.json")
    tokens = json.loads((tmp_path / "vocab.json").read_text())["tokens"]
    assert tokens[:2] == ["PAD", "EOS"]
    for t in ("NOTE_ON:60", "NOTE_OFF:108", "TIME_SHIFT:25", "VELOCITY:16", "STYLE:unknown", "STYLE:j_s_bach"):
        assert t in tokens
    assert tokens[vocab.style_id("J. S. Bach")] == "STYLE:j_s_bach"
    assert vocab.style_id("never seen") == vocab.unknown_style_id
    assert Vocabulary.load(tmp_path) == vocab


def test_decode_turns_any_ids_into_writable_midi(tmp_path):
    vocab = Vocabulary(["bach"])
    rng = np.random.default_rng(0)
    ids = rng.integers(-5, vocab.size + 5, 3000)
    ns = vocab.decode(ids)
    assert len(ns.notes) > 0
    assert all(n.end_time > n.start_time and vocab.min_pitch <= n.pitch <= vocab.max_pitch for n in ns.notes)
    note_seq.sequence_proto_to_midi_file(ns, str(tmp_path / "x.mid"))
    assert len(note_seq.midi_file_to_note_sequence(str(tmp_path / "x.mid")).notes) == len(ns.notes)


def test_max_note_seconds_cuts_notes_that_are_never_closed():
    v = Vocabulary()
    on, off = v.id_of("NOTE_ON:60"), v.id_of("NOTE_OFF:60")
    shift = v.id_of("TIME_SHIFT:100")  # one second
    ids = [on, v.id_of("NOTE_ON:64"), shift, off] + [shift] * 20  # E4 is never closed
    pitch, _, start_s, end_s = v.decode_notes(ids, max_note_seconds=3.0)
    assert dict(zip(pitch.tolist(), (end_s - start_s).tolist())) == {60: 1.0, 64: 3.0}
    pitch, _, start_s, end_s = v.decode_notes(ids)  # no cap: it sounds to the end
    assert dict(zip(pitch.tolist(), (end_s - start_s).tolist())) == {60: 1.0, 64: 21.0}


def test_sounding_state_at_a_cut_is_carried_as_note_ons():
    v = Vocabulary(["bach"])
    on = lambda p: v.note_on_offset + p - v.min_pitch  # noqa: E731
    off = lambda p: v.note_off_offset + p - v.min_pitch  # noqa: E731
    vel = lambda b: v.velocity_offset + b - 1  # noqa: E731
    shift = lambda s: v.time_shift_offset + s - 1  # noqa: E731
    # 64 (bin 20) and 60 (bin 10) struck, 67 struck and released, then 72 struck at bin 10.
    ids = [vel(20), on(64), shift(10), vel(10), on(60), on(67), shift(5), off(67), on(72), shift(30), off(64),
           shift(3), vel(12), on(50)]
    cut = ids.index(off(64))  # the cut falls just before 64's NOTE_OFF: 60, 64 and 72 still sound
    pitch, count, velocity, onset, now = v.sounding_at(ids, cut)
    assert pitch.tolist() == [60, 64, 72] and count.tolist() == [1, 1, 1]
    assert velocity.tolist() == [vel(10), vel(20), vel(10)]
    assert onset.tolist() == [10, 0, 15] and now == 45
    # The velocity in force, then each sounding pitch in ascending order, with a VELOCITY before
    # any whose own velocity differs, and the velocity in force restored at the end.
    assert v.carried_state(ids, cut) == [vel(10), on(60), vel(20), on(64), vel(10), on(72)]
    # After 64 ends; a cut that opens on a VELOCITY carries the notes but needs no restore.
    at_vel = ids.index(vel(12))
    assert v.carried_state(ids, at_vel) == [vel(10), on(60), on(72)]
    # The piece's start, or nothing sounding and a VELOCITY next: nothing is carried.
    assert v.carried_state(ids, 0) == []
    assert v.carried_state([vel(3), on(60), shift(4), off(60), vel(5), on(61)], 4) == []
    # Whole notes only under a limit, and the velocity in force still restored.
    assert v.carried_state(ids, cut, limit=5) == [vel(10), on(60), vel(20), on(64), vel(10)]
    assert v.carried_state(ids, cut, limit=4) == [vel(10), on(60)]  # 64 would need 3 more tokens
    # A unison struck twice sounds twice: both NOTE_ONs are carried, so two NOTE_OFFs may follow.
    unison = [vel(10), on(60), on(60), shift(5), off(60), shift(5), off(60)]
    assert v.sounding_at(unison, 4).count.tolist() == [2]
    assert v.carried_state(unison, 4) == [vel(10), on(60), on(60)]
    assert v.carried_state(unison, 6) == [vel(10), on(60)]


def test_note_lengths_pair_each_note_on_with_its_note_off():
    v = Vocabulary()
    on = lambda p: v.note_on_offset + p - v.min_pitch  # noqa: E731
    off = lambda p: v.note_off_offset + p - v.min_pitch  # noqa: E731
    shift = lambda s: v.time_shift_offset + s - 1  # noqa: E731
    ids = [on(60), on(64), shift(50), off(60), on(60), shift(100), shift(25), off(64), off(60), on(70)]
    assert sorted(v.note_lengths(ids).tolist()) == [0.5, 1.25, 1.75]  # 70 is never closed
