"""A decoder-only Transformer for event sequences, in Flax NNX.

Pre-norm RMSNorm blocks, rotary position embeddings (relative positions, which
matter for music), a gated MLP (SwiGLU or GeGLU), optional tied embeddings, an
optional input of the notes sounding (`sounding_pitches`, `heard_counts`), and
attention through `jax.nn.dot_product_attention` (cuDNN flash on GPUs in bf16).

Training rows may pack several pieces: `segment_ids_BxL` (one id per piece, 0 for
PAD) keeps attention causal within a piece, and `positions_BxL` restart at 0 for each
piece, so a packed piece is scored exactly as if it were alone. On the XLA path the
segment test is a boolean Bx1xLxL mask next to the causal one; on the cuDNN path jax
turns the same mask into an additive Bx1xLxL bias (one LxL slab per row in the compute
dtype: 1 GiB for 128 rows of 2048 in bf16, split over the batch shards), which the
flash kernel reads.
Parameters are stored in `param_dtype` (fp32); matmuls run in `dtype` (bf16 for
the big configs); logits and softmax are fp32.

Every parameter carries logical axis names from {'vocab', 'embed', 'mlp',
'heads', 'kv', 'norm'} as `out_sharding` metadata. Sharding is never applied at
construction (`eager_sharding=False`); the trainer derives shardings with

    with nnx.logical_axis_rules(rules):            # e.g. (('embed', 'fsdp'), ...)
      abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
      shardings = nnx.get_named_sharding(nnx.state(abstract), mesh)

The KV cache (used by `mgpt.sample`) stores the key/value of absolute position
`p` at slot `p`, so prefill of a whole prompt and a 1-token decode step are the
same call: `logits, cache = model.decode(tokens_BxT, positions_BxT, cache)`.

The rolling cache (`RollingCache`, `GPT.decode_rolling`) holds a piece of any length in W =
max_len slots: the first S (the sink: the conditioning tokens, positions 0..S-1) stay, and
position p >= S goes to slot S + (p - S) mod (W - S), overwriting the oldest event. Rotary
attention depends only on the distance between query and key, so the ring needs no
re-prefill; the sink is read as if the query stood at most W - 1 after it, the farthest
a training crop puts its STYLE token from its last event.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

Cache = list[dict[str, jax.Array]]  # per layer: {'k', 'v'}: BxNxSxK (S = cache slots)

_REMAT_POLICIES = ("none", "full", "dots")
_MLP_ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu}
_ATTENTION = ("auto", "xla", "cudnn", "splash")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a GPT. Lengths are in events (tokens)."""

    vocab_size: int
    num_layers: int = 4
    num_heads: int = 4
    d_model: int = 256
    mlp_dim: int = 1024  # hidden width of the gated MLP
    max_len: int = 1024  # context length: the longest sequence the model attends over
    # Untied by default: a tied table at the scale the input needs makes every step-0 logit
    # favour the current token (11.9 nats/event at step 0 against ln V = 5.8), and it then
    # moves slowly under AdamW. Checkpoints written with True keep loading as tied.
    tied_embeddings: bool = False
    # Dropout rate on the embedding, the attention probabilities and each residual branch, in
    # training only (the train step passes a key; evaluation and sampling never do). 0 = off.
    dropout: float = 0.0
    # The notes heard: P > 0 adds to each position's input a learned vector per pitch sounding
    # after its token (`heard_counts`: NOTE_ON ids 2..2+P-1, NOTE_OFF ids 2+P..2+2P-1, counted from
    # the start of the row's piece), so attention need not work out which notes are still held.
    # P must be the vocabulary's pitch count (the trainer checks). 0 = off, the layout before it.
    sounding_pitches: int = 0
    dtype: str = "float32"  # compute dtype of matmuls/activations ('bfloat16' on GPU/TPU)
    param_dtype: str = "float32"
    remat: str = "none"  # per block: 'none' | 'full' (save nothing) | 'dots' (save matmuls)
    rope_base: float = 10_000.0
    mlp_activation: str = "silu"  # gate nonlinearity: 'silu' (SwiGLU) | 'gelu' (GeGLU)
    # 'auto' = cuDNN on GPU for bf16/fp16, else XLA; 'splash' = the Pallas splash-attention
    # kernel on TPU (blocks of 128 events that causality or the segments mask out are skipped,
    # and no LxL scores are stored), XLA elsewhere, said once.
    attention: str = "auto"
    # Blocks stored stacked (a leading 'layers' axis) and run by one scan, so compile time
    # does not grow with depth. Changes the checkpoint layout; False is the layout of
    # checkpoints written before this field existed.
    scan_layers: bool = False

    def __post_init__(self):
        def check(ok: bool, field: str, why: str):
            if not ok:
                raise ValueError(f"model.{field}: {why}")

        for f in ("vocab_size", "num_layers", "num_heads", "d_model", "mlp_dim", "max_len"):
            v = getattr(self, f)
            check(isinstance(v, int) and v > 0, f, f"must be a positive integer, got {v!r}")
        check(
            self.d_model % self.num_heads == 0,
            "num_heads",
            f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}",
        )
        check(self.head_dim % 2 == 0, "num_heads", f"head dim {self.head_dim} must be even for rotary embeddings")
        check(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        check(self.param_dtype in _DTYPES, "param_dtype", f"must be one of {_DTYPES}, got {self.param_dtype!r}")
        check(self.remat in _REMAT_POLICIES, "remat", f"must be one of {_REMAT_POLICIES}, got {self.remat!r}")
        check(self.rope_base > 1, "rope_base", f"must be > 1, got {self.rope_base!r}")
        check(
            self.mlp_activation in _MLP_ACTIVATIONS,
            "mlp_activation",
            f"must be one of {tuple(_MLP_ACTIVATIONS)}, got {self.mlp_activation!r}",
        )
        check(self.attention in _ATTENTION, "attention", f"must be one of {_ATTENTION}, got {self.attention!r}")
        check(isinstance(self.scan_layers, bool), "scan_layers", f"must be True or False, got {self.scan_layers!r}")
        check(isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0 <= self.dropout < 1,
              "dropout", f"must be in [0, 1), got {self.dropout!r}")
        check(isinstance(self.sounding_pitches, int) and not isinstance(self.sounding_pitches, bool)
              and self.sounding_pitches >= 0, "sounding_pitches",
              f"must be 0 (off) or the vocabulary's pitch count, got {self.sounding_pitches!r}")
        check(self.attention != "splash" or self.max_len % 128 == 0, "attention",
              f"'splash' works on blocks of 128 events: max_len={self.max_len} must be a multiple of 128")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any] | Any, vocab_size: int) -> "ModelConfig":
        """From `config.model` (ConfigDict or dict); fields not listed here (e.g. `kind`) are ignored."""
        return dataclass_from_config(cls, model_config, vocab_size)

    def num_params(self) -> int:
        """Number of parameters of `GPT(self)`, from the config alone."""
        d, f, layers = self.d_model, self.mlp_dim, self.num_layers
        per_block = 2 * d + 4 * d * d + 3 * d * f  # two norms, qkv + out, gated MLP
        embeddings = self.vocab_size * d * (1 if self.tied_embeddings else 2)
        return layers * per_block + d + embeddings + self.sounding_pitches * d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM convention.

        6 * N_matmul + 12 * num_layers * d_model * seq_len, where N_matmul counts
        every weight used in a matmul: the blocks' projections and the output
        (unembedding) projection, tied or not; the input embedding lookup and norm
        scales are excluded. The attention term counts the full LxL score and
        value matmuls (no causal halving), as PaLM's MFU does.
        """
        d, f = self.d_model, self.mlp_dim
        n_matmul = self.num_layers * (4 * d * d + 3 * d * f) + d * self.vocab_size
        return 6.0 * n_matmul + 12.0 * self.num_layers * d * seq_len


def dataclass_from_config(cls, model_config: Mapping[str, Any] | Any, vocab_size: int):
    """`cls(vocab_size, **fields of config.model that cls has)`: one config.model serves every model kind."""
    if hasattr(model_config, "to_dict"):
        model_config = model_config.to_dict()
    names = {f.name for f in dataclasses.fields(cls)} - {"vocab_size"}
    kwargs = {k: v for k, v in dict(model_config).items() if k in names}
    return cls(vocab_size=int(vocab_size), **kwargs)


# Decoding steps multiply a few rows (one token of each row, and of style guidance's twin) by every
# weight matrix. On XLA:CPU a product of 2 rows costs more than two products of one row, which run
# as matrix-vector products (192 x 1024 weights, inside a loop: 26.7 us against 13.8 us). So a
# decode step of up to ROWS_ONE_BY_ONE rows on CPU multiplies them one at a time: the demo model
# (`configs/small.py`), 2 rows, 0.83 -> 0.61 ms a step on the 2-core Xeon (docs/live.md); 8 rows
# gain nothing (1.80 -> 1.75 ms), so larger batches keep one product.
ROWS_ONE_BY_ONE = 4


def _rows_matmul(x_RxD, w_DxF, out_dtype=None):
    """x_RxD @ w_DxF, one row at a time where that is faster (see ROWS_ONE_BY_ONE)."""
    if x_RxD.shape[0] > ROWS_ONE_BY_ONE or jax.default_backend() != "cpu":
        return jnp.matmul(x_RxD, w_DxF, preferred_element_type=out_dtype)
    rows = [jnp.matmul(x_RxD[i], w_DxF, preferred_element_type=out_dtype) for i in range(x_RxD.shape[0])]
    return jnp.stack(rows)


def _param(rngs: nnx.Rngs, shape, std: float, axes: tuple, dtype) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        self.scale = nnx.Param(
            jnp.ones((cfg.d_model,), cfg.param_dtype), out_sharding=("norm",), eager_sharding=False
        )
        self.dtype = cfg.dtype

    def __call__(self, x_BxLxD):
        # Statistics in fp32: bf16 mean-of-squares loses too many bits.
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def _rope(x_BxLxNxK, positions_BxL, base: float):
    """Rotates pairs (i, i + K/2) of each head by angle position * base^(-2i/K)."""
    half = x_BxLxNxK.shape[-1] // 2
    inv_freq_H = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxLx1xH = (positions_BxL.astype(jnp.float32)[..., None] * inv_freq_H)[:, :, None, :]
    sin, cos = jnp.sin(angle_BxLx1xH), jnp.cos(angle_BxLx1xH)
    x = x_BxLxNxK.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxNxK.dtype)


def apply_dropout(x, rate: float, key):
    """Inverted dropout: zeros a share of x and scales the rest up, so the mean is unchanged.

    The mask is one random byte per element against a threshold: a quarter of the random bits of
    `bernoulli`'s 32-bit draw, which is what dropout on LxL attention probabilities spends its time
    on. So the share dropped is `rate` rounded to 1/256, at least 1/256 and at most 255/256 (0.1
    drops 26/256), and the scale is exact for the share kept."""
    keep_of_256 = min(max(round((1.0 - rate) * 256), 1), 255)
    keep = jax.random.bits(key, x.shape, jnp.uint8) < keep_of_256
    return jnp.where(keep, x * (256.0 / keep_of_256), 0).astype(x.dtype)


def _attention_with_dropout(q_BxLxNxK, k_BxLxNxK, v_BxLxNxK, same_Bx1xLxL, rate: float, key):
    """Causal attention with dropout on the probabilities; BxLxNxK in and out."""
    length = q_BxLxNxK.shape[1]
    scale = jnp.asarray(q_BxLxNxK.shape[-1] ** -0.5, q_BxLxNxK.dtype)
    scores_BxNxLxL = jnp.einsum("blnk,bmnk->bnlm", q_BxLxNxK * scale, k_BxLxNxK, preferred_element_type=jnp.float32)
    visible_Bx1xLxL = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if same_Bx1xLxL is not None:
        visible_Bx1xLxL = visible_Bx1xLxL & same_Bx1xLxL
    scores_BxNxLxL = jnp.where(visible_Bx1xLxL, scores_BxNxLxL, -jnp.inf)
    probs_BxNxLxL = apply_dropout(jax.nn.softmax(scores_BxNxLxL, axis=-1), rate, key).astype(v_BxLxNxK.dtype)
    return jnp.einsum("bnlm,bmnk->blnk", probs_BxNxLxL, v_BxLxNxK)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k = cfg.d_model, cfg.num_heads, cfg.head_dim
        self.cfg = cfg
        # q, k, v stored as one kernel (one parameter to shard and checkpoint).
        self.qkv = _param(rngs, (d, 3, n, k), d**-0.5, ("embed", None, "heads", "kv"), cfg.param_dtype)
        out_std = (n * k) ** -0.5 / math.sqrt(2 * cfg.num_layers)
        self.out = _param(rngs, (n, k, d), out_std, ("heads", "kv", "embed"), cfg.param_dtype)

    def _implementation(self) -> str:
        if self.cfg.attention == "splash":
            return "splash" if _splash_platform() is not None else _fall_back_to_xla()
        if self.cfg.attention != "auto":
            return self.cfg.attention
        on_gpu = jax.default_backend() == "gpu"
        return "cudnn" if on_gpu and self.cfg.dtype in ("bfloat16", "float16") else "xla"

    def _project(self, x_BxLxD, positions_BxL, fused: bool):
        w_Dx3xNxK = self.qkv[...].astype(self.cfg.dtype)
        if fused:  # one matmul for decode steps: 1,800 vs 1,100 events/s (small, batch 1) when split
            b, l, d = x_BxLxD.shape
            qkv_RxF = _rows_matmul(x_BxLxD.reshape(b * l, d), w_Dx3xNxK.reshape(d, -1))
            qkv_BxLx3xNxK = qkv_RxF.reshape(b, l, *w_Dx3xNxK.shape[1:])
            q, k, v = (qkv_BxLx3xNxK[:, :, i] for i in range(3))
        else:
            # Training: three matmuls against slices of the kernel. Slicing a fused output
            # instead makes its backward pad each gradient back to BxLx3xNxK, which on CPU
            # cost more than the larger matmul saved.
            q, k, v = (jnp.einsum("bld,dnk->blnk", x_BxLxD, w_Dx3xNxK[:, i]) for i in range(3))
        return _rope(q, positions_BxL, self.cfg.rope_base), _rope(k, positions_BxL, self.cfg.rope_base), v

    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL=None, dropout_key=None):
        q, k, v = self._project(x_BxLxD, positions_BxL, fused=False)
        if self._implementation() == "splash" and dropout_key is None:  # dropout: the written-out path below
            o_BxLxNxK = _splash_attention(q, k, v, segment_ids_BxL, interpret=_splash_platform() == "interpret")
            return jnp.einsum("blnk,nkd->bld", o_BxLxNxK, self.out[...].astype(self.cfg.dtype))
        same_Bx1xLxL = None
        if segment_ids_BxL is not None:  # packed pieces: a query sees only keys of its own piece
            same_Bx1xLxL = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
        if dropout_key is None:
            o_BxLxNxK = jax.nn.dot_product_attention(
                q, k, v, mask=same_Bx1xLxL, is_causal=True, implementation=self._implementation()
            )
        else:  # dot_product_attention has no dropout on its probabilities: written out for training
            o_BxLxNxK = _attention_with_dropout(q, k, v, same_Bx1xLxL, self.cfg.dropout, dropout_key)
        return jnp.einsum("blnk,nkd->bld", o_BxLxNxK, self.out[...].astype(self.cfg.dtype))

    def decode(self, x_BxTxD, positions_BxT, cache: dict[str, jax.Array]):
        """Writes this chunk's keys/values at slots `positions`, then attends to slots <= position."""
        q_BxTxNxK, k_BxTxNxK, v_BxTxNxK = self._project(x_BxTxD, positions_BxT, fused=True)
        rows_Bx1 = jnp.arange(x_BxTxD.shape[0])[:, None]

        def write(cache_BxNxSxK, new_BxTxNxK):
            # Index (row, slot) with heads as a slice: one (N, K) window per token, in place.
            new_BxTxNxK = new_BxTxNxK.astype(cache_BxNxSxK.dtype)
            return cache_BxNxSxK.at[rows_Bx1, :, positions_BxT].set(new_BxTxNxK, mode="drop")

        cache = {"k": write(cache["k"], k_BxTxNxK), "v": write(cache["v"], v_BxTxNxK)}
        q_BxNxTxK = q_BxTxNxK.transpose(0, 2, 1, 3) * jnp.asarray(self.cfg.head_dim**-0.5, q_BxTxNxK.dtype)
        k_BxNxSxK, v_BxNxSxK = cache["k"].astype(q_BxTxNxK.dtype), cache["v"].astype(q_BxTxNxK.dtype)
        # Written out rather than via dot_product_attention: its BxSxNxK layout would make
        # XLA transpose the whole cache at every decode step, which dominates on CPU.
        # (Reading only the filled blocks of the cache was tried; on CPU the block copies
        # cost more than they save once a window is about half full.)
        scores_BxNxTxS = jnp.einsum("bntk,bnsk->bnts", q_BxNxTxK, k_BxNxSxK, preferred_element_type=jnp.float32)
        slots_S = jnp.arange(k_BxNxSxK.shape[2])
        # Slots after a row's position hold stale or padding entries; causality hides them.
        visible_Bx1xTxS = (slots_S[None, None, :] <= positions_BxT[:, :, None])[:, None]
        scores_BxNxTxS = jnp.where(visible_Bx1xTxS, scores_BxNxTxS, -jnp.inf)
        probs_BxNxTxS = jax.nn.softmax(scores_BxNxTxS, axis=-1).astype(v_BxNxSxK.dtype)
        o_BxNxTxK = jnp.einsum("bnts,bnsk->bntk", probs_BxNxTxS, v_BxNxSxK)
        b, n, t, k = o_BxNxTxK.shape
        o_RxF = o_BxNxTxK.transpose(0, 2, 1, 3).reshape(b * t, n * k)
        w_FxD = self.out[...].astype(self.cfg.dtype).reshape(n * k, -1)
        return _rows_matmul(o_RxF, w_FxD).reshape(b, t, -1), cache

    def decode_rolling(self, x_BxD, positions_B, slots_B, slot_positions_BxS, sink: int, cache):
        """One token per row at absolute `positions_B`, written at `slots_B` of a rolling cache
        (see `GPT.decode_rolling`); slot_positions_BxS already holds this token's position."""
        q_Bx1xNxK, k_Bx1xNxK, v_Bx1xNxK = self._project(x_BxD[:, None], positions_B[:, None], fused=True)
        rows_B = jnp.arange(x_BxD.shape[0])

        def write(cache_BxNxSxK, new_BxNxK):
            return cache_BxNxSxK.at[rows_B, :, slots_B].set(new_BxNxK.astype(cache_BxNxSxK.dtype))

        cache = {"k": write(cache["k"], k_Bx1xNxK[:, 0]), "v": write(cache["v"], v_Bx1xNxK[:, 0])}
        scale = jnp.asarray(self.cfg.head_dim**-0.5, q_Bx1xNxK.dtype)
        k_BxNxSxK, v_BxNxSxK = cache["k"].astype(q_Bx1xNxK.dtype), cache["v"].astype(q_Bx1xNxK.dtype)
        q_BxNxK = q_Bx1xNxK[:, 0] * scale
        scores_BxNxS = jnp.einsum("bnk,bnsk->bns", q_BxNxK, k_BxNxSxK, preferred_element_type=jnp.float32)
        if sink:
            # Keys are stored rotated at their own positions. The sink must look as it did in
            # training, at most W - 1 before the query: rotating the query back to
            # min(p, W - 1) for the S sink scores does that (R(a)q . R(b)k depends on b - a only).
            window = k_BxNxSxK.shape[2]
            back_B = jnp.minimum(positions_B, window - 1) - positions_B
            q_sink_BxNxK = _rope(q_Bx1xNxK, back_B[:, None], self.cfg.rope_base)[:, 0] * scale
            sink_BxNxS = jnp.einsum("bnk,bnsk->bns", q_sink_BxNxK, k_BxNxSxK[:, :, :sink],
                                    preferred_element_type=jnp.float32)
            scores_BxNxS = jnp.concatenate([sink_BxNxS, scores_BxNxS[:, :, sink:]], axis=-1)
        # Slots not yet written for this piece (position -1) hold stale or padding entries.
        visible_Bx1xS = (slot_positions_BxS >= 0)[:, None]
        scores_BxNxS = jnp.where(visible_Bx1xS, scores_BxNxS, -jnp.inf)
        probs_BxNxS = jax.nn.softmax(scores_BxNxS, axis=-1).astype(v_BxNxSxK.dtype)
        o_BxNxK = jnp.einsum("bns,bnsk->bnk", probs_BxNxS, v_BxNxSxK)
        return jnp.einsum("bnk,nkd->bd", o_BxNxK, self.out[...].astype(self.cfg.dtype)), cache


