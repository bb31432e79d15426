"""Fill-in-the-middle (mgpt/sample/fim.py, data.py's FIM rows, the sampler's fill rows, mgpt.generate --infill)."""

import json

import numpy as np
import pytest

from data_prep.vocab import FIM_TOKENS, Vocabulary
from mgpt.train import data
from mgpt.sample import fim
from mgpt import generate
from mgpt import render
from runs import save_untrained_run

STYLES = ["bach", "folk"]


def _notes_piece(vocab, rng, seconds=12.0, voices=3):
    """Random polyphonic notes (overlaps, unisons, long holds) as event ids."""
    n = int(seconds * 4 * voices)
    start = np.round(rng.uniform(0, seconds, n), 2)
    length = np.round(rng.choice([0.1, 0.25, 0.5, 1.0, 3.0], n), 2)
    pitch = rng.integers(55, 80, n)
    velocity = rng.choice([50, 80, 110], n)
    return vocab.encode_notes(pitch, velocity, start, start + length)


def test_old_vocabulary_without_fim_tokens_loads_and_keeps_every_id():
    old = Vocabulary(STYLES)
    loaded = Vocabulary.from_json(json.loads(json.dumps(old.to_json())))
    assert not loaded.fim and loaded == old
    new = old.with_fim()
    assert new.tokens[: old.size] == old.tokens, "FIM tokens are appended: no existing id moves"
    assert new.tokens[old.size:] == list(FIM_TOKENS) and new.size == old.size + 4
    assert Vocabulary.from_json(new.to_json()) == new
    assert not new.is_style([new.fim_prefix_id, new.fim_end_id]).any()
    assert new.is_style([new.style_id("bach")]).all()
    with pytest.raises(ValueError, match="no FIM tokens"):
        old.fim_middle_id


def test_fim_row_round_trips_to_the_original_crop():
    vocab = Vocabulary(STYLES).with_fim()
    segments = data._Segments(vocab, 128)
    rng = np.random.default_rng(0)
    made = 0
    for k in range(60):
        style, body = segments.body({"tokens": _notes_piece(vocab, rng), "style": "bach"}, semitones=0)
        start, end = segments.random_span(body, rng)
        row = segments.fim_segment(style, body, start, end, rng)
        if row is None:
            continue
        made += 1
        tokens, loss = row["tokens"], row["loss"]
        assert len(tokens) == len(loss) <= 129
        plain = segments.segment(style, body, start, predict_carried=True, end=end)["tokens"]
        joined = fim.join(vocab, tokens)
        # The suffix may be shortened at its end to fit the markers; nothing else changes.
        np.testing.assert_array_equal(joined, plain[: len(joined)])
        middle = tokens[list(tokens).index(vocab.fim_middle_id) + 1:]
        assert middle[-1] == vocab.fim_end_id and loss[-1] == 1
        # Targets: every event of the crop once (the carried VELOCITY at its start too) and FIM_END;
        # the markers, the gap and the carried NOTE_ONs of each part are given.
        carried = segments.carried(body, start)
        lead = int(bool(carried) and bool(vocab.is_velocity(carried[0])))
        assert loss.sum() == len(joined) - 1 - len(carried) + lead + 1
        for marker in (vocab.fim_prefix_id, vocab.fim_suffix_id, vocab.fim_middle_id):
            assert loss[list(tokens).index(marker)] == 0, "markers are given"
        # The middle lasts exactly what the suffix's gap tokens say.
        suffix_at = list(tokens).index(vocab.fim_suffix_id)
        gap = fim.gap_tokens(vocab, round(vocab.seconds(middle) * vocab.steps_per_second))
        assert list(tokens[suffix_at + 1: suffix_at + 1 + len(gap)]) == gap
    assert made >= 25  # the rest: two cuts leave no room for the suffix in these dense random crops


def test_fim_rate_zero_leaves_training_rows_unchanged():
    vocab = Vocabulary(STYLES).with_fim()
    rng = np.random.default_rng(1)
    records = [{"tokens": _notes_piece(vocab, rng, seconds=4), "style": "bach"} for _ in range(12)]
    kw = dict(seq_len=64, batch_size=4, seed=3, transpose=2, num_packing_bins=4, prefetch=0)
    plain = iter(data.train_dataset(records, Vocabulary(STYLES), **kw))
    zero = iter(data.train_dataset(records, vocab, fim_rate=0.0, **kw))
    for _ in range(3):
        a, b = next(plain), next(zero)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="FIM tokens"):
        data.train_dataset(records, Vocabulary(STYLES), fim_rate=0.5, **kw)
    some = next(iter(data.train_dataset(records, vocab, fim_rate=1.0, **kw)))
    assert (some["inputs"] == vocab.fim_middle_id).any()


