import dataclasses
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mgpt.model import GPT, ModelConfig

TINY = dict(vocab_size=40, num_layers=2, num_heads=2, d_model=32, mlp_dim=64, max_len=16)


def _tokens(b=2, length=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY["vocab_size"], (b, length)), jnp.int32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_shapes_and_logits_are_float32(dtype):
    model = GPT(ModelConfig(**TINY, dtype=dtype), rngs=nnx.Rngs(0))
    logits_BxLxV = model(_tokens())
    assert logits_BxLxV.shape == (2, 12, TINY["vocab_size"])
    assert logits_BxLxV.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits_BxLxV)))
    params = nnx.state(model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = GPT(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    tokens_BxL = _tokens()
    changed_BxL = tokens_BxL.at[:, 7].set((tokens_BxL[:, 7] + 1) % TINY["vocab_size"])
    a, b = model(tokens_BxL), model(changed_BxL)
    np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
    assert not np.allclose(np.asarray(a[:, 7:]), np.asarray(b[:, 7:]))


def _pack(*pieces):
    """One row holding the pieces back to back: tokens, positions restarting at 0, segment ids 1, 2, ..."""
    tokens = np.concatenate(pieces)
    positions = np.concatenate([np.arange(len(p)) for p in pieces])
    segment_ids = np.concatenate([np.full(len(p), i + 1) for i, p in enumerate(pieces)])
    return (jnp.asarray(x[None], jnp.int32) for x in (tokens, positions, segment_ids))


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_packed_piece_scores_as_if_alone(kind):
    from mgpt.model import lstm

    if kind == "gpt":
        model = GPT(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    else:
        model = lstm.LSTMLM(lstm.LSTMConfig(vocab_size=TINY["vocab_size"], num_layers=2, d_model=32), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    first, second = rng.integers(1, TINY["vocab_size"], 5), rng.integers(1, TINY["vocab_size"], 9)
    tokens_1xL, positions_1xL, segment_ids_1xL = _pack(first, second)
    packed_1xLxV = model(tokens_1xL, positions_1xL, segment_ids_1xL)
    alone_1xLxV = model(jnp.asarray(second[None], jnp.int32))
    np.testing.assert_allclose(np.asarray(packed_1xLxV[0, 5:]), np.asarray(alone_1xLxV[0]), rtol=1e-5, atol=1e-5)
    # Without the segment ids the second piece reads the first as its context: not the same scores.
    unpacked_1xLxV = model(tokens_1xL)
    assert not np.allclose(np.asarray(unpacked_1xLxV[0, 5:]), np.asarray(alone_1xLxV[0]), atol=1e-3)


@pytest.mark.parametrize("tied", [True, False])
def test_count_params_matches_the_instantiated_model(tied):
    cfg = ModelConfig(**TINY, tied_embeddings=tied)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    actual = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert cfg.num_params() == actual
    # Attention term grows with sequence length; the 6N part does not.
    assert cfg.flops_per_token(2048) - cfg.flops_per_token(1024) == 12 * 2 * 32 * 1024


def test_every_param_has_logical_axis_names_that_map_to_mesh_axes():
    cfg = ModelConfig(**TINY, tied_embeddings=False)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    allowed = {"vocab", "embed", "mlp", "heads", "kv", "norm", None}
    specs = jax.tree.leaves(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert len(specs) == len(params)
    for spec, p in zip(specs, params):
        assert len(spec) == p.ndim and set(spec) <= allowed and set(spec) - {None}
    # Unlisted logical names pass through unmapped, so a rule table lists them all.
    rules = (
        ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"), ("kv", None), ("norm", None)
    )
    with nnx.logical_axis_rules(rules):
        mapped = jax.tree.leaves(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    assert {a for s in mapped for a in s} <= {"fsdp", "tensor", None}
    assert ("tensor", "fsdp") in {tuple(s) for s in mapped}  # the (vocab, embed) embedding


def test_remat_policies_give_the_same_gradients():
    tokens_BxL = _tokens()

    def grads(remat):
        model = GPT(ModelConfig(**TINY, remat=remat), rngs=nnx.Rngs(0))
        g = nnx.jit(nnx.grad(lambda m: jnp.mean(m(tokens_BxL) ** 2)))(model)
        return jax.tree.leaves(g)

    for a, b in zip(grads("none"), grads("dots")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_from_config_ignores_unknown_fields_and_names_bad_ones():
    cfg = ModelConfig.from_config({**TINY, "kind": "gpt", "vocab_size": 1}, vocab_size=40)
    assert cfg.vocab_size == 40 and cfg.d_model == 32
    with pytest.raises(ValueError, match="model.num_heads"):
        ModelConfig(**{**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="model.remat"):
        ModelConfig(**TINY, remat="some")


def test_sharded_forward_on_an_8_device_mesh_matches_one_device():
    script = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        from mgpt.model import GPT, ModelConfig
        cfg = ModelConfig(vocab_size=40, num_layers=2, num_heads=2, d_model=32, mlp_dim=64,
                          max_len=16, tied_embeddings=False)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (4, 12)), jnp.int32)
        ref = GPT(cfg, rngs=nnx.Rngs(0))(tokens)
        mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
        rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"),
                 ("kv", None), ("norm", None))
        with nnx.logical_axis_rules(rules):
            abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
            graphdef, abs_state = nnx.split(abstract)
            shardings = nnx.get_named_sharding(abs_state, mesh)
        init = jax.jit(lambda: nnx.state(GPT(cfg, rngs=nnx.Rngs(0))), out_shardings=shardings)
        state = init()
        fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
        tokens = jax.device_put(tokens, jax.NamedSharding(mesh, jax.P("data")))
        out = fwd(state, tokens)
        assert len(state["embed"][...].sharding.device_set) == 8
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4)
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def _unrolled_copy(scanned: GPT) -> GPT:
    """An unrolled GPT holding the scanned one's weights (layer i = slice i of the stack)."""
    unrolled = GPT(dataclasses.replace(scanned.cfg, scan_layers=False), rngs=nnx.Rngs(1))
    state = nnx.state(scanned, nnx.Param)
    for i, block in enumerate(unrolled.blocks):
        nnx.update(block, jax.tree.map(lambda a: a[i], state["blocks"]))
    nnx.update(unrolled, {k: v for k, v in state.items() if k != "blocks"})
    return unrolled


@pytest.mark.parametrize("remat", ["none", pytest.param("dots", marks=pytest.mark.slow)])
def test_scanned_layers_compute_what_unrolled_ones_do(remat):
    scanned = GPT(ModelConfig(**TINY, scan_layers=True, remat=remat, tied_embeddings=False), rngs=nnx.Rngs(0))
    unrolled = _unrolled_copy(scanned)
    tokens_BxL = _tokens()
    segment_ids_BxL = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12], jnp.int32)
    np.testing.assert_allclose(np.asarray(scanned(tokens_BxL, None, segment_ids_BxL)),
                               np.asarray(unrolled(tokens_BxL, None, segment_ids_BxL)), atol=1e-5)
    loss = lambda m: jnp.mean(m(tokens_BxL) ** 2)
    g_scanned = nnx.state(nnx.grad(loss)(scanned), nnx.Param)
    g_unrolled = nnx.state(nnx.grad(loss)(unrolled), nnx.Param)
    for i in range(TINY["num_layers"]):
        for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[i], g_scanned["blocks"])),
                        jax.tree.leaves(g_unrolled["blocks"][i])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_scanned_params_carry_a_leading_layers_axis_that_is_never_sharded():
    cfg = ModelConfig(**TINY, scan_layers=True)
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    qkv = nnx.state(abstract, nnx.Param)["blocks"]["attn"]["qkv"]
    assert qkv.shape == (TINY["num_layers"], 32, 3, 2, 16)
    assert qkv.get_metadata()["out_sharding"] == ("layers", "embed", None, "heads", "kv")
    from configs import common
    from mgpt.train import mesh as mesh_lib

    assert mesh_lib.rule_table(common.DEFAULT_RULES)["layers"] == ()


