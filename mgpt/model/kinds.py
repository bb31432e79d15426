"""The model kinds `config.model.kind` names: one table from kind to (config class, module class).

Every config class is a frozen dataclass built by `from_config(config.model, vocab_size)`,
with `num_params()` and `flops_per_token(seq_len)`; every module class is called as
`model(tokens_BxL, positions_BxL, segment_ids_BxL) -> logits_BxLxV`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mgpt.model import lstm
from mgpt.model import gpt as model
from mgpt.errors import UserError

KINDS = {
    "gpt": (model.ModelConfig, model.GPT),
    "lstm": (lstm.LSTMConfig, lstm.LSTMLM),
}


def _kind(model_cfg) -> tuple[type, type]:
    kind = model_cfg.get("kind", "gpt")
    if kind not in KINDS:
        raise UserError(f"config.model.kind: must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    return KINDS[kind]


def model_config(model_cfg: ml_collections.ConfigDict, vocab_size: int):
    """config.model -> the dataclass config of its kind (e.g. ModelConfig, LSTMConfig)."""
    config_class, _ = _kind(model_cfg)
    try:
        return config_class.from_config(model_cfg, vocab_size)
    except (ValueError, TypeError) as e:
        raise UserError(f"config.{e}" if str(e).startswith("model.") else f"config.model: {e}") from None


def build_model(model_cfg: ml_collections.ConfigDict, vocab_size: int, rngs: nnx.Rngs) -> nnx.Module:
    """The model config.model describes."""
    _, module_class = _kind(model_cfg)
    return module_class(model_config(model_cfg, vocab_size), rngs=rngs)


def abstract_model(model_cfg: ml_collections.ConfigDict, vocab_size: int) -> nnx.Module:
    """The model as shapes only. Sharding is the caller's to place: built without eager
    sharding, so no mesh is needed here."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: build_model(model_cfg, vocab_size, nnx.Rngs(0)))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def target_log_probs(graphdef, state, inputs_BxL, targets_BxL):
    """float32 log p(targets_BxL | inputs_BxL) at every position, teacher-forced, for a model of
    any kind split as `nnx.split(model)`: what the likelihood section and the sampler's style
    choice (`Run.scorer`) both read."""
    logits_BxLxV = nnx.merge(graphdef, state)(inputs_BxL).astype(jnp.float32)
    log_p_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    return jnp.take_along_axis(log_p_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