def _save_run(workdir, vocab):
    """A run directory holding a randomly initialised tiny GPT (behaviour here must not depend on training).
    A 48-token context: middles longer than a window go on in a fresh FIM prompt."""
    return save_untrained_run(workdir, vocab, max_len=48)


@pytest.fixture(scope="module")
def fim_workdir(tmp_path_factory):
    return _save_run(str(tmp_path_factory.mktemp("fimrun")), Vocabulary(STYLES).with_fim())


@pytest.fixture(scope="module")
def midi_file(tmp_path_factory):
    from note_seq.protobuf import music_pb2

    ns = music_pb2.NoteSequence()
    ns.tempos.add(qpm=120)
    notes = [(60, 0.0, 0.5), (64, 0.5, 1.0), (67, 1.0, 2.0),  # ends exactly at S = 2
             (72, 1.5, 2.6),  # crosses S, ends in the gap
             (48, 0.5, 5.5),  # held through the whole gap
             (62, 2.2, 3.0),  # wholly inside: replaced
             (65, 3.1, 4.5),  # begins in the gap, crosses E = 4
             (69, 4.0, 4.5), (71, 4.5, 5.0), (60, 5.0, 6.0)]
    for pitch, start, end in notes:
        ns.notes.add(pitch=pitch, velocity=90, start_time=start, end_time=end)
    ns.total_time = 6.0
    return str(render.write_midi(ns, tmp_path_factory.mktemp("midi") / "piece.mid"))


def test_sampler_fills_exactly_the_gap_and_holds_notes_through_it(fim_workdir, midi_file):
    run = generate.load_run(fim_workdir)
    infill = generate.load_infill(midi_file, run.vocab, 2.0, 4.0)
    gap, vocab = infill.gap, run.vocab
    assert gap.steps == 200 and gap.hold_P[48 - vocab.min_pitch] == 1 and gap.hold_P.sum() == 1
    rows = run.sample_ids(run.prompts(["bach"] * 4, gap.prefix), [0, 1, 2, 3], generate.Sampling(max_note_seconds=0.3),
                          gaps=[gap] * 4)
    for row in rows:
        middle = row[1 + len(gap.prefix):]
        assert vocab.seconds(middle) == pytest.approx(2.0), "the middle ends when its clock reaches E, not later"
        assert vocab.note_off_offset + 48 - vocab.min_pitch not in middle, "a note held through the gap is kept"
        assert vocab.eos_id not in middle and not (middle >= vocab.fim_offset).any()


def test_infill_keeps_every_note_outside_the_gap_and_nothing_dangles(fim_workdir, midi_file, tmp_path):
    import note_seq

    from data_prep import notes as notes_lib

    out = tmp_path / "out"
    generate.main(["mgpt.generate", f"--workdir={fim_workdir}", f"--output_dir={out}", "--noprogress",
                   f"--infill={midi_file}", "--infill_start=2", "--infill_end=4", "--num_samples=3", "--style=bach",
                   "--seed=5"])
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["seed"] for e in entries] == [5, 6, 7]
    original = notes_lib.from_sequence(note_seq.midi_file_to_note_sequence(midi_file))
    vocab = Vocabulary(STYLES)
    for e in entries:
        assert e["infill"] == {"file": midi_file, "start": 2.0, "end": 4.0} and (out / e["image"]).is_file()
        joined = notes_lib.from_sequence(note_seq.midi_file_to_note_sequence(str(out / e["file"])))
        assert fim.kept_outside(original, joined, 2.0, 4.0) == [], "every note outside [S, E) kept within 10 ms"
        ids_before, ids_after = vocab.encode_notes(*original), vocab.encode_notes(*joined)
        assert fim.dangling(vocab, ids_before, ids_after, 400) == (0, 0), "nothing dangles across E"
    # The check can fail: a piece whose middle note runs on past E is caught.
    bad = notes_lib.Notes(np.append(original.pitch, 77), np.append(original.velocity, 90),
                          np.append(original.start_s, 3.5), np.append(original.end_s, 5.0))
    assert fim.dangling(vocab, ids_before, vocab.encode_notes(*bad), 400) == (1, 0)
    moved = notes_lib.Notes(original.pitch, original.velocity, original.start_s + 0.02, original.end_s + 0.02)
    assert fim.kept_outside(original, moved, 2.0, 4.0)


