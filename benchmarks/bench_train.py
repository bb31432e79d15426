"""Training throughput: mgpt (JAX) vs Hugging Face GPT-2 (PyTorch) at the same shapes.

    python benchmarks/bench_train.py                       # small and base, CPU-sized batches
    python benchmarks/bench_train.py --shapes=base --seq_len=2048 --batch=8 --no_torch   # on a GPU

For each shape (width, depth, heads and MLP size from configs/<shape>.py) both
frameworks run the same sequence length, batch, fp32 AdamW with weight decay and
gradient clipping; GPT-2's non-gated MLP gets 1.5x our gated MLP width so the two
models do the same matmul FLOPs per token. Each reports tokens/s and MFU: model
FLOPs/s divided by the machine's matmul rate, measured here with the same dtype
(on CPU) or the datasheet peak (GPU/TPU). The JAX side is the trainer's own step
(`mgpt.train.setup` + `compile_train_step`), not a copy.

A third contender, "matmuls only", runs just the model's matmuls at the same shapes
(forward and backward, nothing else): its MFU is the ceiling this compiler reaches on
these shapes, which tells how much of the gap to the matmul rate is the step's other
work and how much is the matmuls themselves.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mgpt.train import config as config_lib  # noqa: E402
from mgpt.train import mesh as mesh_lib  # noqa: E402
from mgpt.model import kinds as models  # noqa: E402
from mgpt.train import monitor  # noqa: E402
from mgpt.train import loop as train  # noqa: E402

# Batches small enough that the default run takes a few minutes on a 2-core CPU.
CPU_DEFAULTS = {"small": (256, 16), "base": (256, 2)}


def jax_stepper(config, vocab_size: int):
    """A function running mgpt's train step once (blocking), on this machine's devices."""
    mesh, table = config_lib.validate_devices(config, jax.device_count(), 1)
    s = train.setup(config, vocab_size, mesh, table)
    state = jax.jit(s.init_fn, static_argnums=0, out_shardings=s.state_shardings)(0)
    step_fn = train.compile_train_step(s, config)
    rng = np.random.default_rng(0)
    b, length = config.train.batch_size, config.data.seq_len
    tokens = rng.integers(2, vocab_size, (b, length + 1)).astype(np.int32)
    # One piece per row, but with positions and segment ids as packed training rows carry
    # them: the step measured is the one training runs, segment mask included.
    batch = train.global_batch(
        {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((b, length), np.float32),
         "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy(),
         "segment_ids": np.ones((b, length), np.int32)},
        s.batch_sharding,
    )
    holder = {"state": state}

    def run(n: int) -> None:
        state = holder["state"]
        for _ in range(n):
            state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
        holder["state"] = state

    return run


def matmul_floor_stepper(config, vocab_size: int):
    """Forward + backward of the model's matmuls alone, at the same shapes, with nothing else.

    No norms, rotary embeddings, softmax, masking, loss or optimizer: only the projections,
    the attention score and value matmuls, the gated MLP's matmuls and the output layer,
    as plain 2-D (and head-batched) products under the trainer's CPU compiler options.
    Its MFU is the most this compiler gets out of these shapes: a ceiling for the real step.
    """
    import jax.numpy as jnp

    m = config.model
    b, length = config.train.batch_size, config.data.seq_len
    d, f, n = m.d_model, m.mlp_dim, m.num_heads
    t = b * length
    rng = np.random.default_rng(0)

    def weight(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32) * shape[0] ** -0.5, m.dtype)

    params = {
        "blocks": [{"qkv": weight(d, 3 * d), "out": weight(d, d), "wi": weight(d, 2 * f), "wo": weight(f, d)}
                   for _ in range(m.num_layers)],
        "unembed": weight(d, vocab_size),
    }
    x_TxD = weight(t, d)

    def matmuls_only(params, x_TxD):
        for w in params["blocks"]:
            qkv_Tx3D = x_TxD @ w["qkv"]
            q, k, v = (qkv_Tx3D[:, i * d : (i + 1) * d].reshape(b, length, n, d // n) for i in range(3))
            scores_BxNxLxL = jnp.einsum("blnk,bmnk->bnlm", q, k)
            o_TxD = jnp.einsum("bnlm,bmnk->blnk", scores_BxNxLxL, v).reshape(t, d)
            x_TxD = x_TxD + o_TxD @ w["out"]
            h_Tx2F = x_TxD @ w["wi"]
            x_TxD = x_TxD + (h_Tx2F[:, :f] * h_Tx2F[:, f:]) @ w["wo"]
        return jnp.mean((x_TxD @ params["unembed"]) ** 2)

    step = jax.jit(jax.grad(matmuls_only), compiler_options=mesh_lib.compiler_options())

    def run(steps: int) -> None:
        for _ in range(steps):
            grads = step(params, x_TxD)
        jax.block_until_ready(grads)

    return run


def torch_stepper(config, vocab_size: int, threads: int):
    """A function running a Hugging Face GPT-2 AdamW step once, same shapes."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m, t = config.model, config.train
    gpt2 = GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.data.seq_len,
        n_embd=m.d_model,
        n_layer=m.num_layers,
        n_head=m.num_heads,
        n_inner=int(1.5 * m.mlp_dim),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=m.tied_embeddings,
        bos_token_id=1,
        eos_token_id=1,
    )
    model = GPT2LMHeadModel(gpt2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=(t.b1, t.b2), eps=t.eps,
                            weight_decay=t.weight_decay)
    b, length = t.batch_size, config.data.seq_len
    tokens = torch.randint(2, vocab_size, (b, length))

    def run(n: int) -> None:
        for _ in range(n):
            out = model(input_ids=tokens, labels=tokens)  # HF shifts labels internally
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


