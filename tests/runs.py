"""Run folders for tests that need a model to load but not a trained one."""

import os


def save_untrained_run(workdir: str, vocab, max_len: int, prepare=None, steps=(3,), **model) -> str:
    """`workdir` holding step 3 of a randomly initialised one-layer GPT of `max_len` events, as
    mgpt.train writes it (weights, config.json, vocab.json); `prepare(model, vocab)` may set its
    weights first. Its config names a dataset that is not there. `steps`: the steps saved (the
    same weights); `model`: other config.model fields (num_layers, d_model, ...)."""
    import grain
    import jax.numpy as jnp
    from flax import nnx

    from configs import tiny
    from mgpt.model import GPT, ModelConfig
    from mgpt.train import checkpoint as ckpt_lib

    config = tiny.get_config()
    config.model.update({"num_layers": 1, "num_heads": 2, "d_model": 32, "mlp_dim": 64, "max_len": max_len, **model})
    config.data.dataset_dir = os.path.join(workdir, "no_dataset_here")
    model = GPT(ModelConfig.from_config(config.model, vocab.size), rngs=nnx.Rngs(0))
    if prepare is not None:
        prepare(model, vocab)
    ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
    state = {"params": nnx.state(model, nnx.Param), "step": jnp.asarray(3, jnp.int32)}
    for step in steps:
        state["step"] = jnp.asarray(step, jnp.int32)
        ckpts.save(step, state, iter(grain.MapDataset.range(1).to_iter_dataset()), config.to_dict(), vocab.to_json())
        ckpts.wait()
    ckpts.close()
    return workdir


def context_free_model(cfg, pref_V):
    """A GPT whose next-event logits are `pref_V` (scaled) whatever came before: every block's
    output is zeroed and every embedding is ones, so the unembedding alone decides. Tests of the
    sampler's masks use it to lean towards what a mask forbids."""
    import jax.numpy as jnp
    from flax import nnx

    from mgpt.model import GPT

    m = GPT(cfg, rngs=nnx.Rngs(1))
    m.embed[...] = jnp.ones_like(m.embed[...])
    for block in m.blocks:
        block.attn.out[...] = jnp.zeros_like(block.attn.out[...])
        block.mlp.wo[...] = jnp.zeros_like(block.mlp.wo[...])
    m.unembed[...] = jnp.broadcast_to(jnp.asarray(pref_V) / cfg.d_model, m.unembed.shape)
    return m