# --------------------------------------------------------------------------- splash attention (TPU)

_SPLASH_INTERPRET = False  # tests: run the kernel through Pallas' interpreter on the CPU
# The platform the forward is compiled for, set by GPT.__call__ from its mesh: mgpt.aot compiles
# for TPU devices while the process's backend is the CPU.
_target_platform: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_platform", default=None)
_said_fallback = False


def _splash_platform() -> str | None:
    """'tpu' where the splash kernel compiles: the program targets TPUs (a TPU backend, or a
    mesh of TPU devices set by GPT.__call__, as mgpt.aot's deviceless compile has); 'interpret'
    in tests; None elsewhere."""
    if _SPLASH_INTERPRET:
        return "interpret"
    return "tpu" if (_target_platform.get() or jax.default_backend()) == "tpu" else None


def _fall_back_to_xla() -> str:
    global _said_fallback
    if not _said_fallback:
        _said_fallback = True
        print(f"model.attention='splash' needs a TPU (the program is compiled for {jax.default_backend()}); "
              "using XLA attention", flush=True)
    return "xla"


def _splash_block(length: int) -> int:
    """The kernel's tile: 512 events where the length allows, else 256 or 128 (the kernel's
    minimum: a TPU vector register's 128 lanes)."""
    for b in (512, 256, 128):
        if length % b == 0:
            return b
    raise ValueError(f"model.attention='splash': the sequence length {length} must be a multiple of 128")


