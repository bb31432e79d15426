import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_prep.vocab import Vocabulary
from mgpt.model import GPT, ModelConfig
import mgpt.sample.sampler as sample_lib
from mgpt.sample.sampler import _choose, filter_logits, generate_tokens, sampling_settings, window_prompt

VOCAB = Vocabulary(["bach", "chopin"])
CFG = ModelConfig(
    vocab_size=VOCAB.size, num_layers=2, num_heads=2, d_model=32, mlp_dim=64, max_len=16, tied_embeddings=False
)
STYLE = VOCAB.style_id("bach")


@pytest.fixture(scope="module")
def model():
    return GPT(CFG, rngs=nnx.Rngs(0))


def _fixed_model(preference_V: np.ndarray) -> GPT:
    """A model whose next-token logits are `preference_V` whatever the context.

    Embeddings are constant and the blocks add nothing, so the final hidden
    state is all ones and logits_v = sum_d unembed[d, v].
    """
    m = GPT(CFG, rngs=nnx.Rngs(1))
    m.embed[...] = jnp.ones_like(m.embed[...])
    for block in m.blocks:
        block.attn.out[...] = jnp.zeros_like(block.attn.out[...])
        block.mlp.wo[...] = jnp.zeros_like(block.mlp.wo[...])
    m.unembed[...] = jnp.broadcast_to(jnp.asarray(preference_V, jnp.float32) / CFG.d_model, m.unembed.shape)
    return m


def _ids(start, count):
    return np.arange(start, start + count)


def test_cached_decode_matches_full_forward(model):
    rng = np.random.default_rng(0)
    tokens_BxL = jnp.asarray(rng.integers(2, VOCAB.style_offset, (3, CFG.max_len)), jnp.int32)
    graphdef, params = nnx.split(model)
    full_BxLxV = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens_BxL)
    decode = jax.jit(lambda p, t, pos, c: nnx.merge(graphdef, p).decode(t, pos, c))
    # Right-padded prefill of rows with different prompt lengths, then 1-token steps per row.
    lengths = np.array([3, 7, 5])
    prompt_BxP = jnp.where(jnp.arange(8) < jnp.asarray(lengths)[:, None], tokens_BxL[:, :8], 0)
    cache = model.init_cache(3, CFG.max_len)
    positions_BxP = jnp.broadcast_to(jnp.arange(8), (3, 8))
    logits_BxPxV, cache = decode(params, prompt_BxP, positions_BxP, cache)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(logits_BxPxV[b, :n], full_BxLxV[b, :n], atol=1e-4, rtol=0)
    pos_B = jnp.asarray(lengths)
    for _ in range(CFG.max_len - 7):
        step_Bx1 = jnp.take_along_axis(tokens_BxL, pos_B[:, None], axis=1)
        logits_Bx1xV, cache = decode(params, step_Bx1, pos_B[:, None], cache)
        expected_BxV = jnp.take_along_axis(full_BxLxV, pos_B[:, None, None], axis=1)[:, 0]
        assert float(jnp.max(jnp.abs(logits_Bx1xV[:, 0] - expected_BxV))) < 1e-4
        pos_B = pos_B + 1


def _draw(logits_V, n=20000, **settings):
    keys_N = jax.random.split(jax.random.key(0), n)
    logits_NxV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
    banned_V = jnp.zeros(len(logits_V), bool)
    return np.asarray(jax.jit(_choose)(logits_NxV, keys_N, sampling_settings(**settings), banned_V))


PROBS_V = np.array([0.05, 0.30, 0.02, 0.25, 0.15, 0.01, 0.12, 0.10])


def test_top_k_samples_only_the_k_most_likely_in_proportion():
    draws = _draw(np.log(PROBS_V), top_k=3)
    top3 = {1, 3, 4}
    assert set(np.unique(draws)) == top3
    freq = np.bincount(draws, minlength=8)[[1, 3, 4]] / len(draws)
    np.testing.assert_allclose(freq, PROBS_V[[1, 3, 4]] / PROBS_V[[1, 3, 4]].sum(), atol=0.02)


