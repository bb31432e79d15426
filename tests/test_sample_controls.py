"""--controls and --mood (mgpt/sample/controls.py): parsing, and the tokens the sampler writes."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from data_prep import controls as data_controls
from data_prep.vocab import Vocabulary
from mgpt.model import GPT, ModelConfig
from mgpt.sample import controls
from mgpt.sample.sampler import generate_tokens
from runs import context_free_model

SPEC = {"seconds": 0.5, "levels": 8, "edges": {name: [float(i) for i in range(1, 8)] for name in data_controls.BINNED}}
VOCAB = Vocabulary(["bach"]).with_controls(SPEC)
PLAIN = Vocabulary(["bach"])
CFG = ModelConfig(vocab_size=VOCAB.size, num_layers=2, num_heads=2, d_model=32, mlp_dim=64, max_len=32,
                  tied_embeddings=False)
STYLE = VOCAB.style_id("bach")


@pytest.fixture(scope="module")
def model():
    return GPT(CFG, rngs=nnx.Rngs(0))


def _groups(row):
    """(step, [control tokens]) for each run of control tokens in a row, at the step it is written."""
    step, out = 0, []
    for i, t in enumerate(np.asarray(row).tolist()):
        name = VOCAB.token_of(t)
        if name.startswith("TIME_SHIFT:"):
            step += int(name.split(":")[1])
        elif name.startswith("CONTROL:"):
            if out and out[-1][2] == i - 1:
                out[-1][1].append(name)
                out[-1][2] = i
            else:
                out.append([step, [name], i])
    return [(s, g) for s, g, _ in out]


def test_an_empty_timeline_samples_byte_identical_pieces(model):
    prompts = [np.array([STYLE])] * 3
    plain = generate_tokens(model, VOCAB, prompts, seeds=[1, 2, 3], max_events=40, temperature=1.2)
    empty = generate_tokens(model, VOCAB, prompts, seeds=[1, 2, 3], max_events=40, temperature=1.2,
                            controls=controls.parse(VOCAB, ""))
    free = generate_tokens(model, VOCAB, prompts, seeds=[1, 2, 3], max_events=40, temperature=1.2,
                           controls=controls.parse(VOCAB, "density=free"))
    for a, b, c in zip(plain, empty, free):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_control_tokens_open_every_segment_of_the_timeline(model, guidance):
    # The untrained model ends pieces early at random: the seeds here reach 3 s drawing as the model
    # does (the density guard, which redraws them, is tested on its own below).
    timeline = controls.parse(VOCAB, "0:density=2,mode=minor;1:density=high,register=3;2.2:density=free",
                              density_guard=False)
    rows = generate_tokens(model, VOCAB, [np.array([STYLE])] * 6, seeds=range(6), max_seconds=3.0, max_events=400,
                           temperature=1.2, controls=timeline, guidance=guidance)
    seg = data_controls.segment_steps(VOCAB)  # 50 steps
    high = controls.level_names(8)["high"]
    for row in rows:
        groups = _groups(row)
        assert groups[0] == (0, ["CONTROL:density=2", "CONTROL:mode=minor"]) and row[1] == VOCAB.control_id("density", 2)
        shifts = [int(VOCAB.token_of(t).split(":")[1]) for t in row if VOCAB.token_of(t).startswith("TIME_SHIFT:")]
        clock = np.cumsum([0] + shifts)
        entered = [0] + [int(b // seg) for a, b in zip(clock[:-1], clock[1:]) if b // seg > a // seg]
        # One group each time the clock enters a segment (a shift past several: the last one's), nowhere else.
        assert [s // seg for s, _ in groups] == entered
        steps = int(clock[-1])
        for s, g in groups:
            k = s // seg
            expected = (["CONTROL:density=2", "CONTROL:mode=minor"] if k < 2 else
                        [f"CONTROL:density={high}", "CONTROL:register=3", "CONTROL:mode=minor"] if k < 5 else
                        ["CONTROL:register=3", "CONTROL:mode=minor"])
            assert g == expected
        assert steps > 2.2 * VOCAB.steps_per_second  # the row reaches the last change (its windows slide: 32 events)


def test_a_piece_depends_only_on_its_seed_and_its_controls(model):
    timeline = controls.parse(VOCAB, "density=3;1:loudness=low")
    prompts = [np.array([STYLE]), np.array([STYLE, VOCAB.velocity_offset + 3, VOCAB.note_on_offset + 40])]
    both = generate_tokens(model, VOCAB, prompts, seeds=[5, 6], max_events=60, controls=timeline)
    alone = generate_tokens(model, VOCAB, prompts[1:], seeds=[6], max_events=60, controls=timeline)
    np.testing.assert_array_equal(both[1], alone[0])
    # The primer is kept; its own length starts the clock: the first group follows it.
    assert both[1][:3].tolist() == prompts[1].tolist() and VOCAB.token_of(both[1][3]) == "CONTROL:density=3"
    # Control tokens are not events of the budget: 60 events besides them.
    assert int(np.sum(~VOCAB.is_control(both[0][1:]))) == 60


@pytest.mark.parametrize("guidance", [1.0, pytest.param(1.5, marks=pytest.mark.slow)])
def test_rows_with_their_own_timelines_sample_as_each_would_alone(model, guidance):
    """The controls cost study asks every piece for its own real piece's timeline in one batch."""
    guards = {g: True for g in ("density_guard", "register_guard", "mode_guard", "polyphony_guard", "scale_guard",
                                "loudness_guard")}
    texts = ["0:density=2,mode=minor;1:register=3,polyphony=4", "", "0:loudness=low;0.5:density=5,mode=major"]
    timelines = [controls.parse(VOCAB, t, **guards) for t in texts]
    prompts = [np.array([STYLE])] * 3
    together = generate_tokens(model, VOCAB, prompts, seeds=[3, 4, 5], max_seconds=2.0, max_events=120,
                               controls=timelines, guidance=guidance)
    for b in range(3):
        alone = generate_tokens(model, VOCAB, prompts[b:b + 1], seeds=[3 + b], max_seconds=2.0, max_events=120,
                                controls=timelines[b], guidance=guidance)
        np.testing.assert_array_equal(together[b], alone[0])
    assert not VOCAB.is_control(together[1]).any() and VOCAB.is_control(together[0]).any()


@pytest.mark.parametrize("text, mood, message", [
    ("tempo=3", None, "--controls: unknown control 'tempo'; known: density, polyphony, register, loudness, mode"),
    ("density=9", None, "--controls: density=9 is out of range; use a level 1..8"),
    ("mode=lydian", None, "--controls: mode=lydian is not a mode"),
    ("0:density=2;20:density=6;10:density=4", None, "--controls: times must increase: 10 s comes after 20 s"),
    ("x:density=2", None, "--controls: 'x:density=2'"),
    (None, "angry", "--mood=angry: unknown mood; known moods: calm, happy, tense, sad"),
])
def test_bad_control_strings_are_one_line_naming_the_problem(text, mood, message):
    with pytest.raises(ValueError) as e:
        controls.parse(VOCAB, text, mood)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_model_without_controls_refuses_them():
    with pytest.raises(ValueError, match="--controls: this model was trained without control tokens"):
        controls.parse(PLAIN, "density=3")
    with pytest.raises(ValueError, match="--mood: this model was trained without control tokens"):
        controls.parse(PLAIN, None, "calm")
    assert controls.parse(PLAIN, "", None).empty


def test_moods_follow_the_table_and_controls_override_them():
    names = controls.level_names(8)
    tense = controls.parse(VOCAB, None, "tense").segment_levels(VOCAB, 1)[0]
    assert dict(zip(data_controls.ATTRIBUTES, tense)) == {
        "density": names["high"], "polyphony": 0, "register": 0, "loudness": names["high"], "mode": 2}
    calm = controls.parse(VOCAB, "density=4;10:mode=free", "calm").segment_levels(VOCAB, 30)
    assert calm[0].tolist() == [4, 0, 0, names["low"], 1] and calm[-1].tolist() == [4, 0, 0, names["low"], 0]
    # A change at T marks the first segment opening at or after T (segments of 0.5 s here).
    t = controls.parse(VOCAB, "0:density=1;1.2:density=5").segment_levels(VOCAB, 5)[:, 0]
    assert t.tolist() == [1, 1, 1, 5, 5]