def _splash_attention(q_BxLxNxK, k_BxLxNxK, v_BxLxNxK, segment_ids_BxL, interpret: bool):
    """Causal attention within segments by the splash kernel, over the mesh's batch and head
    shards (a Pallas kernel is not partitioned by XLA: shard_map hands each chip its rows)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    from jax.sharding import PartitionSpec as P

    b, length, n, head_dim = q_BxLxNxK.shape
    if segment_ids_BxL is None:
        segment_ids_BxL = jnp.ones((b, length), jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(mesh.axis_names)
    batch_axes = tuple(a for a in ("data", "fsdp") if a in axes) or None
    head_axis = "tensor" if "tensor" in axes else None
    heads_here = n // (mesh.shape[head_axis] if head_axis else 1)
    block = _splash_block(length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(heads_here)])
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)

    def per_shard(q, k, v, seg):  # q, k, v: BxNxLxK of this shard; the kernel takes one row
        ids = jax.vmap(lambda s: splash.SegmentIds(q=s, kv=s))(seg)
        return jax.vmap(kernel)(q, k, v, segment_ids=ids)

    # jax.nn.dot_product_attention's scale, applied to q as the kernel does not scale.
    q = (q_BxLxNxK * jnp.asarray(head_dim**-0.5, q_BxLxNxK.dtype)).transpose(0, 2, 1, 3)
    k, v = k_BxLxNxK.transpose(0, 2, 1, 3), v_BxLxNxK.transpose(0, 2, 1, 3)
    seg = segment_ids_BxL.astype(jnp.int32)
    if batch_axes is None and head_axis is None:
        o = per_shard(q, k, v, seg)
    else:
        qkv_spec = P(batch_axes, head_axis, None, None)
        o = jax.shard_map(per_shard, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch_axes, None)),
                          out_specs=qkv_spec, check_vma=False)(q, k, v, seg)
    return o.transpose(0, 2, 1, 3).astype(q_BxLxNxK.dtype)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_dim
        self.cfg = cfg
        # gate and up projections fused: [:, 0] is the gate, [:, 1] the value.
        self.wi = _param(rngs, (d, 2, f), d**-0.5, ("embed", None, "mlp"), cfg.param_dtype)
        self.wo = _param(rngs, (f, d), f**-0.5 / math.sqrt(2 * cfg.num_layers), ("mlp", "embed"), cfg.param_dtype)

    def __call__(self, x_BxLxD):
        h_BxLx2xF = jnp.einsum("bld,dcf->blcf", x_BxLxD, self.wi[...].astype(self.cfg.dtype))
        return jnp.einsum("blf,fd->bld", self._gated(h_BxLx2xF), self.wo[...].astype(self.cfg.dtype))

    def _gated(self, h_Nx2xF):
        """The activation of the gate times the value: [..., 2, F] -> [..., F]."""
        return _MLP_ACTIVATIONS[self.cfg.mlp_activation](h_Nx2xF[..., 0, :]) * h_Nx2xF[..., 1, :]

    def decode(self, x_BxTxD):
        """The same as calling it, for the few rows of a decode step (see ROWS_ONE_BY_ONE)."""
        b, t, d = x_BxTxD.shape
        wi_Dx2xF = self.wi[...].astype(self.cfg.dtype)
        h_Rx2xF = _rows_matmul(x_BxTxD.reshape(b * t, d), wi_Dx2xF.reshape(d, -1)).reshape(b * t, 2, -1)
        return _rows_matmul(self._gated(h_Rx2xF), self.wo[...].astype(self.cfg.dtype)).reshape(b, t, d)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL=None, dropout_key=None):
        if dropout_key is None:
            x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL)
            return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
        rate = self.attn.cfg.dropout
        probs_key, attn_key, mlp_key = jax.random.split(dropout_key, 3)
        a_BxLxD = self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL, probs_key)
        x_BxLxD = x_BxLxD + apply_dropout(a_BxLxD, rate, attn_key)
        return x_BxLxD + apply_dropout(self.mlp(self.mlp_norm(x_BxLxD)), rate, mlp_key)

    def decode(self, x_BxTxD, positions_BxT, cache):
        a_BxTxD, cache = self.attn.decode(self.attn_norm(x_BxTxD), positions_BxT, cache)
        x_BxTxD = x_BxTxD + a_BxTxD
        return x_BxTxD + self.mlp.decode(self.mlp_norm(x_BxTxD)), cache

    def decode_rolling(self, x_BxD, positions_B, slots_B, slot_positions_BxS, sink, cache):
        a_BxD, cache = self.attn.decode_rolling(self.attn_norm(x_BxD), positions_B, slots_B, slot_positions_BxS,
                                                sink, cache)
        x_BxD = x_BxD + a_BxD
        return x_BxD + self.mlp.decode(self.mlp_norm(x_BxD[:, None]))[:, 0], cache


def _block_call(block: Block, x_BxLxD, positions_BxL, segment_ids_BxL, dropout_key=None):
    return block(x_BxLxD, positions_BxL, segment_ids_BxL, dropout_key)


@flax.struct.dataclass
class RollingCache:
    """A KV cache of W slots per row that holds a piece of any length (module docstring).

    kv: per layer {'k', 'v'}: BxNxWxK. positions_BxW: the absolute position held by each slot,
    -1 for none (not yet written, or left by an earlier piece in this row: `forget` a row when
    a new piece starts in it). sink: S, the slots kept for positions 0..S-1.
    """

    kv: list
    positions_BxW: jax.Array
    sink: int = flax.struct.field(pytree_node=False, default=1)

    def slots(self, positions_B):
        """The slot of absolute position p: p in the sink, else S + (p - S) mod (W - S)."""
        window, sink = self.positions_BxW.shape[1], self.sink
        return jnp.where(positions_B < sink, positions_B, sink + (positions_B - sink) % (window - sink))

    def forget(self, rows_B):
        """Empties the rows where rows_B is True: their next piece starts at position 0."""
        return self.replace(positions_BxW=jnp.where(rows_B[:, None], -1, self.positions_BxW))


LAYERS_AXIS = "layers"  # logical name of the stacked blocks' leading axis; no rule shards it


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """num_layers Blocks as one Block whose parameters have a leading 'layers' axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    def make(rngs):
        return Block(cfg, rngs)

    return make(rngs)