def test_top_p_samples_only_the_nucleus():
    # Sorted: .30 .25 .15 .12 ... ; .30+.25+.15 = .70 >= 0.6 so the nucleus is {1, 3, 4}.
    draws = _draw(np.log(PROBS_V), top_p=0.6)
    assert set(np.unique(draws)) == {1, 3, 4}
    draws = _draw(np.log(PROBS_V), top_p=0.29)  # the top token alone reaches 0.29
    assert set(np.unique(draws)) == {1}


@pytest.mark.slow
def test_min_p_and_temperature_compose_with_top_k():
    # min_p=0.4 keeps p >= 0.12: {1, 3, 4, 6}; top_k=3 then drops 6.
    kept = filter_logits(
        jnp.log(jnp.asarray(PROBS_V))[None], sampling_settings(top_k=3, min_p=0.4), jnp.zeros(8, bool)
    )
    assert set(np.flatnonzero(np.isfinite(np.asarray(kept[0])))) == {1, 3, 4}
    kept = filter_logits(jnp.log(jnp.asarray(PROBS_V))[None], sampling_settings(min_p=0.4), jnp.zeros(8, bool))
    assert set(np.flatnonzero(np.isfinite(np.asarray(kept[0])))) == {1, 3, 4, 6}
    kept = filter_logits(
        jnp.log(jnp.asarray(PROBS_V))[None], sampling_settings(top_k=2, top_p=0.99), jnp.zeros(8, bool)
    )
    assert set(np.flatnonzero(np.isfinite(np.asarray(kept[0])))) == {1, 3}
    # A low temperature sharpens towards the mode.
    cold = _draw(np.log(PROBS_V), n=4000, temperature=0.05)
    assert np.mean(cold == 1) > 0.9


def test_same_seed_same_piece_in_any_batch(model):
    prompts = [np.array([STYLE]), np.array([STYLE, *_ids(VOCAB.note_on_offset + 30, 3)])]
    a = generate_tokens(model, VOCAB, prompts, seeds=[3, 4], max_events=40, top_k=20)
    b = generate_tokens(model, VOCAB, prompts, seeds=[3, 4], max_events=40, top_k=20)
    alone = generate_tokens(model, VOCAB, prompts[1:], seeds=[4], max_events=40, top_k=20)
    other = generate_tokens(model, VOCAB, prompts, seeds=[5, 6], max_events=40, top_k=20)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a[1], alone[0])
    assert any(len(x) != len(y) or (x != y).any() for x, y in zip(a, other))


def test_pad_and_style_tokens_are_never_emitted():
    # The model strongly prefers PAD and STYLE tokens; masking must still keep them out.
    pref_V = np.zeros(VOCAB.size)
    pref_V[VOCAB.pad_id] = pref_V[VOCAB.style_offset :] = 20.0
    pref_V[VOCAB.eos_id] = -100.0
    rows = generate_tokens(_fixed_model(pref_V), VOCAB, [np.array([STYLE])] * 2, seeds=[0, 1], max_events=60)
    new = np.concatenate([r[1:] for r in rows])
    assert len(new) == 2 * 60
    assert not np.any(new == VOCAB.pad_id) and not np.any(VOCAB.is_style(new))


def test_primer_is_kept_at_the_start_even_past_the_window(model):
    primer = np.array([STYLE, *_ids(VOCAB.note_on_offset + 20, 25)])  # longer than max_len=16
    short = np.array([STYLE, VOCAB.velocity_offset + 3, VOCAB.note_on_offset + 40])
    rows = generate_tokens(model, VOCAB, [primer, short], seeds=[0, 1], max_events=10, temperature=0.8)
    np.testing.assert_array_equal(rows[0][: len(primer)], primer)
    np.testing.assert_array_equal(rows[1][: len(short)], short)
    assert all(len(r) - len(p) <= 10 for r, p in zip(rows, [primer, short]))


def test_max_seconds_budget_is_respected():
    # Mostly TIME_SHIFTs, never EOS: pieces end only through the seconds budget.
    pref_V = np.zeros(VOCAB.size)
    pref_V[VOCAB.time_shift_offset : VOCAB.velocity_offset] = 3.0
    pref_V[VOCAB.eos_id] = -100.0
    rows = generate_tokens(_fixed_model(pref_V), VOCAB, [np.array([STYLE])] * 2, seeds=[0, 1], max_seconds=4.0)
    for r in rows:
        seconds = VOCAB.seconds(r)
        assert 4.0 - VOCAB.max_shift_steps / VOCAB.steps_per_second < seconds <= 4.0