def test_levels_the_training_data_never_has_are_refused_and_names_take_the_nearest():
    # As on the demo corpus: one velocity (loudness only ever level 4) and chords of 1, 3 or 4 notes.
    seen = {"density": list(range(1, 9)), "polyphony": [1, 3, 5, 6, 7, 8], "register": list(range(1, 9)),
            "loudness": [4], "mode": [1, 2, 3]}
    vocab = Vocabulary(["bach"]).with_controls({**SPEC, "seen": seen})
    with pytest.raises(ValueError, match=r"--controls: polyphony=2 never occurs in this model's training data, so "
                                         r"it cannot have learnt it; use one of 1, 3, 5, 6, 7, 8 or free"):
        controls.parse(vocab, "polyphony=2")
    with pytest.raises(ValueError, match="loudness=7 never occurs"):
        controls.parse(vocab, "0:density=2;20:density=6,loudness=7")
    levels = controls.parse(vocab, "loudness=high,polyphony=low", "tense").segment_levels(vocab, 1)[0]
    assert dict(zip(data_controls.ATTRIBUTES, levels))["loudness"] == 4  # the one level there is
    assert dict(zip(data_controls.ATTRIBUTES, levels))["polyphony"] == 1  # low = 2: 1 and 3 are as near; the lower


def test_under_guidance_the_twin_reads_neither_the_style_nor_the_controls(model):
    # Guidance 0 draws from the twin's logits alone: so its events are those of a piece sampled
    # with STYLE:unknown and no controls, seed for seed (each piece short enough for one window).
    timeline = controls.parse(VOCAB, "0:density=2;0.4:density=7", density_guard=False)  # the model's own draws
    seeds = [3, 4, 5, 6]
    guided = generate_tokens(model, VOCAB, [np.array([STYLE])] * 4, seeds=seeds, max_events=12, temperature=1.3,
                             guidance=0.0, controls=timeline)
    plain = generate_tokens(model, VOCAB, [np.array([VOCAB.unknown_style_id])] * 4, seeds=seeds, max_events=12,
                            temperature=1.3)
    forced = 0
    for g, p in zip(guided, plain):
        assert len(g) < CFG.max_len  # one window
        is_control = VOCAB.is_control(g)
        forced += int(np.sum(is_control[2:]))  # groups after the first: written mid-stream
        np.testing.assert_array_equal(g[1:][~is_control[1:]], p[1:])
    assert forced > 0


def test_steered_guidance_pulls_a_styled_piece_towards_its_style_within_the_controls(model):
    # With a steered guidance, a row with a style has a twin that reads the controls: at 0 its events
    # are drawn from that twin alone, so they are those of a STYLE:unknown piece asked for the same
    # controls, control tokens included, across windows too. In the same batch an unconditional row
    # keeps the job's G (here 0 and 3) and a twin that reads nothing: at 0, within a window, a
    # STYLE:unknown piece asked for nothing.
    timeline = controls.parse(VOCAB, "0:density=2;0.4:density=7", density_guard=False)
    seeds = [3, 4, 5, 6]
    unknown = np.array([VOCAB.unknown_style_id])
    prompts = [np.array([STYLE])] * 2 + [unknown] * 2
    guided = generate_tokens(model, VOCAB, prompts, seeds=seeds, max_events=40, temperature=1.3, guidance=0.0,
                             steered_guidance=0.0, controls=timeline)
    within = generate_tokens(model, VOCAB, [unknown] * 2, seeds=seeds[:2], max_events=40, temperature=1.3,
                             controls=timeline)
    free = generate_tokens(model, VOCAB, [unknown] * 2, seeds=seeds[2:], max_events=40, temperature=1.3)
    for g, w in zip(guided[:2], within):
        assert len(g) > CFG.max_len  # past the first window
        np.testing.assert_array_equal(g[1:], w[1:])
    assert sum(int(np.sum(VOCAB.is_control(g)[2:])) for g in guided[:2]) > 0  # groups written mid-stream too
    for g, f in zip(guided[2:], free):  # within the first window (a twin that skips tokens slides apart)
        first = g[:CFG.max_len]
        events = first[1:][~VOCAB.is_control(first)[1:]]
        np.testing.assert_array_equal(events, f[1:1 + len(events)])
    # Each row its own G: the unconditional rows at 3 now differ, the styled ones at 0 do not.
    mixed = generate_tokens(model, VOCAB, prompts, seeds=seeds, max_events=40, temperature=1.3, guidance=3.0,
                            steered_guidance=0.0, controls=timeline)
    for m, w in zip(mixed[:2], within):
        np.testing.assert_array_equal(m[1:], w[1:])
    assert any(not np.array_equal(m, g) for m, g in zip(mixed[2:], guided[2:]))
    # Without a steered guidance every twin reads neither, as before: the styled rows then differ.
    old = generate_tokens(model, VOCAB, [np.array([STYLE])] * 2, seeds=seeds[:2], max_events=12, temperature=1.3,
                          guidance=0.0, controls=timeline)
    assert any(not np.array_equal(o[1:], w[1:]) for o, w in zip(old, within))
    # With G = 1 (no guidance) it is refused: the plain trace's pieces depend on nothing else in the batch.
    with pytest.raises(ValueError, match="steered_guidance needs guidance"):
        generate_tokens(model, VOCAB, prompts, seeds=seeds, max_events=4, steered_guidance=2.0, controls=timeline)
    with pytest.raises(ValueError, match="steered_guidance must be"):
        generate_tokens(model, VOCAB, [np.array([STYLE])], seeds=[0], max_events=4, guidance=1.5,
                        steered_guidance=-1.0, controls=timeline)


def _contrast_vocab(by_style=True):
    """Three styles whose training segments favour density levels 2 (folk) and 7 (palestrina); bach's spread."""
    def counts(density):
        out = {name: [0] * (4 if name == "mode" else 9) for name in data_controls.ATTRIBUTES}
        out["density"] = density
        return out

    spec = {**SPEC, "by_style": {"bach": counts([0] + [5] * 8), "folk": counts([0, 1, 30] + [1] * 6),
                                 "palestrina": counts([0] + [1] * 6 + [30, 1])}}
    if not by_style:
        spec.pop("by_style")
    return Vocabulary(["bach", "folk", "palestrina"]).with_controls(spec)


def test_the_contrast_style_is_the_other_style_the_controls_suggest():
    vocab = _contrast_vocab()
    ids = {s: vocab.style_id(s) for s in ("bach", "folk", "palestrina")}
    prompts = [np.array([ids[s]]) for s in ("bach", "folk", "palestrina")] + [np.array([vocab.unknown_style_id])]
    busy, sparse = controls.parse(vocab, "density=7", None), controls.parse(vocab, "density=2", None)
    assert controls.contrast_styles(vocab, prompts, busy, 4) == [ids["palestrina"], ids["palestrina"], ids["bach"],
                                                                 vocab.unknown_style_id]
    assert controls.contrast_styles(vocab, prompts, sparse, 4) == [ids["folk"], ids["bach"], ids["folk"],
                                                                   vocab.unknown_style_id]
    # Over a timeline the segments add up: three busy segments outweigh one sparse one.
    turning = controls.parse(vocab, "0:density=2;0.5:density=7", None)
    assert controls.contrast_styles(vocab, prompts[:1], [turning], 4) == [ids["palestrina"]]
    assert controls.contrast_styles(vocab, prompts[:1], [turning], 1) == [ids["folk"]]
    # A row asked for nothing has none; nor has a model trained before the counts were stored.
    assert controls.contrast_styles(vocab, prompts[:1], [controls.Timeline()], 4) == [vocab.unknown_style_id]
    assert controls.contrast_styles(_contrast_vocab(by_style=False), prompts, busy, 4) is None


def test_contrast_style_pairs_are_checked():
    vocab = _contrast_vocab()
    assert controls.parse_contrast(vocab, "") is None and controls.parse_contrast(vocab, " AUTO ") == "auto"
    assert controls.parse_contrast(vocab, "bach:folk, palestrina:bach") == {
        vocab.style_id("bach"): vocab.style_id("folk"), vocab.style_id("palestrina"): vocab.style_id("bach")}
    for text, message in [("bach", "expected 'auto' or STYLE:OTHER pairs"), ("bach:mozart", "unknown style 'mozart'"),
                          ("bach:bach", "bach is contrasted with itself"), ("bach:folk,bach:palestrina", "given twice")]:
        with pytest.raises(ValueError, match=message):
            controls.parse_contrast(vocab, text)


