"""The training recipe: where every model starts, and what dropout may and may not change."""

import dataclasses
import functools
import importlib
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mgpt.model import kinds as models
from mgpt.train import loop as train
from mgpt.model import GPT, ModelConfig

VOCAB_SIZE = 320  # about the demo vocabulary's size (ln 320 = 5.77)


def _config(spec: str) -> ml_collections.ConfigDict:
    name, _, arg = spec.partition(":")
    module = importlib.import_module(f"configs.{name}")
    return module.get_config(arg) if arg else module.get_config()


def _step0_loss(model_cfg: ml_collections.ConfigDict, seed: int = 0) -> float:
    model = models.build_model(model_cfg, VOCAB_SIZE, nnx.Rngs(params=jax.random.PRNGKey(seed)))
    tokens_BxL = jax.random.randint(jax.random.PRNGKey(seed + 1), (2, 33), 0, VOCAB_SIZE)
    logits_BxLxV = model(tokens_BxL[:, :-1]).astype(jnp.float32)
    log_p_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    return -float(jnp.mean(jnp.take_along_axis(log_p_BxLxV, tokens_BxL[:, 1:, None], axis=-1)))


@pytest.mark.parametrize("spec", ["tiny", "small", "base", pytest.param("large", marks=pytest.mark.slow),
                                  "lstm:tiny", "lstm:small", "lstm:base",
                                  pytest.param("lstm:large", marks=pytest.mark.slow)])
def test_step0_loss_is_a_uniform_guess_for_every_config(spec):
    """A model starts at ln V (+-0.2): no token is favoured before training, the current one included.

    Each config's own widths, heads, dtype and vocabulary-sized output; depth is cut to at most
    two layers so `large` fits a test (the output's scale does not depend on depth: the final
    norm sets the stream to unit RMS whatever came before)."""
    model_cfg = _config(spec).model
    model_cfg.num_layers = min(model_cfg.num_layers, 2)
    if model_cfg.get("kind", "gpt") == "lstm" and model_cfg.d_model > 2048:
        model_cfg.num_layers = 1
    for seed in (0, 1):
        loss = _step0_loss(model_cfg, seed)
        assert abs(loss - math.log(VOCAB_SIZE)) <= 0.2, f"{spec}: step-0 loss {loss:.3f}, ln V {math.log(VOCAB_SIZE):.3f}"


def test_a_tied_model_still_builds_as_it_was_written():
    """Checkpoints written before untying hold tied_embeddings=True: that model keeps its one table."""
    cfg = ModelConfig(vocab_size=40, num_layers=1, num_heads=2, d_model=32, mlp_dim=64, max_len=16,
                      tied_embeddings=True)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    assert not hasattr(model, "unembed")
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


TINY = dict(vocab_size=40, num_layers=2, num_heads=2, d_model=32, mlp_dim=64, max_len=16)


def _batch(seed=0, b=4, length=16):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, TINY["vocab_size"], (b, length + 1)).astype(np.int32)
    segment_ids = np.ones((b, length), np.int32)
    segment_ids[:, length // 2:] = 2  # two packed pieces per row
    positions = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)])[None].repeat(b, 0)
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "mask": jnp.ones((b, length), jnp.float32), "positions": jnp.asarray(positions, jnp.int32),
            "segment_ids": jnp.asarray(segment_ids)}


def _train_state(cfg, tx):
    model = GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


@functools.lru_cache(maxsize=None)
def _two_steps(cfg, dropout_seed):
    t = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=0, steps=10, min_lr_ratio=0.1,
                                       weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, grad_accum=1,
                                       z_loss=0.0))
    tx = train.make_optimizer(t)
    graphdef, state = _train_state(cfg, tx)
    step = jax.jit(train.make_train_step(graphdef, tx, t, None, dropout_seed))
    losses = []
    for s in range(2):
        state, metrics = step(state, _batch(s))
        losses.append(float(metrics["loss"]))
    return graphdef, state, losses