def test_sliding_window_generates_far_past_the_context_and_greedy_ignores_seeds():
    pref_V = np.linspace(0.0, 1.0, VOCAB.size)
    pref_V[VOCAB.eos_id] = -100.0
    m = _fixed_model(pref_V)
    rows = generate_tokens(m, VOCAB, [np.array([STYLE])] * 2, seeds=[0, 1], max_events=5 * CFG.max_len)
    assert [len(r) for r in rows] == [1 + 5 * CFG.max_len] * 2
    greedy = generate_tokens(m, VOCAB, [np.array([STYLE])] * 2, seeds=[0, 1], max_events=20, greedy=True)
    np.testing.assert_array_equal(greedy[0], greedy[1])
    assert set(greedy[0][1:]) == {VOCAB.style_offset - 1}  # the most preferred allowed token


def _on(p):
    return VOCAB.note_on_offset + p - VOCAB.min_pitch


def _off(p):
    return VOCAB.note_off_offset + p - VOCAB.min_pitch


def _shift(steps):
    return VOCAB.time_shift_offset + steps - 1


def test_a_new_window_starts_like_a_training_crop():
    loud, soft = VOCAB.velocity_offset + 25, VOCAB.velocity_offset + 5
    t5 = _shift(5)
    row = [STYLE, loud, _on(48), t5, _on(52), t5, _off(52), soft, _on(55), *[t5] * 24]  # 33 > 32 positions
    # STYLE, the velocity in force, each note still sounding (48 struck loud, 55 soft; 52
    # has ended), then the most recent events: half a window (16 tokens) in all.
    assert window_prompt(row, 32, VOCAB) == [STYLE, soft, loud, _on(48), soft, _on(55), *[t5] * 10]
    # At most a quarter window is carried, in whole notes: 55 no longer fits in 16 // 4.
    assert window_prompt(row[:17], 16, VOCAB) == [STYLE, soft, loud, _on(48), soft, *[t5] * 3]
    # Nothing sounding: only the velocity in force is carried, as before.
    quiet = [STYLE, loud, _on(48), t5, _off(48), soft, *[t5] * 11]
    assert window_prompt(quiet, 16, VOCAB) == [STYLE, soft, *[t5] * 6]
    plain = [STYLE, *[t5] * 16]
    assert window_prompt(plain, 16, VOCAB) == [STYLE, *[t5] * 7]  # no velocity yet: none carried
    assert window_prompt(row[:12], 16, VOCAB) == row[:12]  # room left: the whole row


def _sounding_violations(row):
    """(NOTE_OFFs of silent pitches, NOTE_ONs of sounding pitches) in an id row."""
    sounding, bad_off, bad_on = set(), 0, 0
    for t in row:
        if VOCAB.note_on_offset <= t < VOCAB.note_off_offset:
            bad_on += t in sounding
            sounding.add(t)
        elif VOCAB.note_off_offset <= t < VOCAB.time_shift_offset:
            on = t - VOCAB.note_off_offset + VOCAB.note_on_offset
            bad_off += on not in sounding
            sounding.discard(on)
    return bad_off, bad_on