def heard_counts(tokens_BxL, pitches: int, before_BxP=None, segment_ids_BxL=None):
    """Notes sounding after each token, per pitch: int32 BxLxP, counted from the row's start (or
    from `before_BxP`, the counts before its first token), restarting at each new segment.

    NOTE_ON of pitch p (id 2 + p) adds one, NOTE_OFF (id 2 + P + p) takes one away; every other id
    changes nothing. A window starting mid-piece restates its sounding notes as NOTE_ONs
    (`mgpt.train.data.piece_segments`), so counting from its start finds them. `before_BxP` and
    `segment_ids_BxL` do not go together (a packed row starts from nothing)."""
    if before_BxP is not None and segment_ids_BxL is not None:
        raise ValueError("heard_counts: counts before the row and packed segments do not go together")
    on_BxL = (tokens_BxL >= 2) & (tokens_BxL < 2 + pitches)
    off_BxL = (tokens_BxL >= 2 + pitches) & (tokens_BxL < 2 + 2 * pitches)
    delta_BxLxP = (jax.nn.one_hot(jnp.where(on_BxL, tokens_BxL - 2, -1), pitches, dtype=jnp.int32)
                   - jax.nn.one_hot(jnp.where(off_BxL, tokens_BxL - 2 - pitches, -1), pitches, dtype=jnp.int32))
    count_BxLxP = jnp.cumsum(delta_BxLxP, axis=1)
    if before_BxP is not None:
        count_BxLxP = count_BxLxP + before_BxP[:, None, :]
    if segment_ids_BxL is not None:  # packed rows: each segment counts from its own first token
        first_BxL = jnp.concatenate([jnp.ones_like(segment_ids_BxL[:, :1], bool),
                                     segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
        start_BxL = jax.lax.cummax(jnp.where(first_BxL, jnp.arange(tokens_BxL.shape[1]), 0), axis=1)
        count_BxLxP = count_BxLxP - jnp.take_along_axis(count_BxLxP - delta_BxLxP, start_BxL[..., None], axis=1)
    return count_BxLxP


class GPT(nnx.Module):
    """`GPT(cfg, rngs=nnx.Rngs(seed))`; `model(tokens_BxL[, positions_BxL, segment_ids_BxL]) -> logits_BxLxV`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # Unit-variance embeddings match the scale of the normalised residual stream.
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), 1.0, ("vocab", "embed"), cfg.param_dtype)
        if cfg.scan_layers:
            self.blocks = _stacked_blocks(cfg, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg)
        if not cfg.tied_embeddings:
            # std d^-1/2 / 2: logits start with std 1/2 against the unit-RMS normalised stream,
            # so the step-0 loss is ln V + 1/8 (a uniform guess, near enough), not ln V + 1/2.
            # On configs/small.py, validation at step 100: this 1.7123, d^-1/2 1.7114; a 1/d
            # readout starts slower (training loss 2.14 at step 100 against 1.74 and 1.71).
            self.unembed = _param(
                rngs, (cfg.d_model, cfg.vocab_size), 0.5 * cfg.d_model**-0.5, ("embed", "vocab"), cfg.param_dtype
            )
        if cfg.sounding_pitches:  # drawn last: every other weight is the same model's without it
            self.sounding = _param(rngs, (cfg.sounding_pitches, cfg.d_model), 0.02, (None, "embed"), cfg.param_dtype)

    def _embed(self, tokens_BxL):
        return jnp.take(self.embed[...], tokens_BxL, axis=0).astype(self.cfg.dtype)

    def _logits(self, x_BxLxD, decode: bool = False):
        h_BxLxD = self.final_norm(x_BxLxD)
        if self.cfg.tied_embeddings:
            # d^-1/2 keeps initial logits at unit scale with unit-variance embeddings.
            w_DxV = self.embed[...].T * self.cfg.d_model**-0.5
        else:
            w_DxV = self.unembed[...]
        if decode:
            b, l, d = h_BxLxD.shape
            logits_RxV = _rows_matmul(h_BxLxD.reshape(b * l, d), w_DxV.astype(self.cfg.dtype), jnp.float32)
            return logits_RxV.reshape(b, l, -1)
        return jnp.einsum(
            "bld,dv->blv", h_BxLxD, w_DxV.astype(self.cfg.dtype), preferred_element_type=jnp.float32
        )

    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, *, activation_sharding=None,
                 dropout_key=None):
        """Full causal forward; float32 logits_BxLxV.

        positions default to 0..L-1; with `segment_ids_BxL` (packed rows) a token attends
        only to earlier tokens of the same segment, and positions should restart at 0 in
        each segment (as grain's packer gives them). `activation_sharding` (a Sharding of
        the BxLxD residual stream, from the trainer) pins it at every block boundary.
        `dropout_key` (training only) turns on `cfg.dropout`; without it the forward is
        deterministic, as evaluation and sampling need.
        """
        b, length = tokens_BxL.shape
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        block_fn = _block_call
        if self.cfg.remat != "none":
            policy = None if self.cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            block_fn = nnx.remat(_block_call, policy=policy)
        if activation_sharding is not None:
            # Inside a scan XLA's sharding propagation cannot see the batch layout of the
            # inputs, and on an fsdp mesh it shards the residual stream like the weights
            # (over D) instead: large on v5e-256 then needed 397 GiB of temporaries per chip.
            unconstrained_fn = block_fn

            def block_fn(block, x_BxLxD, positions_BxL, segment_ids_BxL, dropout_key=None):
                x_BxLxD = jax.lax.with_sharding_constraint(x_BxLxD, activation_sharding)
                out_BxLxD = unconstrained_fn(block, x_BxLxD, positions_BxL, segment_ids_BxL, dropout_key)
                return jax.lax.with_sharding_constraint(out_BxLxD, activation_sharding)

        if self.cfg.attention == "splash" and activation_sharding is not None:
            # The splash kernel runs per shard (shard_map): it reads the mesh from here.
            mesh = activation_sharding.mesh
            token = _target_platform.set(mesh.devices.flat[0].platform)
            try:
                with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                    return self._forward(tokens_BxL, positions_BxL, segment_ids_BxL, block_fn, dropout_key)
            finally:
                _target_platform.reset(token)
        return self._forward(tokens_BxL, positions_BxL, segment_ids_BxL, block_fn, dropout_key)

    def _heard_input(self, count_BxLxP):
        """The learned vectors of the pitches sounding (count > 0), summed: BxLxD."""
        sounding_BxLxP = (count_BxLxP > 0).astype(self.cfg.dtype)
        return jnp.einsum("blp,pd->bld", sounding_BxLxP, self.sounding[...].astype(self.cfg.dtype))

    def _forward(self, tokens_BxL, positions_BxL, segment_ids_BxL, block_fn, dropout_key=None):
        x_BxLxD = self._embed(tokens_BxL)
        if self.cfg.sounding_pitches:
            x_BxLxD = x_BxLxD + self._heard_input(heard_counts(tokens_BxL, self.cfg.sounding_pitches,
                                                                segment_ids_BxL=segment_ids_BxL))
        if dropout_key is not None and self.cfg.dropout == 0:
            dropout_key = None  # off: exactly the deterministic forward
        layer_keys = None
        if dropout_key is not None:
            embed_key, dropout_key = jax.random.split(dropout_key)
            x_BxLxD = apply_dropout(x_BxLxD, self.cfg.dropout, embed_key)
            layer_keys = jax.random.split(dropout_key, self.cfg.num_layers)
        if self.cfg.scan_layers:
            if layer_keys is None:

                @nnx.scan(in_axes=(nnx.Carry, 0, None, None), out_axes=nnx.Carry,
                          transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
                def run_blocks(x_BxLxD, block, positions_BxL, segment_ids_BxL):
                    return block_fn(block, x_BxLxD, positions_BxL, segment_ids_BxL)

                x_BxLxD = run_blocks(x_BxLxD, self.blocks, positions_BxL, segment_ids_BxL)
            else:

                @nnx.scan(in_axes=(nnx.Carry, 0, None, None, 0), out_axes=nnx.Carry,
                          transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
                def run_blocks_dropout(x_BxLxD, block, positions_BxL, segment_ids_BxL, key):
                    return block_fn(block, x_BxLxD, positions_BxL, segment_ids_BxL, key)

                x_BxLxD = run_blocks_dropout(x_BxLxD, self.blocks, positions_BxL, segment_ids_BxL, layer_keys)
        else:
            for i, block in enumerate(self.blocks):
                key = None if layer_keys is None else layer_keys[i]
                x_BxLxD = block_fn(block, x_BxLxD, positions_BxL, segment_ids_BxL, key)
        return self._logits(x_BxLxD)

    def layers(self) -> list[Block]:
        """The blocks in order. Stacked ones come as static slices: decoding runs them one by
        one, so each layer's KV cache stays its own array, updated in place (a scan would
        slice the stacked cache out and write it back at every layer of every step)."""
        if not self.cfg.scan_layers:
            return list(self.blocks)
        graphdef, state = nnx.split(self.blocks)
        return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) for i in range(self.cfg.num_layers)]

    def init_cache(self, batch: int, size: int | None = None, dtype=None) -> Cache:
        """A zeroed KV cache of `size` slots (default max_len), one dict per layer."""
        size = self.cfg.max_len if size is None else size
        shape = (batch, self.cfg.num_heads, size, self.cfg.head_dim)
        dtype = self.cfg.dtype if dtype is None else dtype
        return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(self.cfg.num_layers)]

    def init_rolling_cache(self, batch: int, sink: int = 1, dtype=None) -> RollingCache:
        """An empty `RollingCache` of max_len slots per row, the first `sink` kept for positions 0..sink-1."""
        if not 0 <= sink < self.cfg.max_len - 1:
            raise ValueError(f"sink={sink} must leave at least 2 of the model's {self.cfg.max_len} slots to the ring")
        return RollingCache(kv=self.init_cache(batch, self.cfg.max_len, dtype),
                            positions_BxW=jnp.full((batch, self.cfg.max_len), -1, jnp.int32), sink=sink)

    def move_cache(self, cache: Cache, src, dst, count, into: Cache | None = None) -> Cache:
        """`into` (default `cache`) with slots dst..dst+count-1 holding what `cache` holds at
        src..src+count-1, as if those tokens had been written `src - dst` positions earlier: values
        move as they are, keys are turned back by that many positions (rotary attention depends only
        on distances, so the moved keys keep theirs to each other and to the queries that come after
        them). A window that slides keeps its events' keys and values this way instead of computing
        them again (`mgpt.live.stream`). src, dst, count: int32 scalars, may be traced."""
        into = cache if into is None else into
        slots_W = jnp.arange(cache[0]["k"].shape[2])
        from_W = jnp.clip(slots_W + (src - dst), 0, slots_W.shape[0] - 1)
        inside_W = (slots_W >= dst) & (slots_W < dst + count)
        back_BxW = jnp.full((cache[0]["k"].shape[0], slots_W.shape[0]), dst - src, jnp.int32)
        out = []
        for layer, target in zip(cache, into):
            k_BxWxNxK = jnp.take(layer["k"], from_W, axis=2).transpose(0, 2, 1, 3)
            k_BxNxWxK = _rope(k_BxWxNxK, back_BxW, self.cfg.rope_base).transpose(0, 2, 1, 3)
            v_BxNxWxK = jnp.take(layer["v"], from_W, axis=2)
            keep = inside_W[None, None, :, None]
            out.append({"k": jnp.where(keep, k_BxNxWxK, target["k"]), "v": jnp.where(keep, v_BxNxWxK, target["v"])})
        return out

    def decode_rolling(self, tokens_B, positions_B, cache: RollingCache, heard_BxP=None):
        """One token per row at absolute `positions_B` (int32, any size) through a rolling cache.

        The token attends to the sink (positions < S, seen from at most W - 1 later) and to
        the last W - S positions of its row, itself included; a row whose piece restarts
        must be `cache.forget`-ed first. A model with `sounding_pitches` counts the notes sounding
        from `heard_BxP`, the counts before these tokens (`heard_counts`). Returns (logits_BxV
        float32, new cache).
        """
        slots_B = cache.slots(positions_B)
        rows_B = jnp.arange(tokens_B.shape[0])
        slot_positions_BxW = cache.positions_BxW.at[rows_B, slots_B].set(positions_B)
        x_BxD = self._embed(tokens_B)
        if self.cfg.sounding_pitches:
            if heard_BxP is None:  # one token at a time: the notes heard before it cannot be counted here
                raise ValueError("decode_rolling: a model with sounding_pitches needs heard_BxP")
            x_BxD = x_BxD + self._heard_input(heard_counts(tokens_B[:, None], self.cfg.sounding_pitches,
                                                           heard_BxP))[:, 0]
        new_kv = []
        for block, layer_cache in zip(self.layers(), cache.kv):
            x_BxD, layer_cache = block.decode_rolling(x_BxD, positions_B, slots_B, slot_positions_BxW, cache.sink,
                                                      layer_cache)
            new_kv.append(layer_cache)
        logits_BxV = self._logits(x_BxD[:, None], decode=True)[:, 0]
        return logits_BxV, cache.replace(kv=new_kv, positions_BxW=slot_positions_BxW)

    def decode(self, tokens_BxT, positions_BxT, cache: Cache, heard_BxP=None):
        """Cached forward of T new tokens per row at absolute `positions_BxT` (int32).

        Writes their keys/values into cache slot = position and attends to every
        slot <= the query's position, so a prompt prefill (T = prompt length,
        rows right-padded) and a decode step (T = 1) are the same call. Rows may
        sit at different positions. Positions >= cache size are dropped. A model with
        `sounding_pitches` counts the notes sounding from `heard_BxP`, the counts before these
        tokens (`heard_counts`; None = none, a window's start). Returns (logits_BxTxV float32,
        new cache).
        """
        x_BxTxD = self._embed(tokens_BxT)
        if self.cfg.sounding_pitches:
            x_BxTxD = x_BxTxD + self._heard_input(heard_counts(tokens_BxT, self.cfg.sounding_pitches, heard_BxP))
        new_cache = []
        for block, layer_cache in zip(self.layers(), cache):
            x_BxTxD, layer_cache = block.decode(x_BxTxD, positions_BxT, layer_cache)
            new_cache.append(layer_cache)
        return self._logits(x_BxTxD, decode=True), new_cache