def test_contrast_style_draws_away_from_the_contrast_style():
    # At G = 0 a steered row's events are drawn from its twin alone: with the contrast style on, that
    # twin reads the controls and the contrast style, so a bach row asked for palestrina's density
    # writes what a palestrina piece asked for the same controls writes, across windows too.
    vocab = _contrast_vocab()
    model = GPT(dataclasses.replace(CFG, vocab_size=vocab.size), rngs=nnx.Rngs(1))
    timeline = controls.parse(vocab, "density=7", None, density_guard=False)
    bach, palestrina = np.array([vocab.style_id("bach")]), np.array([vocab.style_id("palestrina")])
    unknown = np.array([vocab.unknown_style_id])
    seeds = [3, 4, 5]
    kw = dict(seeds=seeds, max_events=40, temperature=1.3, controls=timeline)
    away = generate_tokens(model, vocab, [bach, bach, unknown], guidance=0.0, contrast_style="auto", **kw)
    twin = generate_tokens(model, vocab, [palestrina] * 2, **{**kw, "seeds": seeds[:2]})
    for a, t in zip(away[:2], twin):
        assert len(a) > CFG.max_len
        np.testing.assert_array_equal(a[1:], t[1:])
    # Given as pairs (bach's contrast: palestrina), the same pieces; a style not named keeps its old twin.
    pairs = controls.parse_contrast(vocab, "bach:palestrina")
    np.testing.assert_array_equal(generate_tokens(model, vocab, [bach], guidance=0.0, contrast_style=pairs,
                                                  **{**kw, "seeds": seeds[:1]})[0], away[0])
    folk = generate_tokens(model, vocab, [np.array([vocab.style_id("folk")])], guidance=0.0, contrast_style=pairs,
                           **{**kw, "seeds": seeds[:1]})
    np.testing.assert_array_equal(folk[0], generate_tokens(model, vocab, [np.array([vocab.style_id("folk")])],
                                                           guidance=0.0, **{**kw, "seeds": seeds[:1]})[0])
    # Off, the twin reads neither style nor controls, as before; the unconditional row is the same either way.
    before = generate_tokens(model, vocab, [bach, bach, unknown], guidance=0.0, **kw)
    assert any(not np.array_equal(b[1:], t[1:]) for b, t in zip(before[:2], twin))
    np.testing.assert_array_equal(before[2], away[2])
    # A model without per-style counts, or of one style, has no contrast style: pieces as without it.
    for v in (_contrast_vocab(by_style=False), VOCAB):
        m = model if v.size == vocab.size else GPT(CFG, rngs=nnx.Rngs(1))
        t = controls.parse(v, "density=7", None, density_guard=False)
        p = [np.array([v.style_id("bach")])] * 2
        on = generate_tokens(m, v, p, seeds=seeds[:2], max_events=12, guidance=1.5, controls=t, contrast_style="auto")
        off = generate_tokens(m, v, p, seeds=seeds[:2], max_events=12, guidance=1.5, controls=t)
        for a, b in zip(on, off):
            np.testing.assert_array_equal(a, b)


def _eager_model(sparse: bool = False, vocab=VOCAB, on: float = 2.0, off: float = 0.0, high_from: int | None = None):
    """Preferences that ignore the context and lean towards many notes (NOTE_ONs at `on`, short
    shifts), or with `sparse` towards few (long shifts); NOTE_OFFs at `off`; pitches from `high_from`
    up (MIDI) at 5, far above the rest. Never EOS."""
    pref_V = np.zeros(vocab.size, np.float32)
    pref_V[vocab.note_on_offset:vocab.note_off_offset] = on
    pref_V[vocab.note_off_offset:vocab.time_shift_offset] = off
    if high_from is not None:
        pref_V[vocab.note_on_offset + high_from - vocab.min_pitch:vocab.note_off_offset] = 5.0
    pref_V[vocab.time_shift_offset:vocab.time_shift_offset + 10] = 3.0
    if sparse:
        pref_V[vocab.note_on_offset:vocab.note_off_offset] = -2.0
        pref_V[vocab.time_shift_offset + 60:vocab.velocity_offset] = 6.0
    pref_V[vocab.eos_id] = -100.0
    return context_free_model(CFG, pref_V)


def _within_one(vocab, spec, rows, name, asked_S, within=1):
    """The share of the rows' segments whose control `name`, measured on their decoded notes, lies
    within `within` levels of the one asked for (asked_S: per segment, the same for every row)."""
    at = data_controls.ATTRIBUTES.index(name)
    levels = np.concatenate([data_controls.segment_levels(vocab.decode_notes(r), spec, len(asked_S))[:, at]
                             for r in rows])
    return np.mean(np.abs(levels - np.tile(asked_S, len(rows))) <= within)