def test_cached_decode_of_scanned_layers_matches_full_forward():
    cfg = ModelConfig(**TINY, scan_layers=True)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    tokens_BxL = _tokens(b=2, length=cfg.max_len)
    graphdef, state = nnx.split(model)
    full_BxLxV = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens_BxL)
    decode = jax.jit(lambda s, t, pos, c: nnx.merge(graphdef, s).decode(t, pos, c))
    cache = model.init_cache(2, cfg.max_len)
    assert len(cache) == cfg.num_layers  # one cache per layer, as for unrolled blocks
    logits_BxPxV, cache = decode(state, tokens_BxL[:, :9], jnp.broadcast_to(jnp.arange(9), (2, 9)), cache)
    np.testing.assert_allclose(np.asarray(logits_BxPxV), np.asarray(full_BxLxV[:, :9]), atol=1e-4)
    for p in range(9, cfg.max_len):
        logits_Bx1xV, cache = decode(state, tokens_BxL[:, p:p + 1], jnp.full((2, 1), p), cache)
        np.testing.assert_allclose(np.asarray(logits_Bx1xV[:, 0]), np.asarray(full_BxLxV[:, p]), atol=1e-4)


def _packed_attention_inputs():
    x_BxLxD = jax.random.normal(jax.random.PRNGKey(1), (2, 256, 64))
    # Row 0 packs three pieces and padding (segment 0); row 1 is one piece.
    lengths = (100, 60, 70, 26)
    segment_ids_BxL = jnp.stack([jnp.concatenate([jnp.full((n,), i) for i, n in zip((1, 2, 3, 0), lengths)]),
                                 jnp.ones((256,), jnp.int32)]).astype(jnp.int32)
    positions_BxL = jnp.stack([jnp.concatenate([jnp.arange(n) for n in lengths]), jnp.arange(256)])
    return x_BxLxD, positions_BxL, segment_ids_BxL