def best_seconds_per_step(runners: dict, steps: int, warmup: int, rounds: int) -> dict:
    """Alternate the contenders round by round and keep each one's best round: on a shared
    machine, load from other processes then hits both alike."""
    for run in runners.values():
        run(warmup)
    best = {name: float("inf") for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run(steps)
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return best


def torch_matmul_flops(threads: int, n: int = 1024, seconds: float = 1.0) -> float:
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(n, n)
    a @ a
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        reps += 1
    return 2.0 * n**3 * reps / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="small,base", help="comma-separated configs/<name>.py")
    p.add_argument("--seq_len", type=int, default=0, help="override (default: CPU-sized per shape)")
    p.add_argument("--batch", type=int, default=0, help="override (default: CPU-sized per shape)")
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per contender (the best one counts)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--vocab_size", type=int, default=313)
    p.add_argument("--dtype", default="", help="compute dtype override (default float32 on CPU, config's elsewhere)")
    p.add_argument("--no_torch", action="store_true")
    p.add_argument("--scan_ab", action="store_true",
                   help="also time the step with model.scan_layers flipped (scanned for small, unrolled for base "
                        "and large), interleaved with the config's own layout: where does unrolling win?")
    p.add_argument("--no_floor", action="store_true", help="skip the matmuls-only ceiling (see matmul_floor_stepper)")
    args = p.parse_args()

    on_cpu = jax.default_backend() == "cpu"
    threads = os.cpu_count() or 1
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; {threads} CPU threads")

    def measure_peak():
        """The best fp32 matmul rate either library reaches now (CPU), or the datasheet peak."""
        if not on_cpu:
            return monitor.known_peak_flops(jax.devices()[0]) * jax.device_count(), {}
        rates = {"JAX": monitor.measure_matmul_flops("float32", n=1024, seconds=1.0)}
        if not args.no_torch:
            rates["PyTorch"] = torch_matmul_flops(threads)
        return max(rates.values()), rates

    peaks = [measure_peak()]
    rows = []
    for shape in args.shapes.split(","):
        config = importlib.import_module(f"configs.{shape}").get_config()
        seq_len, batch = CPU_DEFAULTS.get(shape, (config.data.seq_len, config.train.batch_size)) if on_cpu else (
            config.data.seq_len, config.train.batch_size)
        config.data.seq_len = args.seq_len or seq_len
        config.model.max_len = max(config.model.max_len, config.data.seq_len)
        config.train.batch_size = args.batch or batch
        config.train.grad_accum = 1
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
        if args.dtype or on_cpu:
            config.model.dtype = args.dtype or "float32"
        m = config.model
        # Both contenders are charged mgpt's count: GPT-2's MLP is sized to do the same matmuls.
        fpt = models.model_config(m, args.vocab_size).flops_per_token(config.data.seq_len)
        tokens = config.train.batch_size * config.data.seq_len
        print(f"\n{shape}: d={m.d_model} layers={m.num_layers} heads={m.num_heads} mlp={m.mlp_dim} "
              f"seq={config.data.seq_len} batch={config.train.batch_size} {m.dtype} ({fpt / 1e6:.1f} MFLOPs/token)",
              flush=True)
        runners = {"mgpt (JAX)": jax_stepper(config, args.vocab_size)}
        if args.scan_ab:
            flipped = config.copy_and_resolve_references()
            flipped.model.scan_layers = not config.model.scan_layers
            runners[f"mgpt {'scanned' if flipped.model.scan_layers else 'unrolled'} (JAX)"] = jax_stepper(
                flipped, args.vocab_size)
        if not args.no_torch:
            runners["HF GPT-2 (PyTorch)"] = torch_stepper(config, args.vocab_size, threads)
        if not args.no_floor:
            runners["matmuls only (JAX)"] = matmul_floor_stepper(config, args.vocab_size)
        best = best_seconds_per_step(runners, args.steps, args.warmup, args.rounds)
        row = {"shape": shape, "fpt": fpt}
        for name, seconds in best.items():
            row[name] = tokens / seconds
            print(f"  {name:<20} {seconds * 1e3:9.1f} ms/step {tokens / seconds:10,.0f} tokens/s", flush=True)
        if "HF GPT-2 (PyTorch)" in row:
            print(f"  ratio mgpt / PyTorch: {row['mgpt (JAX)'] / row['HF GPT-2 (PyTorch)']:.2f}x")
        rows.append(row)
    peaks.append(measure_peak())

    # The higher of the two measurements (start, end): a busy moment must not inflate MFU.
    peak, rates = max(peaks, key=lambda p: p[0])
    source = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items()) or "datasheet"
    print(f"\nMFU = model FLOPs/s / {peak / 1e12:.3f} TFLOP/s ({'best fp32 1024^3 matmul: ' if rates else ''}{source})")
    print("\n| shape | mgpt tokens/s | mgpt MFU | PyTorch tokens/s | PyTorch MFU | ratio | matmuls-only MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        jax_tps, torch_tps, floor_tps = r["mgpt (JAX)"], r.get("HF GPT-2 (PyTorch)"), r.get("matmuls only (JAX)")
        torch_part = (f"{torch_tps:,.0f} | {100 * torch_tps * r['fpt'] / peak:.1f}% | {jax_tps / torch_tps:.2f}x"
                      if torch_tps else "- | - | -")
        floor_part = f"{100 * floor_tps * r['fpt'] / peak:.1f}%" if floor_tps else "-"
        print(f"| {r['shape']} | {jax_tps:,.0f} | {100 * jax_tps * r['fpt'] / peak:.1f}% | {torch_part} | {floor_part} |")


if __name__ == "__main__":
    main()
