"""An LSTM language model over event ids: the Performance RNN baseline, in Flax NNX.

Stacked LSTM layers between an embedding and an output projection. The trainer
builds it when `config.model.kind == 'lstm'` (see configs/lstm.py), so it trains
with exactly the GPT's data pipeline, schedule and step, for the same number of
tokens, with AdamW (its better optimizer; configs/lstm.py); `mgpt.evaluate` scores
both on the same test split.

The time recurrence is one `jax.lax.scan` per layer. The input half of every gate
(`x @ W_x`) is a single matmul over the whole sequence before the scan, so the
scanned body is only the recurrent `h @ W_h`: small and quick to compile.
Parameters carry the same logical axis names as the GPT's ('vocab', 'embed', 'mlp'),
so the trainer's rule table places them too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
    """Shape and numerics of an LSTMLM. `d_model` is both the embedding and the hidden width."""

    vocab_size: int
    num_layers: int = 2
    d_model: int = 320
    dtype: str = "float32"  # compute dtype of the matmuls; the cell state stays fp32
    param_dtype: str = "float32"
    dropout: float = 0.0  # on the embedding and each layer's output, in training only (as the GPT's)

    def __post_init__(self):
        for f in ("vocab_size", "num_layers", "d_model"):
            v = getattr(self, f)
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"model.{f}: must be a positive integer, got {v!r}")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in _DTYPES:
                raise ValueError(f"model.{f}: must be one of {_DTYPES}, got {getattr(self, f)!r}")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0 <= self.dropout < 1):
            raise ValueError(f"model.dropout: must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any] | Any, vocab_size: int) -> "LSTMConfig":
        """From `config.model`; GPT-only fields there (num_heads, mlp_dim, ...) are ignored."""
        from mgpt.model.gpt import dataclass_from_config

        return dataclass_from_config(cls, model_config, vocab_size)

    def num_params(self) -> int:
        """Number of parameters of `LSTMLM(self)`, from the config alone."""
        d, v = self.d_model, self.vocab_size
        per_layer = 2 * d * 4 * d + 4 * d  # input and recurrent kernels, gate biases
        return v * d + self.num_layers * per_layer + d * v + v

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 x the weights used in matmuls.

        An LSTM's cost per token does not depend on the sequence length; `seq_len` is
        accepted so the trainer calls every model kind the same way.
        """
        del seq_len
        d = self.d_model
        return 6.0 * (self.num_layers * 2 * d * 4 * d + d * self.vocab_size)


def _param(value, axes: tuple) -> nnx.Param:
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class LSTMLayer(nnx.Module):
    """One LSTM layer over a whole sequence: x_BxLxD -> h_BxLxD (zero initial state).

    `start_BxL` (bool) marks tokens that open a new packed piece: the state is zeroed
    before them, so a piece never reads the one packed before it."""

    def __init__(self, cfg: LSTMConfig, rngs: nnx.Rngs):
        d, pdt = cfg.d_model, cfg.param_dtype
        self.cfg = cfg
        # Gates are stacked on axis 1 in the order (input, forget, cell, output).
        self.w_x = _param(
            jax.random.normal(rngs.params(), (d, 4, d), pdt) * d**-0.5, ("embed", None, "mlp")
        )
        self.w_h = _param(
            jax.random.normal(rngs.params(), (d, 4, d), pdt) * d**-0.5, ("embed", None, "mlp")
        )
        # A forget-gate bias of 1 keeps early gradients flowing through the cell state.
        self.b = _param(jnp.zeros((4, d), pdt).at[1].set(1.0), (None, "mlp"))

    def __call__(self, x_BxLxD, start_BxL=None):
        dt = self.cfg.dtype
        b, _, d = x_BxLxD.shape
        gx_BxLx4xD = jnp.einsum("bld,dgh->blgh", x_BxLxD.astype(dt), self.w_x[...].astype(dt))
        gx_BxLx4xD = gx_BxLx4xD.astype(jnp.float32) + self.b[...].astype(jnp.float32)
        w_h = self.w_h[...].astype(dt)

        def step(carry, inputs):
            gx_Bx4xD, start_Bx1 = inputs
            h_BxD, c_BxD = carry
            h_BxD, c_BxD = jnp.where(start_Bx1, 0.0, h_BxD), jnp.where(start_Bx1, 0.0, c_BxD)
            g_Bx4xD = gx_Bx4xD + jnp.einsum(
                "bd,dgh->bgh", h_BxD.astype(dt), w_h, preferred_element_type=jnp.float32
            )
            i, f, g, o = (g_Bx4xD[:, k] for k in range(4))
            c_BxD = jax.nn.sigmoid(f) * c_BxD + jax.nn.sigmoid(i) * jnp.tanh(g)
            h_BxD = jax.nn.sigmoid(o) * jnp.tanh(c_BxD)
            return (h_BxD, c_BxD), h_BxD

        zeros_BxD = jnp.zeros((b, d), jnp.float32)
        if start_BxL is None:
            start_BxL = jnp.zeros(x_BxLxD.shape[:2], bool)
        start_LxBx1 = start_BxL.swapaxes(0, 1)[..., None]
        _, h_LxBxD = jax.lax.scan(step, (zeros_BxD, zeros_BxD), (gx_BxLx4xD.swapaxes(0, 1), start_LxBx1))
        return h_LxBxD.swapaxes(0, 1).astype(dt)


class LSTMLM(nnx.Module):
    """`LSTMLM(cfg, rngs=nnx.Rngs(seed))`; `model(tokens_BxL[, positions_BxL, segment_ids_BxL]) -> logits_BxLxV`."""

    def __init__(self, cfg: LSTMConfig, *, rngs: nnx.Rngs):
        d, v, pdt = cfg.d_model, cfg.vocab_size, cfg.param_dtype
        self.cfg = cfg
        self.embed = _param(jax.random.normal(rngs.params(), (v, d), pdt), ("vocab", "embed"))
        self.layers = nnx.List([LSTMLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.out = _param(jax.random.normal(rngs.params(), (d, v), pdt) * d**-0.5, ("embed", "vocab"))
        self.out_bias = _param(jnp.zeros((v,), pdt), ("vocab",))

    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, *, activation_sharding=None,
                 dropout_key=None):
        """float32 logits_BxLxV. Positions are implicit in the recurrence; a change of
        segment id (packed rows) restarts the state. `activation_sharding`: of the BxLxD
        activations, and `dropout_key` (training only), as for mgpt.model.GPT."""
        from mgpt.model.gpt import apply_dropout

        keys = None
        if dropout_key is not None and self.cfg.dropout > 0:
            keys = list(jax.random.split(dropout_key, len(self.layers) + 1))
        del positions_BxL
        start_BxL = None
        if segment_ids_BxL is not None:
            start_BxL = jnp.pad(segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1], ((0, 0), (1, 0)))
        x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(self.cfg.dtype)
        if keys:
            x_BxLxD = apply_dropout(x_BxLxD, self.cfg.dropout, keys.pop())
        for layer in self.layers:
            if activation_sharding is not None:
                x_BxLxD = jax.lax.with_sharding_constraint(x_BxLxD, activation_sharding)
            x_BxLxD = layer(x_BxLxD, start_BxL)
            if keys:
                x_BxLxD = apply_dropout(x_BxLxD, self.cfg.dropout, keys.pop())
        logits_BxLxV = jnp.einsum(
            "bld,dv->blv", x_BxLxD, self.out[...].astype(self.cfg.dtype), preferred_element_type=jnp.float32
        )
        return logits_BxLxV + self.out_bias[...].astype(jnp.float32)
