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