@pytest.mark.parametrize("flags, message", [
    (["--infill_start=3", "--infill_end=3"], "--infill_end=3.0: must be later than --infill_start=3.0"),
    (["--infill_start=4", "--infill_end=2"], "--infill_end=2.0: must be later than --infill_start=4.0"),
    (["--infill_start=-1", "--infill_end=2"], "--infill_start=-1.0: must be a time in seconds >= 0"),
    (["--infill_start=2", "--infill_end=60"], "--infill_end=60: past the end of .*piece.mid, whose music ends at 6.00 s"),
    (["--infill_start=2"], "--infill needs --infill_start and --infill_end"),
])
def test_bad_infill_times_are_one_clear_line(fim_workdir, midi_file, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message) as e:
        generate.main(["mgpt.generate", f"--workdir={fim_workdir}", f"--output_dir={tmp_path}", "--noprogress",
                       f"--infill={midi_file}", *flags])
    assert "\n" not in str(e.value) and e.value.code == 2  # a user's mistake: exit code 2, as every command


def test_bad_infill_file_and_old_model_are_one_clear_line(fim_workdir, midi_file, tmp_path):
    for path, message in [(tmp_path / "missing.mid", "no such file"), (tmp_path / "text.mid", "not a readable MIDI")]:
        if "text" in path.name:
            path.write_text("not midi")
        with pytest.raises(SystemExit, match=f"--infill={path}: {message}"):
            generate.main(["mgpt.generate", f"--workdir={fim_workdir}", f"--output_dir={tmp_path}", "--noprogress",
                           f"--infill={path}", "--infill_start=1", "--infill_end=2"])
    old = _save_run(str(tmp_path / "old"), Vocabulary(STYLES))  # a model from before FIM: its vocab lacks the tokens
    with pytest.raises(SystemExit, match="--infill: the model in .* has no FIM tokens") as e:
        generate.main(["mgpt.generate", f"--workdir={old}", f"--output_dir={tmp_path / 'o'}", "--noprogress",
                       f"--infill={midi_file}", "--infill_start=1", "--infill_end=2"])
    assert "\n" not in str(e.value)
    pieces = generate.load_run(old).generate("bach", n=1, max_events=20)  # it still continues music
    assert len(pieces) == 1


def test_infill_evaluation_command_refuses_bad_settings_in_one_line(tmp_path, capsys):
    from mgpt.eval import infill as infill_eval

    for argv, message in [([], "usage: python -m mgpt.eval.infill"),
                          ([f"--workdir={tmp_path}", f"--output_dir={tmp_path}", "--min_gap=4", "--max_gap=2"],
                           "--min_gap/--max_gap: need 0 < min <= max"),
                          ([f"--workdir={tmp_path}", f"--output_dir={tmp_path}", "--gaps_per_piece=0"],
                           "--gaps_per_piece must be >= 1"),
                          (["--gaps_per_piece=x"], "gaps_per_piece")]:
        with pytest.raises(SystemExit, match=message) as e:
            infill_eval.main(["mgpt.eval.infill", *argv])
        assert e.value.code == 2 and "\n" not in str(e.value)
    infill_eval.main(["mgpt.eval.infill", "--help"])  # prints the usage and the flags, and returns
    assert "--gaps_per_piece" in capsys.readouterr().out


def test_controls_with_infill_is_one_line_before_the_weights_load(midi_file, tmp_path, monkeypatch):
    from data_prep import controls as data_controls
    from mgpt.sample import run as run_lib

    spec = {"seconds": 1.0, "levels": 8, "edges": {n: [float(i) for i in range(1, 8)] for n in data_controls.BINNED}}
    workdir = _save_run(str(tmp_path / "run"), Vocabulary(STYLES).with_fim().with_controls(spec))

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded before the settings were checked")

    monkeypatch.setattr(run_lib, "load_run", never)
    for flag in ("--controls=density=2", "--mood=calm"):
        with pytest.raises(SystemExit, match="--controls/--mood and --infill cannot be combined yet") as e:
            generate.main(["mgpt.generate", f"--workdir={workdir}", f"--output_dir={tmp_path / 'o'}", "--noprogress",
                           f"--infill={midi_file}", "--infill_start=1", "--infill_end=2", flag])
        assert "\n" not in str(e.value)