def test_sampler_never_plays_an_impossible_event():
    # The model prefers NOTE_OFFs of pitches that never sounded, and re-striking held keys.
    pref_V = np.zeros(VOCAB.size)
    pref_V[VOCAB.note_off_offset : VOCAB.time_shift_offset] = 6.0
    pref_V[_on(60)] = pref_V[_on(64)] = 4.0
    pref_V[VOCAB.eos_id] = -100.0
    primer = np.array([STYLE, VOCAB.velocity_offset + 10, _on(60)])  # 60 sounds from the primer
    rows = generate_tokens(_fixed_model(pref_V), VOCAB, [primer] * 4, seeds=range(4), max_events=40,
                           max_note_seconds=0)
    for r in rows:
        assert _sounding_violations(r) == (0, 0)
        assert _off(60) in r.tolist()  # the primer's note is the one NOTE_OFF it may play first
    # Re-striking a held key preferred above all else, and no NOTE_OFF mass handed to the sounding
    # notes (release_share=0): only the NOTE_ON mask keeps 60 and 64 from being struck again.
    pref_V[_on(60)] = pref_V[_on(64)] = 12.0
    rows = generate_tokens(_fixed_model(pref_V), VOCAB, [primer] * 4, seeds=range(4), max_events=40,
                           max_note_seconds=0, release_share=0.0)
    for r in rows:
        assert _sounding_violations(r) == (0, 0)
        assert r.tolist().count(_on(64)) >= 2  # struck, released, struck again: the test sees re-strikes


def test_sampler_never_plays_an_impossible_event_over_many_seeds(model):
    # A random tiny model, sliding windows included (3 windows of 16 per row).
    rows = generate_tokens(model, VOCAB, [np.array([STYLE])] * 32, seeds=range(32), max_events=48,
                           temperature=1.5)
    notes = sum(int(((r >= VOCAB.note_on_offset) & (r < VOCAB.time_shift_offset)).sum()) for r in rows)
    assert notes > 100  # the test sees many note events
    for r in rows:
        assert _sounding_violations(r) == (0, 0)


@pytest.mark.parametrize("shift_steps, limit_s", [(7, 0.5), (25, 0.6), (10, 0.5)])
def test_note_length_guard_closes_notes_at_the_first_event_at_or_past_the_limit(shift_steps, limit_s):
    # NOTE_OFF is never chosen: only the guard can end a note. Time moves in steps of one
    # shift, so a note that has sounded limit_s is closed by the next event: it lasts the
    # first whole number of shifts >= the limit. A guard that also replaced the shift that
    # would carry a note past the limit closed it one shift early (0.49 s and 0.5 s here),
    # where the model had changed nothing, and the demo model then struck it again.
    pref_V = np.zeros(VOCAB.size)
    pref_V[VOCAB.note_off_offset : VOCAB.time_shift_offset] = -100.0
    pref_V[VOCAB.eos_id] = -100.0
    pref_V[_shift(shift_steps)] = 30.0  # far above every other event: only this shift moves time
    pref_V[_on(60)] = pref_V[_on(67)] = 30.0
    prompts = [np.array([STYLE, VOCAB.velocity_offset + 10])] * 3
    guarded = generate_tokens(_fixed_model(pref_V), VOCAB, prompts, seeds=range(3), max_seconds=6.0,
                              max_note_seconds=limit_s)
    expected_s = np.ceil(limit_s * VOCAB.steps_per_second / shift_steps) * shift_steps / VOCAB.steps_per_second
    for r in guarded:
        _, _, start_s, end_s = VOCAB.decode_notes(r.tolist())
        closed = [t for t in r.tolist() if VOCAB.note_off_offset <= t < VOCAB.time_shift_offset]
        ended_s = (end_s - start_s)[end_s < end_s.max()]  # the last notes may be cut by the piece's end
        assert len(closed) >= 4 and len(ended_s) >= 4
        np.testing.assert_allclose(ended_s, expected_s, atol=1e-6)
    raw = generate_tokens(_fixed_model(pref_V), VOCAB, prompts, seeds=range(3), max_seconds=6.0,
                          max_note_seconds=0)
    assert all(not any(VOCAB.note_off_offset <= t < VOCAB.time_shift_offset for t in r.tolist()) for r in raw)


def test_inverse_cdf_draw_never_lands_on_a_filtered_token():
    # u == 0 used to pick index 0 (PAD) whatever its mass.
    logits_1xV = jnp.asarray([[0.0, 1.0, 2.0, 3.0]])
    banned_V = jnp.asarray([True, False, False, False])
    settings = sampling_settings()
    zero_key = jax.random.key(0)
    # A key whose uniform is exactly 0 is rare; test the draw itself with u pinned to 0 and 1-ulp.

    for u in (0.0, np.nextafter(np.float32(1), np.float32(0))):
        original = jax.random.uniform
        try:
            jax.random.uniform = lambda key, *a, **k: jnp.asarray(u, jnp.float32)
            token = int(sample_lib._choose(logits_1xV, zero_key[None], settings, banned_V)[0])
        finally:
            jax.random.uniform = original
        assert token != 0 and 1 <= token <= 3


