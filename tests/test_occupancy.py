"""Corpora at full occupancy: the rolling KV cache and continuous batching (issue 25)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_prep.vocab import Vocabulary
from mgpt.model import GPT, ModelConfig

VOCAB = Vocabulary(["bach", "chopin"])
CFG = ModelConfig(vocab_size=VOCAB.size, num_layers=2, num_heads=2, d_model=32, mlp_dim=64, max_len=16)
STYLE = VOCAB.style_id("bach")


@pytest.fixture(scope="module")
def model():
    return GPT(CFG, rngs=nnx.Rngs(0))


def _rolling_logits(model, tokens_BxN, sink):
    """Feeds tokens_BxN one position at a time through a rolling cache: logits_BxNxV."""
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda p, t, pos, c: nnx.merge(graphdef, p).decode_rolling(t, pos, c))
    cache = model.init_rolling_cache(tokens_BxN.shape[0], sink=sink)
    out = []
    for n in range(tokens_BxN.shape[1]):
        logits_BxV, cache = step(params, tokens_BxN[:, n], jnp.full(tokens_BxN.shape[0], n, jnp.int32), cache)
        out.append(logits_BxV)
    return jnp.stack(out, axis=1)


@pytest.mark.parametrize("sink", [1, 2])
def test_rolling_cache_matches_a_full_forward_over_the_sink_and_the_last_events(sink):
    # One layer: a key depends only on its token and position, so past the first wrap the rolling
    # cache must give exactly the logits of a full forward over [sink + last W - S events] laid
    # out at positions 0..W-1. (With more layers a cached key also carries what its token saw
    # when it was computed, StreamingLLM's semantics, so only the first window can match a
    # fresh forward: the next test.)
    cfg = ModelConfig(vocab_size=VOCAB.size, num_layers=1, num_heads=2, d_model=32, mlp_dim=64, max_len=16)
    m = GPT(cfg, rngs=nnx.Rngs(3))
    w, n = cfg.max_len, 5 * cfg.max_len + 3
    rng = np.random.default_rng(0)
    tokens_BxN = jnp.asarray(rng.integers(2, VOCAB.style_offset, (3, n)), jnp.int32)
    rolling_BxNxV = _rolling_logits(m, tokens_BxN, sink)
    for t in (w - 2, w - 1, w, w + 1, 2 * w + 5, n - 1):
        start = max(sink, t - (w - sink) + 1)
        window_BxL = jnp.concatenate([tokens_BxN[:, :sink], tokens_BxN[:, start : t + 1]], axis=1)
        full_BxV = m(window_BxL)[:, -1]
        np.testing.assert_allclose(rolling_BxNxV[:, t], full_BxV, atol=2e-4, rtol=0, err_msg=f"t={t}")


def test_rolling_cache_matches_the_full_forward_in_the_first_window(model):
    rng = np.random.default_rng(1)
    tokens_BxW = jnp.asarray(rng.integers(2, VOCAB.style_offset, (2, CFG.max_len)), jnp.int32)
    np.testing.assert_allclose(_rolling_logits(model, tokens_BxW, 1), model(tokens_BxW), atol=2e-4, rtol=0)


def test_a_forgotten_row_starts_afresh(model):
    rng = np.random.default_rng(2)
    first = jnp.asarray(rng.integers(2, VOCAB.style_offset, (1, 2 * CFG.max_len)), jnp.int32)
    second = jnp.asarray(rng.integers(2, VOCAB.style_offset, (1, 6)), jnp.int32)
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda p, t, pos, c: nnx.merge(graphdef, p).decode_rolling(t, pos, c))
    cache = model.init_rolling_cache(1)
    for n in range(first.shape[1]):
        _, cache = step(params, first[:, n], jnp.full(1, n, jnp.int32), cache)
    cache = cache.forget(jnp.ones(1, bool))
    for n in range(second.shape[1]):
        logits_1xV, cache = step(params, second[:, n], jnp.full(1, n, jnp.int32), cache)
    np.testing.assert_allclose(logits_1xV, model(second)[:, -1], atol=2e-4, rtol=0)


# ----------------------------------------------------------------------------- continuous batching


def _plan(n):
    """n prompts of mixed lengths and styles, with seeds and budgets of their own."""
    rng = np.random.default_rng(5)
    prompts, budgets = [], []
    for i in range(n):
        style = VOCAB.style_id(["bach", "chopin"][i % 2])
        primer = [VOCAB.velocity_offset + 4, *(VOCAB.note_on_offset + 40 + np.arange(i % 3))]
        prompts.append(np.array([style, *primer[: i % 4]], np.int32))
        budgets.append(int(rng.integers(1, 3 * CFG.max_len)))  # most pieces outlive a window
    return prompts, [100 + i for i in range(n)], budgets


def _continuous(model, order, batch_size, chunk_steps=64, guidance=None):
    from mgpt.sample.continuous import ContinuousSampler
    from mgpt.sample.sampler import sampling_settings, token_tables

    prompts, seeds, budgets = _plan(12)
    sampler = ContinuousSampler(model, VOCAB, batch_size=batch_size, settings=sampling_settings(top_p=0.95),
                                tables=token_tables(VOCAB), guidance=guidance, chunk_steps=chunk_steps)
    for i in order:
        sampler.add(i, prompts[i], seeds[i], max_events=budgets[i], max_steps=10**9, max_note_steps=30 * (i % 2))
    rows = dict(sampler)
    assert sampler.events == sum(len(r) - len(prompts[i]) for i, r in rows.items())
    return rows, prompts, budgets


def test_a_piece_depends_only_on_its_seed_not_its_slot_batch_or_plan_order(model):
    base, prompts, budgets = _continuous(model, range(12), batch_size=4)
    assert sorted(base) == list(range(12))
    for i, row in base.items():
        np.testing.assert_array_equal(row[: len(prompts[i])], prompts[i])
        assert len(row) - len(prompts[i]) <= budgets[i]
    assert max(len(r) for r in base.values()) > 2 * CFG.max_len  # the cache rolled
    shuffled = list(np.random.default_rng(0).permutation(12))
    for order, batch, chunk in ((range(12), 1, 64), (shuffled, 16, 64), (shuffled[::-1], 4, 5)):
        rows, _, _ = _continuous(model, order, batch, chunk)
        for i in range(12):
            assert rows[i].tobytes() == base[i].tobytes(), (i, batch)


def test_guided_pieces_depend_only_on_their_seed(model):
    g = jnp.asarray(2.0, jnp.float32)
    base, _, _ = _continuous(model, range(12), batch_size=4, guidance=g)
    rows, _, _ = _continuous(model, list(range(12))[::-1], batch_size=2, chunk_steps=9, guidance=g)
    plain, _, _ = _continuous(model, range(12), batch_size=4)
    assert all(rows[i].tobytes() == base[i].tobytes() for i in range(12))
    assert any(plain[i].tobytes() != base[i].tobytes() for i in range(12))


def test_rows_ending_on_their_first_event_and_a_plan_smaller_than_the_batch():
    from tests.test_sample import _fixed_model
    from mgpt.sample.continuous import generate_tokens

    pref_V = np.zeros(VOCAB.size)
    pref_V[VOCAB.eos_id] = 50.0  # EOS first, always
    m = _fixed_model(pref_V)
    prompts = [np.array([STYLE]), np.array([STYLE, VOCAB.velocity_offset + 3])]
    rows = generate_tokens(m, VOCAB, prompts, seeds=[1, 2], max_events=40, batch_size=16)
    assert [r.tolist() for r in rows] == [p.tolist() for p in prompts]
    # A plan smaller than the batch, of pieces that do run: each its full budget.
    pref_V[VOCAB.eos_id] = -100.0
    rows = generate_tokens(_fixed_model(pref_V), VOCAB, prompts, seeds=[1, 2], max_events=40, batch_size=16)
    assert [len(r) - len(p) for r, p in zip(rows, prompts)] == [40, 40]


def test_continuous_reprefill_writes_the_windowed_samplers_pieces(model):
    # Under context 'reprefill' a full window leaves its slot and comes back as its next window
    # (STYLE, carried state, latest events) fed as forced steps: the same pieces as the windowed
    # sampler, with guidance, the note guard and a primer longer than the window.
    from mgpt.sample.continuous import ContinuousSampler
    from mgpt.sample.sampler import generate_tokens, sampling_settings, token_tables

    prompts, seeds, _ = _plan(12)
    prompts[5] = np.concatenate([prompts[5], VOCAB.note_on_offset + 50 + np.arange(20)]).astype(np.int32)
    for g in (1.0, 2.0):
        windowed = generate_tokens(model, VOCAB, prompts, seeds=seeds, max_events=3 * CFG.max_len, top_p=0.95,
                                   batch_size=4, guidance=g, max_note_seconds=0.3)
        sampler = ContinuousSampler(model, VOCAB, batch_size=4, settings=sampling_settings(top_p=0.95),
                                    tables=token_tables(VOCAB), context="reprefill", chunk_steps=13,
                                    guidance=None if g == 1 else jnp.asarray(g, jnp.float32))
        for i in range(12)[::-1]:
            sampler.add(i, prompts[i], seeds[i], max_events=3 * CFG.max_len, max_steps=2**31 - 1, max_note_steps=30)
        rows = dict(sampler)
        assert max(len(r) for r in windowed) > 3 * CFG.max_len
        for i in range(12):
            assert rows[i].tobytes() == windowed[i].tobytes(), (g, i)


def test_rolling_generate_tokens_matches_the_windowed_sampler_in_the_first_window(model):
    from mgpt.sample import continuous
    from mgpt.sample.sampler import generate_tokens

    prompts, seeds, _ = _plan(6)
    kw = dict(seeds=seeds, max_events=CFG.max_len - 5, top_k=20)
    windowed = generate_tokens(model, VOCAB, prompts, **kw)
    rolling = continuous.generate_tokens(model, VOCAB, prompts, batch_size=4, **kw)
    for w, r in zip(windowed, rolling):
        np.testing.assert_array_equal(w, r)


def test_rolling_with_hard_limits_draws_what_the_windowed_sampler_draws(model):
    # The continuous sampler has no hard limits yet: 'rolling' must not drop them silently.
    from mgpt.sample import continuous
    from mgpt.sample.limits import HardLimits
    from mgpt.sample.sampler import generate_tokens

    prompts, seeds, _ = _plan(4)
    kw = dict(seeds=seeds, max_events=2 * CFG.max_len, batch_size=4, hard_limits=HardLimits(max_polyphony=1))
    for w, r in zip(generate_tokens(model, VOCAB, prompts, **kw), continuous.generate_tokens(model, VOCAB, prompts, **kw)):
        np.testing.assert_array_equal(w, r)


# ----------------------------------------------------------------------------- corpora


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.test_generate import STYLES, _save_checkpoint
    from mgpt.sample.run import load_run

    path = str(tmp_path_factory.mktemp("run"))
    _save_checkpoint(path, Vocabulary(STYLES))  # max_len 32
    return load_run(path)


@pytest.mark.parametrize("context", ["rolling", "reprefill"])
def test_killed_rolling_corpus_resumes_byte_identical(run, tmp_path, monkeypatch, context):
    # Either context streams through the continuous sampler (re-prefill is the default).
    from mgpt import render
    from mgpt.sample import corpus
    from mgpt.sample.run import Sampling

    other = {"rolling": "reprefill", "reprefill": "rolling"}[context]
    opts = dict(num_samples=7, styles=["bach", "folk"], seed=5, sampling=Sampling(max_events=70, context=context),
                batch_size=2, progress=False, max_copy_seconds=0)
    whole = corpus.generate_corpus(run, tmp_path / "whole", **opts)
    assert any(e["new_events"] > 32 for e in whole), "some piece must outlive the window"
    out = tmp_path / "killed"
    real_write, written = corpus._write_piece, []

    def write_then_die(*args, **kwargs):
        entry = real_write(*args, **kwargs)
        written.append(entry["index"])
        if len(written) == 4:  # killed after a piece's files, before its manifest line
            raise KeyboardInterrupt
        return entry

    monkeypatch.setattr(corpus, "_write_piece", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        corpus.generate_corpus(run, out, **opts)
    monkeypatch.setattr(corpus, "_write_piece", real_write)
    assert len(render.read_manifest(out / "manifest.jsonl")) == 3
    resumed = corpus.generate_corpus(run, out, **opts)
    assert [e["index"] for e in resumed] == list(range(7))
    for a, b in zip(whole, resumed):
        assert a == b
        for key in ("file", "image"):
            assert (tmp_path / "whole" / a[key]).read_bytes() == (out / b[key]).read_bytes()
    with pytest.raises(corpus.UserError, match="context"):  # a resume with the other context would mix schemes
        corpus.generate_corpus(run, out, **{**opts, "sampling": Sampling(max_events=70, context=other)})


def test_streamed_copy_guard_redraws_as_the_batched_one_does(run, monkeypatch):
    from mgpt.sample import corpus
    from mgpt.sample.run import Sampling

    # A stand-in for the training index: a row "copies" when the sum of its ids is even.
    guard = corpus.CopyGuard(index=None, piece_ids=[], vocab=run.vocab, max_seconds=5.0, tries=3)
    monkeypatch.setattr(corpus.CopyGuard, "longest_copy",
                        lambda self, ids: {"seconds": 9.0 * (int(np.sum(ids)) % 2 == 0), "notes": 1, "train_piece_id": "t"})
    sampling = run.sampling(Sampling(max_events=40, context="rolling"))
    todo = corpus.plan(6, ["bach", "chopin"], seed=3)
    args = (run, todo, None, sampling, 4, [_device(run)], guard, True)
    streamed = sorted(corpus._streamed(*args), key=lambda x: x[0].index)
    grouped = list(corpus._grouped(*args, None))
    assert [p.index for p, _, _ in streamed] == list(range(6))
    assert any(len(f["copy_tries"]) > 1 for _, _, f in streamed), "some piece must have been re-drawn"
    for (p, row, fields), (q, row2, fields2) in zip(streamed, grouped):
        assert p == q and row.tobytes() == row2.tobytes() and fields == fields2


def _device(run):
    from mgpt.sample.run import _device_of

    return _device_of(run.model)


def test_an_unknown_context_is_refused_in_one_line():
    from mgpt.errors import UserError
    from mgpt.sample.run import Sampling

    with pytest.raises(UserError, match="--context must be one of reprefill, rolling"):
        Sampling(context="sliding")


def test_only_real_limits_or_controls_take_a_rolling_corpus_off_the_continuous_sampler():
    from mgpt.sample.run import Sampling

    assert not Sampling(context="rolling").windowed_only()
    assert not Sampling(context="rolling", controls="", mood="").windowed_only()  # the flags' empty defaults
    assert Sampling(context="rolling", max_polyphony=2).windowed_only()
    assert Sampling(context="rolling", mood="calm").windowed_only()


def test_longest_budgets_start_first_so_a_mixed_plan_leaves_fewer_idle_slots():
    # Budgets rising through the plan: in plan order the longest pieces start last and run alone
    # at the end; longest first, the short ones fill the tail. The pieces are the same either way.
    from tests.test_sample import _fixed_model
    from mgpt.sample.continuous import ContinuousSampler
    from mgpt.sample.sampler import sampling_settings, token_tables

    pref_V = np.zeros(VOCAB.size)
    pref_V[VOCAB.eos_id] = -100.0  # every piece runs to its budget
    m = _fixed_model(pref_V)
    budgets = [4 * (i + 1) for i in range(12)]
    out = {}
    for order in ("plan", "longest_first"):
        sampler = ContinuousSampler(m, VOCAB, batch_size=4, settings=sampling_settings(top_p=0.95),
                                    tables=token_tables(VOCAB), chunk_steps=8, order=order)
        for i, budget in enumerate(budgets):
            sampler.add(i, np.array([STYLE]), 7 + i, max_events=budget, max_steps=10**9)
        rows, first_out = {}, []
        while sampler.busy:
            done = sampler.step()
            first_out += [p for p, _ in done]
            rows.update(done)
        out[order] = (rows, sampler.events / sampler.slot_steps, first_out)
    (plan_rows, plan_occ, _), (lpt_rows, lpt_occ, lpt_out) = out["plan"], out["longest_first"]
    assert all(plan_rows[i].tobytes() == lpt_rows[i].tobytes() for i in range(12))
    assert [len(lpt_rows[i]) - 1 for i in range(12)] == budgets
    assert lpt_occ > plan_occ + 0.05, (lpt_occ, plan_occ)
    assert lpt_out[-1] in range(4)  # a short piece is the last out
    with pytest.raises(ValueError, match="order"):
        ContinuousSampler(m, VOCAB, batch_size=4, settings=sampling_settings(), tables=token_tables(VOCAB),
                          order="shortest")


@pytest.fixture(scope="module")
def heard_model():
    """A model that also reads the notes sounding (model.sounding_pitches), its vectors made large
    enough that a wrong count changes what is drawn, in eighths, so that their sums are exact in
    any order (a prefill and a decode step add them in different orders)."""
    cfg = ModelConfig(vocab_size=VOCAB.size, num_layers=2, num_heads=2, d_model=32, mlp_dim=64, max_len=16,
                      sounding_pitches=VOCAB.note_off_offset - VOCAB.note_on_offset)
    m = GPT(cfg, rngs=nnx.Rngs(0))
    m.sounding = nnx.Param(jnp.round(8 * jax.random.normal(jax.random.key(1), m.sounding[...].shape)) / 8)
    return m


@pytest.mark.slow
def test_a_model_hearing_notes_draws_the_same_pieces_on_every_sampling_path(heard_model):
    # The notes heard are counted in the windowed sampler's prefill and steps, and in the continuous
    # sampler's forced and drawn steps: the pieces must agree as they do for a plain model.
    test_continuous_reprefill_writes_the_windowed_samplers_pieces(heard_model)
    test_rolling_generate_tokens_matches_the_windowed_sampler_in_the_first_window(heard_model)
