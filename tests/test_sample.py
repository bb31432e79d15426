import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_prep.vocab import Vocabulary
from mgpt.model import GPT, ModelConfig
from mgpt.sample import _choose, filter_logits, generate_tokens, sampling_settings, window_prompt

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


def test_a_new_window_starts_like_a_training_crop():
    notes = list(_ids(VOCAB.note_on_offset + 30, 10))
    loud, soft = VOCAB.velocity_offset + 25, VOCAB.velocity_offset + 5
    row = [STYLE, loud, *notes, soft, *notes]  # 23 tokens, more than a 16-position window
    # STYLE, the velocity in force (soft), then the most recent events: half a window in all.
    assert window_prompt(row, 16, VOCAB) == [STYLE, soft, *notes[-6:]]
    plain = [STYLE, *notes, *notes]
    assert window_prompt(plain, 16, VOCAB) == [STYLE, *notes[-7:]]  # no velocity yet: none carried
    # A velocity change just before the kept events is the one carried...
    at_cut = [STYLE, loud, *notes, soft, *notes[:6]]
    assert window_prompt(at_cut, 16, VOCAB) == [STYLE, soft, *notes[:6]]
    # ...and one that opens the kept events is not carried twice.
    opening = [STYLE, loud, *notes, notes[0], soft, *notes[:5]]
    assert window_prompt(opening, 16, VOCAB) == [STYLE, soft, *notes[:5]]
    assert window_prompt(row[:12], 16, VOCAB) == row[:12]  # room left: the whole row


def test_bad_arguments_name_the_setting(model):
    with pytest.raises(ValueError, match="STYLE"):
        generate_tokens(model, VOCAB, [np.array([5, 6])], seeds=[0], max_events=4)
    with pytest.raises(ValueError, match="top_p"):
        generate_tokens(model, VOCAB, [np.array([STYLE])], seeds=[0], max_events=4, top_p=0.0)
    with pytest.raises(ValueError, match="seeds"):
        generate_tokens(model, VOCAB, [np.array([STYLE])], seeds=[0, 1], max_events=4)