@pytest.mark.parametrize("scan_layers", [False, True])
def test_dropout_off_trains_bit_for_bit_as_without_it(scan_layers):
    cfg = ModelConfig(**TINY, scan_layers=scan_layers)
    _, plain, plain_losses = _two_steps(cfg, None)
    _, keyed, keyed_losses = _two_steps(cfg, 7)  # a key, but dropout 0: ignored
    assert plain_losses == keyed_losses
    for a, b in zip(jax.tree.leaves(plain["params"]), jax.tree.leaves(keyed["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_dropout_changes_training_but_not_evaluation_or_sampling(scan_layers):
    cfg = ModelConfig(**TINY, scan_layers=scan_layers, dropout=0.1)
    _, _, off_losses = _two_steps(ModelConfig(**TINY, scan_layers=scan_layers), None)
    graphdef, state, on_losses = _two_steps(cfg, 7)
    _, _, again_losses = _two_steps(cfg, 7)
    assert on_losses != off_losses, "dropout draws masks in training"
    assert on_losses == again_losses, "the same seed draws the same masks"
    model = nnx.merge(graphdef, state["params"])
    batch = _batch(5)
    # Evaluation and sampling call the model without a key: deterministic, and equal to the same
    # weights built with dropout 0.
    plain = nnx.merge(nnx.split(GPT(ModelConfig(**TINY, scan_layers=scan_layers), rngs=nnx.Rngs(0)),
                                nnx.Param)[0], state["params"])
    np.testing.assert_array_equal(np.asarray(model(batch["inputs"])), np.asarray(model(batch["inputs"])))
    np.testing.assert_array_equal(np.asarray(model(batch["inputs"])), np.asarray(plain(batch["inputs"])))
    cache = model.init_cache(4, 16)
    positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (4, 16))
    decoded, _ = model.decode(batch["inputs"], positions, cache)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(model(batch["inputs"])), atol=2e-4)
    eval_step = jax.jit(train.make_eval_step(graphdef))
    np.testing.assert_array_equal(np.asarray(eval_step(state["params"], batch)["nats"]),
                                  np.asarray(jax.jit(train.make_eval_step(nnx.split(plain, nnx.Param)[0]))(
                                      state["params"], batch)["nats"]))


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_dropout_drops_its_rate_and_keeps_the_mean(rate):
    from mgpt.model.gpt import apply_dropout

    x = jnp.ones((200_000,), jnp.float32)
    y = np.asarray(apply_dropout(x, rate, jax.random.key(3, impl="rbg")))
    assert abs(np.mean(y == 0) - rate) < 0.01
    assert abs(y.mean() - 1.0) < 0.01
    assert set(np.unique(y[y != 0])) == {np.float32(y[y != 0][0])}  # one scale for every kept element


def test_a_tiny_dropout_rate_still_draws_a_valid_mask():
    from mgpt.model.gpt import apply_dropout

    y = np.asarray(apply_dropout(jnp.ones((4096,), jnp.float32), 1e-4, jax.random.key(0, impl="rbg")))
    assert np.isfinite(y).all() and abs(y.mean() - 1.0) < 0.05


def test_heard_notes_decode_as_the_full_forward_and_restart_with_each_packed_piece():
    from data_prep.vocab import Vocabulary
    from mgpt.model.gpt import heard_counts

    vocab = Vocabulary(["bach"])
    pitches = vocab.note_off_offset - vocab.note_on_offset
    cfg = ModelConfig(vocab_size=vocab.size, num_layers=2, num_heads=2, d_model=32, mlp_dim=64, max_len=32,
                      sounding_pitches=pitches)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    model.sounding = nnx.Param(jax.random.normal(jax.random.key(1), model.sounding[...].shape))
    on, off = vocab.note_on_offset, vocab.note_off_offset
    piece = [vocab.style_id("bach"), on + 40, on + 44, vocab.time_shift_offset + 9, off + 40, on + 47,
             vocab.time_shift_offset + 3, off + 44, off + 47, on + 40]
    tokens_1xL = jnp.asarray([piece], jnp.int32)
    counts = np.asarray(heard_counts(tokens_1xL, pitches))[0]
    assert [np.flatnonzero(c).tolist() for c in counts][-3:] == [[47], [], [40]]
    full_1xLxV = model(tokens_1xL)
    # Decoded in two chunks, the second told what the first left sounding.
    cache = model.init_cache(1, 32)
    first, cache = model.decode(tokens_1xL[:, :4], jnp.arange(4)[None], cache)
    second, _ = model.decode(tokens_1xL[:, 4:], jnp.arange(4, 10)[None], cache, heard_counts(tokens_1xL[:, :4],
                                                                                          pitches)[:, -1])
    np.testing.assert_allclose(np.concatenate([first, second], 1), full_1xLxV, atol=2e-4)
    # Packed after another piece that leaves notes sounding, it is scored as if alone.
    other = [vocab.style_id("bach"), on + 30, on + 31, on + 32]
    packed = jnp.asarray([other + piece], jnp.int32)
    segments = jnp.asarray([[1] * len(other) + [2] * len(piece)], jnp.int32)
    positions = jnp.asarray([list(range(len(other))) + list(range(len(piece)))], jnp.int32)
    np.testing.assert_allclose(model(packed, positions, segments)[:, len(other):], full_1xLxV, atol=2e-4)
    # Without the input, the same weights score differently: the input is read.
    assert not np.allclose(np.asarray(GPT(dataclasses.replace(cfg, sounding_pitches=0), rngs=nnx.Rngs(0))(tokens_1xL)),
                           np.asarray(full_1xLxV), atol=1e-3)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_muon_orthogonalizes_the_hidden_matrices_and_leaves_the_rest_to_adamw(scan_layers):
    """train.optimizer='muon': each hidden matrix (q, k, v, the attention output, the MLP's halves)
    moves by an orthogonalized step, its singular values alike; the embedding keeps AdamW's."""
    cfg = ModelConfig(**TINY, scan_layers=scan_layers)
    t = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=0, steps=10, min_lr_ratio=0.1,
                                       weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=0.0, grad_accum=1,
                                       z_loss=0.0, optimizer="muon"))
    tx = train.make_optimizer(t)
    graphdef, state = _train_state(cfg, tx)
    new, _ = jax.jit(train.make_train_step(graphdef, tx, t, None, None))(state, _batch(0))
    delta = jax.tree.map(lambda a, b: np.asarray(b, np.float64) - np.asarray(a, np.float64),
                         nnx.to_pure_dict(state["params"]), nnx.to_pure_dict(new["params"]))

    def spread(m):  # the largest singular value over the one at 80 % of the rank. At init a few
        sv = np.linalg.svd(m, compute_uv=False)  # directions have next to no gradient, so the
        return sv[0] / sv[int(0.8 * len(sv)) - 1]  # smallest ones stay small (AdamW's: 4-12 here)

    layers = delta["blocks"] if scan_layers else {"0": delta["blocks"][0]}
    for block in (layers if not scan_layers else {"all": layers}).values():
        qkv = block["attn"]["qkv"].reshape(-1, *block["attn"]["qkv"].shape[-4:])
        out = block["attn"]["out"].reshape(-1, *block["attn"]["out"].shape[-3:])
        wi = block["mlp"]["wi"].reshape(-1, *block["mlp"]["wi"].shape[-3:])
        wo = block["mlp"]["wo"].reshape(-1, *block["mlp"]["wo"].shape[-2:])
        for layer in range(qkv.shape[0]):
            d = qkv.shape[1]
            matrices = [qkv[layer][:, i].reshape(d, -1) for i in range(3)]
            matrices += [out[layer].reshape(-1, out.shape[-1]), wi[layer][:, 0], wi[layer][:, 1], wo[layer]]
            for m in matrices:
                assert spread(m) < 2.0, f"layer {layer}: a hidden matrix's step is not orthogonalized ({spread(m):.1f})"
    assert spread(delta["embed"]) > 3.0, "the embedding's step is AdamW's, not orthogonalized"