def test_bad_arguments_name_the_setting(model):
    with pytest.raises(ValueError, match="STYLE"):
        generate_tokens(model, VOCAB, [np.array([5, 6])], seeds=[0], max_events=4)
    with pytest.raises(ValueError, match="top_p"):
        generate_tokens(model, VOCAB, [np.array([STYLE])], seeds=[0], max_events=4, top_p=0.0)
    with pytest.raises(ValueError, match="seeds"):
        generate_tokens(model, VOCAB, [np.array([STYLE])], seeds=[0, 1], max_events=4)


def test_release_share_hands_masked_note_off_mass_to_sounding_notes():
    # The model puts 60 % on NOTE_OFF:70, which is silent, 10 % on NOTE_OFF:60, which sounds,
    # and 30 % on a TIME_SHIFT.
    tables = sample_lib.token_tables(VOCAB)
    probs_V = np.full(VOCAB.size, 1e-12)
    probs_V[_off(70)], probs_V[_off(60)], probs_V[_shift(10)] = 0.6, 0.1, 0.3
    logits_1xV = jnp.log(jnp.asarray(probs_V, jnp.float32))[None]
    onset_1xP = np.full((1, VOCAB.max_pitch - VOCAB.min_pitch + 1), sample_lib.SILENT, np.int32)
    onset_1xP[0, 60 - VOCAB.min_pitch] = 0
    banned_1xV, _, _ = sample_lib.note_rules(jnp.asarray(onset_1xP != sample_lib.SILENT, jnp.int32),
                                             jnp.asarray(onset_1xP), jnp.zeros(1, jnp.int32), tables)
    assert bool(banned_1xV[0, _off(70)]) and not bool(banned_1xV[0, _off(60)])

    def p_release(share):
        x = sample_lib.release_mass(logits_1xV, banned_1xV, tables, share)
        return float(jax.nn.softmax(jnp.where(banned_1xV, -jnp.inf, x), axis=-1)[0, _off(60)])

    assert p_release(0.0) == pytest.approx(0.1 / 0.4, rel=1e-4)  # plain masking: renormalised over the rest
    # All of it: the sounding note gets the model's whole release probability, 0.7.
    assert p_release(1.0) == pytest.approx(0.7, rel=1e-4)
    assert p_release(0.0) < p_release(0.5) < p_release(1.0)


def test_guidance_one_is_the_plain_sampler_byte_for_byte_and_compiles_nothing_new(model):
    from mgpt.sample.sampler import sample_window

    prompts = [np.array([STYLE]), np.array([VOCAB.style_id("chopin"), *_ids(VOCAB.note_on_offset + 30, 3)])]
    kw = dict(seeds=[3, 4], max_events=3 * CFG.max_len, top_p=0.95)  # several windows
    plain = generate_tokens(model, VOCAB, prompts, **kw)
    compiled = sample_window._cache_size()
    guided = generate_tokens(model, VOCAB, prompts, guidance=1.0, **kw)
    assert sample_window._cache_size() == compiled, "G = 1 must run the already compiled plain sampler"
    for x, y in zip(plain, guided):
        assert x.tobytes() == y.tobytes()
    stronger = generate_tokens(model, VOCAB, prompts, guidance=3.0, **kw)
    assert any(len(x) != len(y) or (x != y).any() for x, y in zip(plain, stronger))