@pytest.mark.slow
def test_splash_attention_in_pallas_interpret_mode_matches_xla_with_packed_segments(monkeypatch):
    """The TPU kernel, run by Pallas' interpreter on the CPU: outputs and gradients of one
    attention layer equal XLA attention's on rows that pack several pieces."""
    from mgpt.model import gpt as model_lib

    monkeypatch.setattr(model_lib, "_SPLASH_INTERPRET", True)
    kw = dict(vocab_size=50, num_layers=1, num_heads=2, d_model=64, mlp_dim=64, max_len=256)
    splash = model_lib.Attention(ModelConfig(**kw, attention="splash"), nnx.Rngs(0))
    xla = model_lib.Attention(ModelConfig(**kw, attention="xla"), nnx.Rngs(0))
    x, positions, segments = _packed_attention_inputs()

    def loss_and_grad(layer):
        def loss(x_BxLxD):
            return jnp.sum(jnp.sin(layer(x_BxLxD, positions, segments)))
        return jax.value_and_grad(loss)(x), layer(x, positions, segments)

    (loss_s, grad_s), out_s = loss_and_grad(splash)
    (loss_x, grad_x), out_x = loss_and_grad(xla)
    np.testing.assert_allclose(out_s, out_x, atol=2e-5)
    np.testing.assert_allclose(grad_s, grad_x, atol=2e-5)
    # A piece cannot see the one packed before it: changing piece 1 leaves piece 2 alone.
    moved = splash(x.at[0, :100].add(1.0), positions, segments)
    np.testing.assert_allclose(moved[0, 100:], out_s[0, 100:], atol=1e-6)


def test_splash_off_tpu_falls_back_to_xla_attention_with_one_line(capfd, monkeypatch):
    from mgpt.model import gpt as model_lib

    monkeypatch.setattr(model_lib, "_said_fallback", False)
    kw = dict(vocab_size=50, num_layers=1, num_heads=2, d_model=64, mlp_dim=64, max_len=256)
    splash = model_lib.Attention(ModelConfig(**kw, attention="splash"), nnx.Rngs(0))
    xla = model_lib.Attention(ModelConfig(**kw, attention="xla"), nnx.Rngs(0))
    x, positions, segments = _packed_attention_inputs()
    np.testing.assert_array_equal(splash(x, positions, segments), xla(x, positions, segments))
    splash(x, positions, segments)
    lines = capfd.readouterr().out.strip().splitlines()
    assert lines == ["model.attention='splash' needs a TPU (the program is compiled for cpu); using XLA attention"]


def test_splash_needs_lengths_in_blocks_of_128():
    with pytest.raises(ValueError, match=r"^model\.attention: 'splash' .* max_len=200 must be a multiple of 128"):
        ModelConfig(vocab_size=10, max_len=200, attention="splash")
