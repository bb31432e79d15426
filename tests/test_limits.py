"""Hard limits (mgpt/sample/limits.py): held by the sampler's mask on every sampled event."""

import numpy as np
import pytest

from data_prep.vocab import Vocabulary
from mgpt.model import GPT, ModelConfig
from mgpt.sample.limits import HardLimits, parse_range
from mgpt.sample.sampler import generate_tokens
from runs import context_free_model

VOCAB = Vocabulary(["bach"])
CFG = ModelConfig(vocab_size=VOCAB.size, num_layers=2, num_heads=2, d_model=32, mlp_dim=64, max_len=32,
                  tied_embeddings=False)
STYLE = VOCAB.style_id("bach")
LIMITS = HardLimits(pitch_range=(55, 67), max_polyphony=2, velocity_range=(40, 80))


def _eager_model() -> GPT:
    """A model whose next-event preferences ignore the context (as tests/test_sample.py's
    `_fixed_model`) and lean towards what the limits forbid: NOTE_ONs of every pitch, many at
    once, and VELOCITY tokens of every loudness. Without the limits its pieces break each one."""
    pref_V = np.zeros(VOCAB.size, np.float32)
    pref_V[VOCAB.note_on_offset:VOCAB.note_off_offset] = 2.0
    pref_V[VOCAB.velocity_offset:VOCAB.style_offset] = 1.0
    pref_V[VOCAB.time_shift_offset:VOCAB.time_shift_offset + 10] = 2.0
    pref_V[VOCAB.eos_id] = -100.0
    return context_free_model(CFG, pref_V)


def violations(row: np.ndarray, limits: HardLimits, start: int) -> dict:
    """Per limit, the sampled events (row[start:]) that break it: NOTE_ONs outside the pitch range,
    NOTE_ONs after which more than max_polyphony notes sound, and notes (decoded with the vocabulary)
    struck by sampled events with a velocity outside the range."""
    lo, hi = limits.pitch_range
    vlo, vhi = limits.velocity_range
    tokens = VOCAB.describe(row)
    sounding, bad = {}, {"pitch": 0, "polyphony": 0, "velocity": 0}
    for i, t in enumerate(tokens):
        kind, _, value = t.partition(":")
        if kind == "NOTE_ON":
            sounding[int(value)] = sounding.get(int(value), 0) + 1
            if i >= start:
                bad["pitch"] += not lo <= int(value) <= hi
                bad["polyphony"] += sum(sounding.values()) > limits.max_polyphony
        elif kind == "NOTE_OFF" and sounding.get(int(value)):
            sounding[int(value)] -= 1
    primer_notes = len(VOCAB.decode_notes(row[:start]).pitch)
    velocity = VOCAB.decode_notes(row).velocity[primer_notes:]
    bad["velocity"] = int(np.sum((velocity < vlo) | (velocity > vhi)))
    return bad


def _sample(limits, seeds, prompt=(STYLE,), **kw):
    return generate_tokens(_eager_model(), VOCAB, [np.asarray(prompt)] * len(seeds), seeds=seeds, max_events=80,
                           temperature=1.3, max_note_seconds=0.3, hard_limits=limits, **kw)


def test_hard_limits_hold_on_every_sampled_event_of_many_seeds():
    seeds = list(range(24))
    free = _sample(None, seeds)
    # Without the limits the same model breaks each of them: the test can see a violation.
    broken = [violations(r, LIMITS, 1) for r in free]
    assert all(sum(b[k] for b in broken) > 10 for k in ("pitch", "polyphony", "velocity"))
    limited = _sample(LIMITS, seeds)
    notes = sum(len(VOCAB.decode_notes(r).pitch) for r in limited)
    assert notes > 200  # many notes, over several sliding windows (80 events, a 32-event context)
    for r in limited:
        assert violations(r, LIMITS, 1) == {"pitch": 0, "polyphony": 0, "velocity": 0}


def test_a_primer_is_kept_as_it_is_and_its_notes_count_towards_polyphony():
    # The primer strikes three notes out of range, loud (VELOCITY:32 = 125), and leaves them sounding.
    loud = VOCAB.velocity_offset + 31
    primer = [STYLE, loud, *(VOCAB.note_on_offset + p - VOCAB.min_pitch for p in (30, 90, 100))]
    rows = _sample(LIMITS, list(range(8)), prompt=primer)
    for r in rows:
        assert r[:len(primer)].tolist() == primer
        assert violations(r, LIMITS, len(primer)) == {"pitch": 0, "polyphony": 0, "velocity": 0}


def test_no_limits_is_the_plain_sampler_byte_for_byte():
    seeds = list(range(4))
    for a, b in zip(_sample(None, seeds), _sample(HardLimits(), seeds)):
        np.testing.assert_array_equal(a, b)


def test_limits_also_hold_under_guidance_and_with_the_note_guard_off():
    rows = _sample(LIMITS, list(range(6)), guidance=2.0)
    rows += generate_tokens(_eager_model(), VOCAB, [np.asarray([STYLE])] * 6, seeds=range(6), max_events=60,
                            max_note_seconds=0, hard_limits=LIMITS)
    for r in rows:
        assert violations(r, LIMITS, 1) == {"pitch": 0, "polyphony": 0, "velocity": 0}


def test_bad_limits_name_the_setting():
    with pytest.raises(ValueError, match="pitch_range"):
        HardLimits(pitch_range=(72, 48))
    with pytest.raises(ValueError, match="velocity_range"):
        HardLimits(velocity_range=(0, 200))
    with pytest.raises(ValueError, match="max_polyphony"):
        HardLimits(max_polyphony=0)
    with pytest.raises(ValueError, match="pitch_range 0-10 holds none"):
        HardLimits(pitch_range=(0, 10)).banned_V(VOCAB)
    with pytest.raises(ValueError, match="velocity_range 2-3 holds none"):
        HardLimits(velocity_range=(2, 3)).banned_V(VOCAB)
    with pytest.raises(ValueError, match="--pitch_range=low: expected LO-HI"):
        parse_range("pitch_range", "low")
    assert parse_range("pitch_range", "48-72") == (48, 72) and parse_range("x", "") is None


def test_a_velocity_range_the_model_never_plays_still_gets_notes():
    # The model knows one loudness (as the demo corpus, all at 77): other VELOCITYs are near-impossible.
    pref_V = np.zeros(VOCAB.size, np.float32)
    pref_V[VOCAB.note_on_offset:VOCAB.note_off_offset] = 2.0
    pref_V[VOCAB.time_shift_offset:VOCAB.time_shift_offset + 10] = 2.0
    pref_V[VOCAB.velocity_offset:VOCAB.style_offset] = -30.0
    pref_V[VOCAB.velocity_offset + int(VOCAB.velocity_to_bin(77)) - 1] = 0.0
    pref_V[VOCAB.eos_id] = -100.0
    m = context_free_model(CFG, pref_V)
    loud = HardLimits(velocity_range=(90, 127))
    rows = generate_tokens(m, VOCAB, [np.asarray([STYLE])] * 8, seeds=range(8), max_events=60, max_note_seconds=0.3,
                           hard_limits=loud)
    for r in rows:
        velocity = VOCAB.decode_notes(r).velocity
        # What the model would have given its quiet VELOCITY and its NOTE_ONs goes to a loud VELOCITY:
        # the piece keeps its notes, all of them loud.
        assert len(velocity) >= 10 and np.all(velocity >= 90)