def test_guidance_zero_samples_exactly_as_the_unknown_style_in_every_window(model):
    # G = 0 keeps only the unconditional rows' logits (l_uncond + 0 * finite = l_uncond exactly),
    # so it must match sampling from a STYLE:unknown prompt, also past the first window: the
    # unconditional twin's new windows must start with STYLE:unknown too.
    primer = [VOCAB.velocity_offset + 5, *_ids(VOCAB.note_on_offset + 30, 2)]
    kw = dict(seeds=[7, 8], max_events=4 * CFG.max_len, temperature=0.9)
    guided = generate_tokens(model, VOCAB, [np.array([STYLE, *primer])] * 2, guidance=0.0, **kw)
    unknown = generate_tokens(model, VOCAB, [np.array([VOCAB.unknown_style_id, *primer])] * 2, **kw)
    conditioned = generate_tokens(model, VOCAB, [np.array([STYLE, *primer])] * 2, **kw)
    for g, u, c in zip(guided, unknown, conditioned):
        assert len(g) > 2 * CFG.max_len
        np.testing.assert_array_equal(g[1:], u[1:])
        assert len(g) != len(c) or (g[1:] != c[1:]).any()
    with pytest.raises(ValueError, match="guidance"):
        generate_tokens(model, VOCAB, [np.array([STYLE])], seeds=[0], max_events=4, guidance=-1.0)


def test_guided_event_is_the_argmax_of_the_mixed_logits(model):
    # First event, greedy: argmax over allowed tokens of l_uncond + G (l_cond - l_uncond), with the
    # two logit rows taken from a plain forward pass of each prompt.
    from mgpt.sample.sampler import note_rules, token_tables

    tables = token_tables(VOCAB)
    num_pitches = VOCAB.max_pitch - VOCAB.min_pitch + 1
    banned_V = np.asarray(note_rules(jnp.zeros((1, num_pitches), jnp.int32),
                                     jnp.full((1, num_pitches), np.iinfo(np.int32).max), jnp.zeros(1, jnp.int32),
                                     tables)[0][0])
    primer = [VOCAB.velocity_offset + 5]
    l_cond_V = np.asarray(model(jnp.asarray([[STYLE, *primer]]))[0, -1], np.float64)
    l_uncond_V = np.asarray(model(jnp.asarray([[VOCAB.unknown_style_id, *primer]]))[0, -1], np.float64)
    picks = set()
    for g in (0.0, 2.0, 4.0, 8.0):
        mixed_V = np.where(banned_V, -np.inf, l_uncond_V + g * (l_cond_V - l_uncond_V))
        (row,) = generate_tokens(model, VOCAB, [np.array([STYLE, *primer])], seeds=[0], max_events=1, greedy=True,
                                 guidance=g)
        assert row[-1] == np.argmax(mixed_V), g
        picks.add(int(row[-1]))
    assert len(picks) > 1, "the guidance values chosen should move the argmax"


def test_a_unison_held_in_the_primer_needs_two_note_offs():
    # The primer strikes 60 twice (two voices in unison): both must be released, one NOTE_OFF each.
    pref_V = np.zeros(VOCAB.size)
    pref_V[VOCAB.note_off_offset : VOCAB.time_shift_offset] = 6.0
    pref_V[VOCAB.eos_id] = -100.0
    primer = np.array([STYLE, VOCAB.velocity_offset + 10, _on(60), _on(60)])
    rows = generate_tokens(_fixed_model(pref_V), VOCAB, [primer] * 2, seeds=range(2), max_events=20,
                           max_note_seconds=0)
    for r in rows:
        new = r[len(primer):].tolist()
        assert new[:2] == [_off(60), _off(60)]  # NOTE_OFFs are all it prefers, and both are allowed
        assert _off(60) not in new[2:]  # then 60 is silent
        pitch, _, start_s, end_s = VOCAB.decode_notes(r.tolist())
        assert len(pitch) == 0 or not np.any(end_s - start_s > 1.0)  # nothing drones


def test_a_tiny_positive_note_limit_still_guards():
    pref_V = np.zeros(VOCAB.size)
    pref_V[VOCAB.note_off_offset : VOCAB.time_shift_offset] = -100.0
    pref_V[VOCAB.eos_id] = -100.0
    pref_V[_shift(1)] = 30.0  # far above every other event: a longer shift could end the piece first
    pref_V[_on(60)] = 30.0
    (row,) = generate_tokens(_fixed_model(pref_V), VOCAB, [np.array([STYLE])], seeds=[0], max_seconds=1.0,
                             max_note_seconds=0.001)
    assert any(VOCAB.note_off_offset <= t < VOCAB.time_shift_offset for t in row.tolist())