def _notes_per_segment(row):
    seg = data_controls.segment_steps(VOCAB)
    step, counts = 0, {}
    for t in np.asarray(row).tolist():
        if VOCAB.time_shift_offset <= t < VOCAB.velocity_offset:
            step += t - VOCAB.time_shift_offset + 1
        elif VOCAB.note_on_offset <= t < VOCAB.note_off_offset:
            counts[step // seg] = counts.get(step // seg, 0) + 1
    return counts, step // seg


def test_the_density_guard_holds_every_segment_to_its_level():
    """Asked for a density level, no segment strikes more notes than that level allows, or fewer
    than it needs, at any guidance and across window slides; with the guard off the same models
    play far more, and far fewer."""
    model = _eager_model()
    floors, caps = data_controls.density_bounds(VOCAB.controls)
    timeline = "0:density=2;1:density=4;2:density=free"  # segments of 0.5 s: 0-1 level 2, 2-3 level 4
    kw = dict(seeds=range(6), max_seconds=3.0, max_events=600, temperature=1.0)
    for guidance in (1.0, 1.5):
        rows = generate_tokens(model, VOCAB, [np.array([STYLE])] * 6, guidance=guidance,
                               controls=controls.parse(VOCAB, timeline), **kw)
        for row in rows:
            counts, last = _notes_per_segment(row)
            assert last >= 4  # the pieces reach the free segments (several windows of 32)
            assert all(counts.get(k, 0) <= caps[2] for k in (0, 1))
            assert all(counts.get(k, 0) <= caps[4] for k in (2, 3))
    raw = generate_tokens(model, VOCAB, [np.array([STYLE])] * 6, guidance=1.0,
                          controls=controls.parse(VOCAB, timeline, density_guard=False), **kw)
    assert max(_notes_per_segment(r)[0].get(0, 0) for r in raw) > caps[2]
    # A primer's notes in its last segment count towards that segment's cap: a primer already past it
    # gets no more notes there.
    primer = np.array([STYLE] + [VOCAB.note_on_offset + p for p in (10, 14, 17)], np.int32)
    assert caps[2] < 3
    (row,) = generate_tokens(model, VOCAB, [primer], controls=controls.parse(VOCAB, "density=2"), **{**kw, "seeds": [0]})
    counts, _ = _notes_per_segment(row)
    assert counts[0] == 3 and all(n <= caps[2] for k, n in counts.items() if k > 0)
    # A model that would rather wait plays as many notes as a dense level needs in every whole segment.
    sparse = _eager_model(sparse=True)
    assert floors[6] == 3
    for guard, ok in ((True, True), (False, False)):
        rows = generate_tokens(sparse, VOCAB, [np.array([STYLE])] * 4, controls=controls.parse(
            VOCAB, "density=6", density_guard=guard), **{**kw, "seeds": range(4)})
        whole = [_notes_per_segment(r)[0].get(k, 0) >= floors[6] for r in rows for k in range(5)]
        assert all(whole) if ok else not any(whole)
    # Levels 3, 5 and 7 are no count of notes in 0.5 s here: they take the count below them.
    assert [(floors[k], caps[k]) for k in (3, 5, 7)] == [(1, 1), (2, 2), (3, 3)]


def test_the_density_guard_keeps_a_piece_going_until_the_notes_its_timeline_asks_for():
    """A model eager to end, asked to open sparse (no fewest notes) and turn dense, plays the dense
    segments in full rather than ending in the opening (an empty MIDI file); the guard off, it ends
    there. Where no later segment asks for notes, it still ends when it likes."""
    floors, _ = data_controls.density_bounds(VOCAB.controls)
    assert floors[1] == 0 and floors[6] == 3
    pref_V = np.zeros(VOCAB.size, np.float32)
    pref_V[VOCAB.eos_id] = 8.0  # nine in ten draws where it may end
    ending = context_free_model(CFG, pref_V)
    kw = dict(seeds=range(4), max_seconds=2.0, max_events=600, temperature=1.0)
    timeline = "0:density=1;1:density=6"  # segments of 0.5 s: 0-1 level 1, 2-3 level 6

    def sample(text, guard=True):
        return [_notes_per_segment(r) for r in generate_tokens(
            ending, VOCAB, [np.array([STYLE])] * 4, controls=controls.parse(VOCAB, text, density_guard=guard), **kw)]

    assert all(counts.get(2, 0) >= 3 and counts.get(3, 0) >= 3 for counts, _ in sample(timeline))
    assert all(sum(counts.values()) <= 1 and last <= 1 for counts, last in sample(timeline, guard=False))
    assert all(last <= 1 for _, last in sample("0:density=6;1:density=free"))
    assert all(last <= 1 for _, last in sample("density=1"))
    # Drawn a segment at a time (--control_tries), each draw reaching a second past its segment: the
    # quiet opening is longer than that, and no draw ends the piece there either.
    from mgpt.sample.run import Run, Sampling

    late = "0:density=1;2:density=6"  # segments 0-3 level 1, 4-5 level 6
    rows = Run(model=ending, vocab=VOCAB).sample_ids(
        [np.array([STYLE], np.int32)] * 2, [0, 1], Sampling(max_seconds=3.0, max_note_seconds=0, guidance=1.0,
                                                            controls=late, control_tries=4))
    assert all(c.get(4, 0) >= 3 and c.get(5, 0) >= 3 for c, _ in map(_notes_per_segment, rows))


def test_a_guard_cornered_by_a_hard_limit_leaves_the_piece_playing_within_the_limit():
    """The density guard owing a note on a segment's last step, --max_polyphony=1 forbidding it and
    the note struck just now kept sounding: no event is left, and the row used to write PAD until its
    budget ran out. That event is drawn under the hard limit alone: no PAD, the limit holds."""
    from mgpt.sample.limits import HardLimits

    pref_V = np.zeros(VOCAB.size, np.float32)  # strikes and holds notes, with long shifts between
    pref_V[VOCAB.note_on_offset:VOCAB.note_off_offset] = 3.0
    pref_V[VOCAB.note_off_offset:VOCAB.time_shift_offset] = -3.0
    pref_V[VOCAB.time_shift_offset + 20:VOCAB.velocity_offset] = 4.0
    rows = generate_tokens(context_free_model(CFG, pref_V), VOCAB, [np.array([STYLE])] * 6, seeds=range(6),
                           max_seconds=3.0, max_events=300, max_note_seconds=0,
                           controls=controls.parse(VOCAB, "density=6"), hard_limits=HardLimits(max_polyphony=1))
    for row in rows:
        assert VOCAB.pad_id not in np.asarray(row).tolist()
        sounding = 0
        for t in np.asarray(row).tolist():
            if VOCAB.note_on_offset <= t < VOCAB.note_off_offset:
                assert sounding == 0
                sounding += 1
            elif VOCAB.note_off_offset <= t < VOCAB.time_shift_offset:
                sounding -= 1
    assert sum(sum(_notes_per_segment(r)[0].values()) for r in rows) >= 6 * 6  # the guard still acts


def _register_breaches(vocab, spec, row, asked_S):
    """(notes checked, breaches of the register guard's rule) in a row: a NOTE_ON that leaves its
    segment's mean pitch more than one level from the asked one, and further than before (a first
    note: more than one level), when some silent pitch would not have."""
    edges = np.asarray(spec["edges"]["register"])
    seg = data_controls.segment_steps(vocab)

    def level(mean):
        return 1 + (np.sum(edges < mean) + np.sum(edges <= mean)) // 2

    step, notes, total, sounding, checked, breaches = 0, 0, 0, set(), 0, 0
    for t in np.asarray(row).tolist():
        if vocab.time_shift_offset <= t < vocab.velocity_offset:
            if (step + t - vocab.time_shift_offset + 1) // seg > step // seg:
                notes = total = 0
            step += t - vocab.time_shift_offset + 1
        elif vocab.note_off_offset <= t < vocab.time_shift_offset:
            sounding.discard(t - vocab.note_off_offset + vocab.min_pitch)
        elif vocab.note_on_offset <= t < vocab.note_off_offset:
            pitch, k = t - vocab.note_on_offset + vocab.min_pitch, step // seg
            if k < len(asked_S):
                before = abs(level(total / notes) - asked_S[k]) if notes else 1
                allowed = max(before, 1, min(abs(level((total + p) / (notes + 1)) - asked_S[k])
                                             for p in range(vocab.min_pitch, vocab.max_pitch + 1) if p not in sounding))
                checked += 1
                breaches += abs(level((total + pitch) / (notes + 1)) - asked_S[k]) > allowed
            notes, total = notes + 1, total + pitch
            sounding.add(pitch)
    return checked, breaches


def test_the_register_guard_brings_every_segments_mean_pitch_back_to_its_level():
    """Asked for a register level with the guard on, no note leaves a segment's mean pitch more than
    one level away and further than it was, at any guidance and across window slides, from a model
    that leans to the top of the keyboard; with the guard off the same model breaks that often, and
    plays its segments far above the level (measured on the decoded notes, as the evaluation does)."""
    spec = {**SPEC, "edges": {**SPEC["edges"], "register": [40.0, 48.0, 55.0, 60.0, 65.0, 72.0, 80.0]}}
    vocab = Vocabulary(["bach"]).with_controls(spec)
    assert vocab.size == VOCAB.size
    model = _eager_model(vocab=vocab, high_from=90)
    timeline = "0:register=2;1:register=6;2:register=free"  # segments of 0.5 s: 0-1 level 2, 2-3 level 6
    asked_S = [2, 2, 6, 6]
    kw = dict(seeds=range(6), max_seconds=3.0, max_events=600, temperature=1.0)
    at = data_controls.ATTRIBUTES.index("register")
    for guidance in (1.0, 1.5):
        rows = generate_tokens(model, vocab, [np.array([STYLE])] * 6, guidance=guidance,
                               controls=controls.parse(vocab, timeline, register_guard=True), **kw)
        counts = [_register_breaches(vocab, spec, row, asked_S) for row in rows]
        assert sum(c for c, _ in counts) >= 30 and sum(b for _, b in counts) == 0
        assert all(_notes_per_segment(row)[1] >= 4 for row in rows)  # several windows of 32
    raw = generate_tokens(model, vocab, [np.array([STYLE])] * 6, guidance=1.0,
                          controls=controls.parse(vocab, timeline, register_guard=False), **kw)
    assert sum(_register_breaches(vocab, spec, row, asked_S)[1] for row in raw) >= 10
    heard = [x for r in raw for x in data_controls.segment_levels(vocab.decode_notes(r), spec)[:2, at] if x > 0]
    assert heard and np.median(heard) >= 7  # mostly up there, not at level 2

    # A pitch range the asked level cannot reach: the guard leaves the notes that come nearest, never none.
    from mgpt.sample.limits import HardLimits

    rows = generate_tokens(model, vocab, [np.array([STYLE])] * 3, controls=controls.parse(vocab, "register=1",
                           register_guard=True), hard_limits=HardLimits(pitch_range=(60, 84)),
                           **{**kw, "seeds": range(3)})
    firsts = []
    for row in rows:
        pitches = [t - vocab.note_on_offset + vocab.min_pitch for t in row.tolist()
                   if vocab.note_on_offset <= t < vocab.note_off_offset]
        assert all(60 <= p <= 84 for p in pitches)
        firsts += pitches[:1]
    assert len(firsts) >= 2 and set(firsts) == {60}  # it opens on the lowest the range allows


def test_a_primers_notes_in_its_last_segment_start_the_guards_counts():
    """The guards count a primer's notes struck in the segment it ends in, and the sum of their pitch
    indices, and its onsets there; notes of earlier segments do not count."""
    seg = data_controls.segment_steps(VOCAB)
    on = [VOCAB.note_on_offset + i for i in (10, 14, 20)]
    primer = [STYLE, on[0], *[VOCAB.time_shift_offset + seg - 1], on[1], on[2], VOCAB.time_shift_offset + 3]
    assert controls.notes_in_last_segment(VOCAB, primer) == (2, 34)
    assert controls.notes_in_last_segment(VOCAB, primer[:2]) == (1, 10)
    assert controls.notes_in_last_segment(VOCAB, []) == (0, 0)
    # The polyphony guard: the onsets of the last segment before the primer's last step, and the notes
    # sounding at each (an onset at the last step is the sampler's current one, RowState.onset_BxP).
    shift = VOCAB.time_shift_offset - 1
    off = VOCAB.note_off_offset
    primer = [STYLE, on[0], on[1], shift + seg - 1, shift + 11, on[2], shift + 5, off + 10, on[0] + 1]
    assert controls.onsets_in_last_segment(VOCAB, primer) == (1, 3)
    assert controls.onsets_in_last_segment(VOCAB, primer[:4]) == (1, 2)  # still in segment 0
    assert controls.onsets_in_last_segment(VOCAB, primer[:5]) == (0, 0)  # segment 0's onset is not segment 1's


def test_the_mode_guard_reads_a_segments_mode_as_the_evaluation_does():
    """The guard's fit of each mode is positive exactly where data_prep.controls.mode_of reads that
    mode, and its histogram of a primer's last segment is the evaluation's: how long each pitch class
    sounded there (a chord's notes each counted, notes struck before the segment from its opening)."""
    rng = np.random.default_rng(0)
    hists = np.zeros((400, 12), np.float32)
    for h in hists:
        k = int(rng.integers(1, 9))
        h[rng.choice(12, k, replace=False)] = rng.integers(1, 60, k)
    hists[0] = 0  # nothing sounded: none
    fit = np.asarray(controls.mode_fit(hists))
    wanted = np.asarray([data_controls.mode_of(h) for h in hists])
    clear = np.sort(fit, axis=1)[:, -1] > 1e-4  # float32 against float64: leave out exact ties
    assert clear.sum() >= 380
    assert np.array_equal(np.argmax(fit, axis=1)[clear] + 1, wanted[clear])
    assert np.all((fit > 0).sum(axis=1)[clear] == 1)

    seg = data_controls.segment_steps(VOCAB)
    on, off = VOCAB.note_on_offset - VOCAB.min_pitch, VOCAB.note_off_offset - VOCAB.min_pitch  # + MIDI pitch
    shift = VOCAB.time_shift_offset - 1  # + steps
    # C4 and E4 struck in segment 0; E4 released 10 steps into segment 1; G4 struck there, still sounding.
    primer = [STYLE, on + 60, on + 64, shift + seg - 5, shift + 15, off + 64, on + 67, shift + 20]
    time_12 = controls.pitch_class_time_in_last_segment(VOCAB, primer)
    notes = VOCAB.decode_notes(primer)
    seconds = seg / VOCAB.steps_per_second
    overlap = np.clip(np.minimum(notes.end_s, 2 * seconds) - np.maximum(notes.start_s, seconds), 0, None)
    expected = np.bincount(np.asarray(notes.pitch) % 12, weights=overlap, minlength=12) * VOCAB.steps_per_second
    np.testing.assert_allclose(time_12, expected, atol=1e-3)
    assert time_12[0] == 30 and time_12[4] == 10 and time_12[7] == 20


MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)


def _mode_breaches(vocab, row, asked_S, scale=False):
    """(notes checked, breaches of the mode guard's rule) in a row: a NOTE_ON whose pitch class,
    weighed as the guard weighs it, leaves its segment's histogram outside the asked mode and further
    outside than it was, when some silent pitch would have done better. With `scale` (the scale
    guard), once the row has struck SCALE_KNOWN_NOTES notes: a note outside the one seven-note scale
    holding most of them (none, while two hold as many) that leaves the segment outside the mode at all, while a silent pitch of
    the scale is left, and the better pitch is sought in the scale."""
    seg = data_controls.segment_steps(vocab)
    weight = seg / controls.MODE_NOTE_SHARE
    step, time_12, sounding, checked, breaches = 0, np.zeros(12), [], 0, 0
    struck_12 = np.zeros(12)
    for t in np.asarray(row).tolist():
        if vocab.time_shift_offset <= t < vocab.velocity_offset:
            new = step + t - vocab.time_shift_offset + 1
            since = new - (new // seg) * seg if new // seg > step // seg else new - step
            if new // seg > step // seg:
                time_12 = np.zeros(12)
            for p in sounding:
                time_12[p % 12] += since
            step = new
        elif vocab.note_off_offset <= t < vocab.time_shift_offset:
            p = t - vocab.note_off_offset + vocab.min_pitch
            if p in sounding:
                sounding.remove(p)
        elif vocab.note_on_offset <= t < vocab.note_off_offset:
            pitch, k = t - vocab.note_on_offset + vocab.min_pitch, step // seg
            if k < len(asked_S) and asked_S[k]:
                def fit(histogram_12):
                    return float(np.asarray(controls.mode_fit(histogram_12[None].astype(np.float32)))[0, asked_S[k] - 1])

                scale_12 = np.ones(12, bool)
                held = sorted((sum(struck_12[(d + r) % 12] for d in MAJOR_SCALE), -r) for r in range(12))
                if scale and struck_12.sum() >= controls.SCALE_KNOWN_NOTES and held[-1][0] > held[-2][0]:
                    scale_12 = np.isin(np.arange(12), (np.asarray(MAJOR_SCALE) - held[-1][1]) % 12)
                silent = [p for p in range(vocab.min_pitch, vocab.max_pitch + 1) if p not in sounding]
                if not any(scale_12[p % 12] for p in silent):
                    scale_12 = np.ones(12, bool)  # nothing of the scale left to strike: it is not held
                before = fit(time_12)
                each_12 = np.asarray(controls.mode_fit((time_12[None] + weight * np.eye(12)).astype(np.float32)))
                each_12 = each_12[:, asked_S[k] - 1]  # the fit after striking each pitch class
                best = max(each_12[p % 12] for p in silent if scale_12[p % 12])
                after = each_12[pitch % 12]
                checked += 1
                breaches += after < -1e-4 and (not scale_12[pitch % 12] or (after < before - 1e-4 and after < best - 1e-4))
            sounding.append(pitch)
            struck_12[pitch % 12] += 1
    return checked, breaches


def test_the_mode_guard_keeps_every_segments_pitch_classes_towards_its_mode():
    """Asked for a mode with the guard on, no note moves a segment's pitch classes further outside that
    mode than they were (by the evaluation's key-finding rule), at any guidance and across window
    slides, from a model that strikes any pitch alike; its segments then measure the mode asked for
    far more often than the raw model's (measured on the decoded notes, as the evaluation does)."""
    model = _eager_model()
    timeline = "0:mode=major;1:mode=minor;2:mode=free"  # segments of 0.5 s: 0-1 major, 2-3 minor
    asked_S = [1, 1, 2, 2]
    kw = dict(seeds=range(6), max_seconds=2.0, max_events=400, temperature=1.0)

    def measured(rows):  # exact: modes have no order
        return _within_one(VOCAB, SPEC, rows, "mode", asked_S, within=0)

    guarded = []
    for guidance in (1.0, 1.5):
        rows = generate_tokens(model, VOCAB, [np.array([STYLE])] * 6, guidance=guidance,
                               controls=controls.parse(VOCAB, timeline, mode_guard=True), **kw)
        counts = [_mode_breaches(VOCAB, row, asked_S) for row in rows]
        assert sum(c for c, _ in counts) >= 30 and sum(b for _, b in counts) == 0
        assert all(_notes_per_segment(row)[1] >= 3 for row in rows)  # several windows of 32
        guarded.append(measured(rows))
    raw = generate_tokens(model, VOCAB, [np.array([STYLE])] * 6, guidance=1.0,
                          controls=controls.parse(VOCAB, timeline), **kw)
    assert sum(_mode_breaches(VOCAB, row, asked_S)[1] for row in raw) >= 10
    assert min(guarded) >= 0.55 and min(guarded) >= measured(raw) + 0.3  # 0.62 and 0.25 when written


def _out_of_scale(row):
    """The share of a row's notes outside the seven-note scale holding most of them."""
    pcs = np.bincount(np.asarray(VOCAB.decode_notes(row).pitch) % 12, minlength=12)
    held = max(sum(pcs[(d + r) % 12] for d in MAJOR_SCALE) for r in range(12))
    return 1 - held / max(pcs.sum(), 1)


def test_the_scale_guard_steers_the_mode_through_the_pieces_own_scale():
    """With the scale guard, a segment asked for a mode reaches it through the notes of the piece's
    scale: no note breaks the rule across windows (G = 1.5, the default), the rows keep more to one
    scale than with the mode guard alone, and their segments still measure the mode asked for far
    more often than the raw model's. Without the mode guard it changes nothing."""
    model = _eager_model()
    timeline = "0:mode=major;1:mode=minor;2:mode=free"
    asked_S = [1, 1, 2, 2]
    kw = dict(seeds=range(6), max_seconds=2.0, max_events=400, temperature=1.0)

    def measured(rows):  # exact: modes have no order
        return _within_one(VOCAB, SPEC, rows, "mode", asked_S, within=0)

    def sample(guidance, **guards):
        return generate_tokens(model, VOCAB, [np.array([STYLE])] * 6, guidance=guidance,
                               controls=controls.parse(VOCAB, timeline, **guards), **kw)

    rows = sample(1.5, mode_guard=True, scale_guard=True)
    counts = [_mode_breaches(VOCAB, row, asked_S, scale=True) for row in rows]
    assert sum(c for c, _ in counts) >= 30 and sum(b for _, b in counts) == 0
    mode_only = sample(1.5, mode_guard=True)
    assert sum(_mode_breaches(VOCAB, row, asked_S, scale=True)[1] for row in mode_only) >= 5
    outside, outside_mode_only = (np.mean([_out_of_scale(r) for r in rs]) for rs in (rows, mode_only))
    assert outside <= 0.8 * outside_mode_only, (outside, outside_mode_only)
    raw = sample(1.5)
    assert measured(rows) >= measured(raw) + 0.2, (measured(rows), measured(raw))
    assert sample(1.5, scale_guard=True)[0].tolist() == raw[0].tolist()  # nothing without the mode guard


def test_the_loudness_guard_keeps_every_velocity_near_the_level_asked_for():
    """Asked for a loudness level with the guard on, no VELOCITY lies more than one level from it, at
    any guidance and across windows, from a model that changes velocity often and to any; the raw
    model's do; the segments' mean velocity (read from the decoded notes) is within one level far
    more often. Asked for no loudness, the guard changes nothing."""
    spec = {**SPEC, "edges": {**SPEC["edges"], "loudness": [30.0, 45.0, 60.0, 70.0, 80.0, 90.0, 105.0]}}
    vocab = Vocabulary(["bach"]).with_controls(spec)
    pref_V = np.zeros(vocab.size, np.float32)
    pref_V[vocab.note_on_offset:vocab.note_off_offset] = 2.0
    pref_V[vocab.time_shift_offset:vocab.time_shift_offset + 10] = 3.0
    pref_V[vocab.velocity_offset:vocab.style_offset] = 1.5
    pref_V[vocab.eos_id] = -100.0
    model = context_free_model(CFG, pref_V)
    timeline = "0:loudness=2;1:loudness=7"  # segments of 0.5 s: 0-1 level 2, 2-3 level 7
    asked_S = [2, 2, 7, 7]
    edges = np.asarray(spec["edges"]["loudness"])
    kw = dict(seeds=range(6), max_seconds=2.0, max_events=400, temperature=1.0)

    def breaches(row):
        step, checked, bad = 0, 0, 0
        for t in np.asarray(row).tolist():
            if vocab.time_shift_offset <= t < vocab.velocity_offset:
                step += t - vocab.time_shift_offset + 1
            elif vocab.velocity_offset <= t < vocab.style_offset and step // data_controls.segment_steps(vocab) < 4:
                v = float(vocab.bin_to_velocity(t - vocab.velocity_offset + 1))
                level = 1 + (np.sum(edges < v) + np.sum(edges <= v)) // 2
                checked += 1
                bad += abs(level - asked_S[step // data_controls.segment_steps(vocab)]) > 1
        return checked, bad

    def within_one(rows):
        return _within_one(vocab, spec, rows, "loudness", asked_S)

    guarded = []
    for guidance in (1.0, 1.5):
        rows = generate_tokens(model, vocab, [np.array([STYLE])] * 6, guidance=guidance,
                               controls=controls.parse(vocab, timeline, loudness_guard=True), **kw)
        counts = [breaches(r) for r in rows]
        assert sum(c for c, _ in counts) >= 10 and sum(b for _, b in counts) == 0
        assert all(len(r) > CFG.max_len for r in rows)  # past a window of 32
        guarded.append(within_one(rows))
    raw = generate_tokens(model, vocab, [np.array([STYLE])] * 6, guidance=1.0,
                          controls=controls.parse(vocab, timeline), **kw)
    assert sum(breaches(r)[1] for r in raw) >= 10
    assert min(guarded) >= within_one(raw) + 0.15, (guarded, within_one(raw))  # 0.42 and 0.21 when written
    free = dict(controls=controls.parse(vocab, "density=4"), **{**kw, "seeds": [0]})
    assert (generate_tokens(model, vocab, [np.array([STYLE])], **free)[0].tolist()
            == generate_tokens(model, vocab, [np.array([STYLE])], **{**free, "controls": controls.parse(
                vocab, "density=4", loudness_guard=True)})[0].tolist())


def test_the_loudness_guard_and_a_velocity_range_together_keep_the_piece_playing():
    """A velocity range hands the mass of the notes it mutes to the allowed VELOCITY nearest the one
    in force; where the loudness guard masks that one (the demo corpus: every velocity 77, so 73 is
    three levels from 77's), the mass goes to the nearest VELOCITY both allow, and the piece plays at
    a velocity both accept instead of going quiet."""
    from mgpt.sample.limits import HardLimits

    spec = {**SPEC, "edges": {**SPEC["edges"], "loudness": [77.0] * 7}}
    vocab = Vocabulary(["bach"]).with_controls(spec)
    pref_V = np.zeros(vocab.size, np.float32)
    pref_V[vocab.note_on_offset:vocab.note_off_offset] = 2.0
    pref_V[vocab.time_shift_offset:vocab.time_shift_offset + 10] = 1.0
    pref_V[vocab.velocity_offset:vocab.style_offset] = -6.0  # the model hardly ever changes velocity itself
    pref_V[vocab.eos_id] = -100.0
    model = context_free_model(CFG, pref_V)
    rows = generate_tokens(model, vocab, [np.array([STYLE])] * 4, seeds=range(4), max_seconds=2.0, max_events=200,
                           temperature=1.0, hard_limits=HardLimits(velocity_range=(70, 127)),
                           controls=controls.parse(vocab, "loudness=4", loudness_guard=True))
    for row in rows:
        notes = vocab.decode_notes(row)
        assert len(notes.pitch) >= 5  # it plays (11 notes in the first piece; none before the fix)
        assert set(np.asarray(notes.velocity).tolist()) == {77}


def _polyphony_breaches(vocab, spec, row, asked_S):
    """(events checked, breaches of the polyphony guard's rule) in a row: a NOTE_ON that takes its
    segment's mean polyphony more than one level above the asked one and further than it was, or a
    TIME_SHIFT that closes an onset too thin by that rule while a note could still be struck."""
    edges = np.asarray(spec["edges"]["polyphony"])
    seg = data_controls.segment_steps(vocab)

    def miss(value, asked):
        return abs(1 + (np.sum(edges < value) + np.sum(edges <= value)) // 2 - asked)

    def level(value):
        return 1 + (np.sum(edges < value) + np.sum(edges <= value)) // 2

    step, onsets, total, sounding, here, checked, breaches = 0, 0, 0, set(), False, 0, 0
    for t in np.asarray(row).tolist():
        asked = asked_S[step // seg] if step // seg < len(asked_S) else 0
        closed = miss(total / onsets, asked) if onsets else 1
        now = miss((total + len(sounding)) / (onsets + 1), asked) if here else closed
        struck = (total + len(sounding) + 1) / (onsets + 1)
        too_thick = miss(struck, asked) > max(now, 1) and level(struck) > asked
        if vocab.time_shift_offset <= t < vocab.velocity_offset:
            if asked and here:
                checked += 1
                thin = level((total + len(sounding)) / (onsets + 1)) < asked
                strikable = not too_thick and len(sounding) < vocab.max_pitch - vocab.min_pitch + 1
                breaches += thin and now > max(closed, 1) and strikable
            new = step + t - vocab.time_shift_offset + 1
            if here:
                onsets, total = onsets + 1, total + len(sounding)
            if new // seg > step // seg:
                onsets = total = 0
            step, here = new, False
        elif vocab.note_off_offset <= t < vocab.time_shift_offset:
            sounding.discard(t - vocab.note_off_offset)
        elif vocab.note_on_offset <= t < vocab.note_off_offset:
            if asked:
                checked += 1
                breaches += too_thick
            sounding.add(t - vocab.note_on_offset)
            here = True
    return checked, breaches


def test_the_polyphony_guard_keeps_every_segments_onsets_near_their_level():
    """Asked for a polyphony level with the guard on, no onset takes a segment's mean polyphony more
    than one level from it and further than it was (chords too thick are not struck, too thin ones
    are not left), at any guidance and across window slides, from a model that strikes and releases
    at random; its segments then measure within one level far more often than the raw model's."""
    model = _eager_model(off=1.0)
    timeline = "0:polyphony=2;1:polyphony=6;2:polyphony=free"  # segments of 0.5 s: 0-1 level 2, 2-3 level 6
    asked_S = [2, 2, 6, 6]
    kw = dict(seeds=range(6), max_seconds=3.0, max_events=600, temperature=1.0)

    def within_one(rows):
        return _within_one(VOCAB, SPEC, rows, "polyphony", asked_S)

    guarded = []
    for guidance in (1.0, 1.5):
        rows = generate_tokens(model, VOCAB, [np.array([STYLE])] * 6, guidance=guidance,
                               controls=controls.parse(VOCAB, timeline, polyphony_guard=True), **kw)
        counts = [_polyphony_breaches(VOCAB, SPEC, row, asked_S) for row in rows]
        assert sum(c for c, _ in counts) >= 30 and sum(b for _, b in counts) == 0
        assert max(len(row) for row in rows) > 2 * CFG.max_len  # across window slides
        guarded.append(within_one(rows))
    raw = generate_tokens(model, VOCAB, [np.array([STYLE])] * 6, guidance=1.0,
                          controls=controls.parse(VOCAB, timeline), **kw)
    assert sum(_polyphony_breaches(VOCAB, SPEC, row, asked_S)[1] for row in raw) >= 10
    assert min(guarded) >= within_one(raw) + 0.3  # 0.79 and 0.38 when written


def test_the_density_and_polyphony_guards_together_never_stop_a_piece():
    """Asked for many notes and a single line (the demo corpus's tied polyphony edges, where one
    note sounding is level 3 and two are level 5), on a segment's last step the density guard
    wants a note and the polyphony guard a thinner onset: the note is struck (density wins), and no
    piece ends before its length or strikes a note it releases at once."""
    spec = {**SPEC, "edges": {**SPEC["edges"], "polyphony": [1.0, 1.0, 1.0, 1.0, 3.0, 4.0, 4.0]}}
    vocab = Vocabulary(["bach"]).with_controls(spec)
    model = _eager_model(vocab=vocab, on=1.0)
    rows = generate_tokens(model, vocab, [np.array([STYLE])] * 6, seeds=range(6), max_seconds=2.0, max_events=600,
                           temperature=1.0, controls=controls.parse(vocab, "density=8,polyphony=3",
                                                                    polyphony_guard=True))
    seg = data_controls.segment_steps(vocab)
    for row in rows:
        assert data_controls.steps_after(vocab, row)[-1] >= 4 * seg - 10  # the whole 2 s (no EOS)
        ids = np.asarray(row).tolist()
        for a, b in zip(ids, ids[1:]):  # no NOTE_ON released before time moves
            assert not (vocab.note_on_offset <= a < vocab.note_off_offset and b == a + vocab.note_off_offset
                        - vocab.note_on_offset)


def test_a_guard_is_recorded_only_where_its_control_is_asked_for():
    """A corpus manifest records the register, mode, scale, loudness and polyphony guards as on only
    when --controls (or --mood) asks for that control: otherwise they change nothing, and a corpus begun before them resumes."""
    from mgpt.sample.run import Sampling

    plain = Sampling(controls="density=6").to_dict()
    assert not plain["mode_guard"] and not plain["polyphony_guard"]
    asked = Sampling(controls="0:density=2;20:mode=minor,polyphony=5").to_dict()
    assert asked["mode_guard"] and asked["polyphony_guard"]
    assert Sampling(mood="calm").to_dict()["mode_guard"]
    assert not Sampling(controls="mode=minor", mode_guard=False).to_dict()["mode_guard"]
    assert not plain["scale_guard"] and asked["scale_guard"]
    assert not Sampling(controls="mode=minor", mode_guard=False).to_dict()["scale_guard"]  # it acts through the mode guard
    assert not plain["loudness_guard"] and Sampling(controls="loudness=4").to_dict()["loudness_guard"]
    assert not plain["register_guard"] and Sampling(controls="register=low").to_dict()["register_guard"]



def test_control_tries_keep_each_segments_draw_nearest_the_levels_asked_for():
    """--control_tries=K: each control segment drawn K times from where the piece is, the draw whose
    notes measure nearest the asked levels kept. With the guards off, the segments measure far nearer
    than one draw's; the pieces still run their whole length, every segment opens with its own
    controls once, and the same seeds give the same pieces."""
    from mgpt.sample import rerank
    from mgpt.sample.run import Run, Sampling

    pref_V = np.full(VOCAB.size, -100.0, np.float32)  # notes now and then, at random: segments of 1 to 8 notes
    pref_V[VOCAB.note_on_offset + 20:VOCAB.note_on_offset + 40] = 1.0
    pref_V[VOCAB.note_off_offset + 20:VOCAB.note_off_offset + 40] = 1.0
    pref_V[VOCAB.time_shift_offset + 4:VOCAB.time_shift_offset + 30] = 1.0
    run = Run(model=context_free_model(CFG, pref_V), vocab=VOCAB)
    off = {g: False for g in ("density_guard", "register_guard", "mode_guard", "polyphony_guard", "scale_guard",
                              "loudness_guard")}
    text = "0:density=2;1:density=6"
    asked_SxA = controls.parse(VOCAB, text).segment_levels(VOCAB, 4)
    prompts = [np.array([STYLE], np.int32)] * 8

    def draw(tries):
        sampling = Sampling(max_seconds=2.0, max_note_seconds=0, guidance=1.0, controls=text, control_tries=tries,
                            **off)
        rows = run.sample_ids(prompts, list(range(8)), sampling)
        far = [rerank.distance(data_controls.segment_levels(VOCAB.decode_notes(r), SPEC, 4), asked_SxA).mean()
               for r in rows]
        return rows, float(np.mean(far))

    one_rows, one = draw(1)
    rows, chosen = draw(4)
    assert chosen < 0.6 * one, (one, chosen)
    seg = data_controls.segment_steps(VOCAB)
    for row in rows:
        assert VOCAB.seconds(row) > 1.5  # the whole piece, not a segment's draw
        steps = [s for s, _ in _groups(row)]
        assert len(steps) == len(set(s // seg for s in steps))  # one group per segment
        assert steps[0] == 0 and all(s // seg == k for k, s in enumerate(steps))
    again, _ = draw(4)
    for a, b in zip(rows, again):
        np.testing.assert_array_equal(a, b)


def test_control_tries_refuse_a_bad_count_or_a_budget_in_events_in_one_line(model):
    from mgpt.errors import UserError
    from mgpt.sample.run import Run, Sampling

    for bad in (0, 65, 2.5, True):
        with pytest.raises(UserError, match="^--control_tries must be a whole number in 1..64"):
            Sampling(control_tries=bad)
    run = Run(model=model, vocab=VOCAB)
    with pytest.raises(UserError, match=r"^--control_tries=4 .*\(--max_seconds\), not in events$"):
        run.sample_ids([np.array([STYLE], np.int32)], [0], Sampling(controls="density=2", control_tries=4,
                                                                    max_note_seconds=0, max_events=20))
    # Without controls there is nothing to choose by: one draw, as before.
    (row,) = run.sample_ids([np.array([STYLE], np.int32)], [0], Sampling(control_tries=4, max_note_seconds=0,
                                                                          max_events=20))
    (plain,) = run.sample_ids([np.array([STYLE], np.int32)], [0], Sampling(max_note_seconds=0, max_events=20))
    np.testing.assert_array_equal(row, plain)


@pytest.mark.slow
def test_control_tries_end_pieces_where_one_draw_would_after_a_primer_and_long_rests():
    """A review found that a shift crossing a segment's end past the piece's end ran the piece over
    --max_seconds (or asked the next draw for no time at all), and that a draw whose crossing shift
    was longer than the draw's margin was taken for a piece that had ended."""
    from mgpt.sample.run import Run, Sampling

    pref_V = np.full(VOCAB.size, -100.0, np.float32)  # a note, then rests of 0.4 to 1 s: shifts cross segments
    pref_V[VOCAB.note_on_offset + 20:VOCAB.note_on_offset + 30] = 0.0
    pref_V[VOCAB.note_off_offset + 20:VOCAB.note_off_offset + 30] = 0.0
    pref_V[VOCAB.time_shift_offset + 40:VOCAB.velocity_offset] = 0.5
    run = Run(model=context_free_model(CFG, pref_V), vocab=VOCAB)
    primer = np.array([STYLE, VOCAB.note_on_offset + 22, VOCAB.time_shift_offset + 29], np.int32)  # 0.3 s
    sampling = Sampling(max_seconds=1.65, max_note_seconds=0, guidance=1.0, controls="density=2", control_tries=3,
                        density_guard=False)
    rows = run.sample_ids([primer] * 6, list(range(6)), sampling)
    one = run.sample_ids([primer] * 6, list(range(6)), dataclasses.replace(sampling, control_tries=1))
    for row in rows + one:
        assert row[:3].tolist() == primer.tolist()
        assert 1.65 - 1.0 < VOCAB.seconds(row[3:]) <= 1.65  # within one shift of the budget, never past it


def test_style_evidence_is_the_models_own_log_likelihood_ratio_of_the_new_events(model):
    """--prefer_style's score: the new events' log-likelihood under the row's STYLE minus under
    STYLE:unknown, control tokens left out, through the window the sampler would read next."""
    import jax

    from mgpt.sample import rerank
    from mgpt.sample.run import Run
    from mgpt.sample.sampler import window_prompt

    run = Run(model=model, vocab=VOCAB)
    rng = np.random.default_rng(0)
    density = VOCAB.control_id("density", 3)

    def events(n):
        return list(rng.choice(np.r_[VOCAB.note_on_offset + 30:VOCAB.note_on_offset + 50,
                                     VOCAB.time_shift_offset + 5:VOCAB.time_shift_offset + 20], n))

    def by_hand(row, start):
        ctx = window_prompt(row, CFG.max_len, VOCAB)
        new = min(len(row) - start, len(ctx) - 1 if len(ctx) == len(row) else CFG.max_len // 4 - 1)
        both = np.array([ctx, [VOCAB.unknown_style_id, *ctx[1:]]], np.int32)
        logp = np.asarray(jax.nn.log_softmax(model(both), axis=-1))
        return sum(logp[0, j - 1, ctx[j]] - logp[1, j - 1, ctx[j]] for j in range(len(ctx) - new, len(ctx))
                   if not VOCAB.is_control(np.array(ctx[j])))

    short = [STYLE, density, *events(8), density, *events(6)]  # the whole row in the window
    long = [STYLE, density, *events(30), density, *events(10)]  # re-windowed: its last events
    unknown = [VOCAB.unknown_style_id, *short[1:]]
    got = rerank.style_evidence(run, [short, long, unknown, short], [10, 33, 10, len(short)])
    np.testing.assert_allclose(got[:2], [by_hand(short, 10), by_hand(long, 33)], rtol=1e-4, atol=1e-4)
    assert abs(got[0]) > 1e-3  # a random model reads the style: the test can tell a wrong alignment
    assert got[2] == 0.0 and got[3] == 0.0  # no style, or no new events: nothing to prefer


def test_prefer_style_keeps_the_draw_most_in_style_and_leaves_unconditional_pieces_alone(monkeypatch):
    """Of each segment's draws equally near the controls, the one the model scores most in style is
    kept (here a stand-in score: the higher a row's new notes, the more in style); a piece with no
    style keeps the first draw, as without the option, and pieces without controls are chosen alike."""
    from mgpt.errors import UserError
    from mgpt.sample.run import Run, Sampling

    pref_V = np.full(VOCAB.size, -100.0, np.float32)
    pref_V[VOCAB.note_on_offset + 20:VOCAB.note_on_offset + 80] = 1.0
    pref_V[VOCAB.note_off_offset + 20:VOCAB.note_off_offset + 80] = 1.0
    pref_V[VOCAB.time_shift_offset + 10:VOCAB.time_shift_offset + 30] = 2.0  # a note or two between shifts
    run = Run(model=context_free_model(dataclasses.replace(CFG, max_len=256), pref_V), vocab=VOCAB)  # pieces unwindowed

    def high_notes_gain(tokens_BxL, unknown):
        next_BxL = np.roll(np.asarray(tokens_BxL), -1, axis=1)
        on = (next_BxL >= VOCAB.note_on_offset) & (next_BxL < VOCAB.note_off_offset)
        return np.where(on, next_BxL - VOCAB.note_on_offset - 50.0, 0.0).astype(np.float32)

    monkeypatch.setattr(Run, "scorer", lambda self: high_notes_gain)
    off = {g: False for g in ("density_guard", "register_guard", "mode_guard", "polyphony_guard", "scale_guard",
                              "loudness_guard")}
    prompts = [np.array([STYLE], np.int32)] * 16 + [np.array([VOCAB.unknown_style_id], np.int32)] * 2
    base = Sampling(max_seconds=2.0, max_note_seconds=0, guidance=1.0, controls="density=3", control_tries=4, **off)

    def mean_pitch(rows):
        return np.mean(np.concatenate([VOCAB.decode_notes(r).pitch for r in rows]))

    first = run.sample_ids(prompts, list(range(18)), base)
    chosen = run.sample_ids(prompts, list(range(18)), dataclasses.replace(base, prefer_style=True))
    assert mean_pitch(chosen[:16]) > mean_pitch(first[:16]) + 4  # 7 semitones when written
    for a, b in zip(first[16:], chosen[16:]):
        np.testing.assert_array_equal(a, b)
    # Without controls: every draw is as near, and the most in style is kept.
    plain = dataclasses.replace(base, controls=None, prefer_style=True)
    one = run.sample_ids(prompts[:16], list(range(16)), dataclasses.replace(plain, control_tries=1, prefer_style=False))
    assert mean_pitch(run.sample_ids(prompts[:16], list(range(16)), plain)) > mean_pitch(one) + 4  # 14 when written
    with pytest.raises(UserError, match=r"^--prefer_style chooses among the draws .* --control_tries=K with K > 1$"):
        Sampling(prefer_style=True)
    with pytest.raises(UserError, match=r"^--prefer_style must be true or false"):
        Sampling(prefer_style="yes", control_tries=2)
    import types
    untrained = Run(model=run.model, vocab=VOCAB, config=types.SimpleNamespace(data=types.SimpleNamespace(style_dropout=0.0)))
    with pytest.raises(UserError, match=r"^--prefer_style reads .* \(data.style_dropout = 0\)$"):
        untrained.sample_ids(prompts[:1], [0], plain)
