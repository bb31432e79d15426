"""One GPU, under 8 minutes: train MFU of `base`, and sampling against Hugging Face GPT-2.

    python benchmarks/gpu_check.py --out=gpu_check.json     # on one H100 / H200
    python benchmarks/gpu_check.py --dry-run                 # CPU, tiny shapes, the same code path

0. Packed pieces: a piece packed behind another scores as if alone with this backend's
   attention (cuDNN's, given the segment mask as a bias), in bf16; and one attention layer
   with implementation='cudnn' gives XLA's outputs and gradients on the same packed batch.
1. Training: configs/base.py in bf16 with cuDNN attention and no remat, one microbatch per
   step, at the largest batch (rows of 2048 events) whose compiled step fits the GPU's
   memory (XLA's own memory analysis against the allocator's limit; batches double from
   8). MFU = model FLOPs/s (ModelConfig.flops_per_token) / the GPU's datasheet bf16 peak.
2. Sampling: new events/s of mgpt.sample.generate_tokens (one jitted prefill +
   while_loop decode, KV cache; the rows an untrained model ends early count what they
   made) for base's dimensions in bf16 at batch 1, 16 and 64, against
   `transformers.GPT2LMHeadModel.generate` (bf16, KV cache, top-k sampling) at the same
   widths and depth on the same GPU. GPT-2's MLP is not gated: it gets 1.5x the width, so
   both do the same matmul FLOPs per event.
3. Corpus: `benchmarks/bench_sample.py --corpus` at base's dimensions in bf16: 64 pieces with
   10-90 s budgets at batch 16, the continuous sampler (rolling cache) against the previous
   re-prefill sampler, interleaved batch by chunk, the occupancy of both (events / slot-steps), and
   HF `generate` over the first 32 pieces' lengths.

The rows are synthetic random events, so TFDS, grain and music21 are not needed: the
model and the trainer's own step (mgpt.train) import without them. Besides jax, flax,
optax, orbax, torch and transformers it needs ml_collections (pure Python: if the image
lacks it, `pip install --no-deps ml_collections`). Writes one JSON file, prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flax import nnx  # noqa: E402

from data_prep.vocab import Vocabulary  # noqa: E402
from mgpt.train import config as config_lib  # noqa: E402
from mgpt.model import kinds as models  # noqa: E402
from mgpt.train import monitor  # noqa: E402
from mgpt.train import loop as train  # noqa: E402
from mgpt.model.gpt import GPT  # noqa: E402

# (config, context, train batches to try, sampling batches, events sampled per row)
FULL = dict(config="base", seq_len=2048, train_batches=(8, 16, 32, 64, 128, 256), sample_batches=(1, 16, 64),
            events=512, train_steps=10, packed=(768, 1280), corpus=dict(pieces=64, batch=16, hf_pieces=32))
DRY = dict(config="tiny", seq_len=64, train_batches=(2, 4), sample_batches=(1, 2), events=16, train_steps=2,
           packed=(16, 48), corpus=dict(pieces=6, batch=2, hf_pieces=2))


def _config(name: str, seq_len: int, batch: int, on_gpu: bool):
    import importlib

    c = importlib.import_module(f"configs.{name}").get_config()
    c.data.seq_len = seq_len
    # The fastest fitting setting, not the config's memory-saving defaults: cuDNN's flash
    # attention holds no LxL scores, and at the largest batch that fits remat only costs.
    c.model.update(dtype="bfloat16", remat="none", attention="cudnn" if on_gpu else "xla", max_len=seq_len)
    c.train.update(batch_size=batch, grad_accum=1)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c


def _synthetic_batch(rng, batch: int, seq_len: int, vocab_size: int, sharding) -> dict:
    """Random event rows, one piece per row, laid out as mgpt.train.data's batches."""
    tokens = rng.integers(2, vocab_size, (batch, seq_len + 1)).astype(np.int32)
    rows = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "mask": np.ones((batch, seq_len), np.float32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
        "segment_ids": np.ones((batch, seq_len), np.int32),
    }
    return train.global_batch(rows, sharding)


def _memory_limit() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def train_mfu(plan: dict, vocab_size: int, on_gpu: bool, search_until: float = float("inf")) -> dict:
    """Largest fitting batch, then tokens/s and MFU of the trainer's own step.

    The batch search stops at the first batch that does not fit, or once time.perf_counter()
    passes `search_until` (each try compiles the step), keeping the largest that fitted."""
    from mgpt.train import checkpoint as ckpt_lib

    limit = _memory_limit()
    chosen, tried = None, []
    for batch in plan["train_batches"]:
        if chosen is not None and time.perf_counter() > search_until:
            tried.append({"batch": batch, "fits": None, "why": "not tried: the check's time budget"})
            break
        c = _config(plan["config"], plan["seq_len"], batch, on_gpu)
        mesh, table = config_lib.validate_devices(c, jax.device_count(), 1)
        s = train.setup(c, vocab_size, mesh, table)
        abstract = ckpt_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
        rows = {k: jax.ShapeDtypeStruct((batch, plan["seq_len"]), np.float32 if k == "mask" else np.int32,
                                        sharding=s.batch_sharding)
                for k in ("inputs", "targets", "mask", "positions", "segment_ids")}
        start = time.perf_counter()
        try:
            compiled = train.compile_train_step(s, c).lower(abstract, rows).compile()
        except Exception as e:  # XLA's out-of-memory error type differs by backend
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            tried.append({"batch": batch, "fits": False, "why": str(e).splitlines()[0][:200]})
            break
        m = compiled.memory_analysis()
        need = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        # 10 % headroom: the allocator fragments, and cuDNN takes workspace at run time.
        fits = limit is None or need <= 0.9 * limit
        tried.append({"batch": batch, "fits": fits, "bytes": int(need), "compile_s": time.perf_counter() - start})
        if not fits:
            break
        chosen = (batch, c, s, compiled)
    if chosen is None:
        return {"tried": tried, "error": "not even the smallest batch fits"}
    batch, c, s, step = chosen
    state = jax.jit(s.init_fn, static_argnums=0, out_shardings=s.state_shardings)(0)
    data = _synthetic_batch(np.random.default_rng(0), batch, plan["seq_len"], vocab_size, s.batch_sharding)
    state, metrics = step(state, data)  # warm up (first run allocates)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(plan["train_steps"]):
        state, metrics = step(state, data)
    loss = float(jax.device_get(metrics["loss"]))
    seconds = (time.perf_counter() - start) / plan["train_steps"]
    tokens_per_s = batch * plan["seq_len"] / seconds
    flops_per_token = s.model_config.flops_per_token(plan["seq_len"])
    peak, peak_source = monitor.peak_flops("bfloat16")
    return {
        "config": plan["config"], "params": s.num_params, "seq_len": plan["seq_len"], "batch": batch,
        "attention": c.model.attention, "remat": c.model.remat, "step_s": seconds, "tokens_per_s": tokens_per_s,
        "mfu": flops_per_token * tokens_per_s / peak, "peak_flops": peak, "peak_source": peak_source,
        "loss": loss, "memory_limit_bytes": limit, "tried": tried,
    }


def packed_alone(plan: dict, vocab_size: int, on_gpu: bool) -> dict:
    """Does a packed piece score as if alone on this backend's attention (cuDNN on a GPU)?

    One row holds two random pieces back to back, with segment ids and positions as
    mgpt.train.data packs them; the second piece's logits are compared with the same piece run
    alone, and with the row run without segment ids (the second piece then reads the
    first). In bf16 the packed-vs-alone gap should be rounding, far below the unmasked one.
    """
    c = _config(plan["config"], plan["seq_len"], 1, on_gpu)
    model = GPT(models.model_config(c.model, vocab_size), rngs=nnx.Rngs(0))
    first, second = (np.random.default_rng(i).integers(2, vocab_size, n) for i, n in enumerate(plan["packed"]))
    tokens_1xL = jnp.asarray(np.concatenate([first, second])[None], jnp.int32)
    positions_1xL = jnp.asarray(np.concatenate([np.arange(len(first)), np.arange(len(second))])[None], jnp.int32)
    segment_ids_1xL = jnp.asarray(np.repeat([1, 2], [len(first), len(second)])[None], jnp.int32)
    forward = nnx.jit(lambda m, *a: m(*a).astype(jnp.float32))
    packed_LxV = forward(model, tokens_1xL, positions_1xL, segment_ids_1xL)[0, len(first):]
    alone_LxV = forward(model, jnp.asarray(second[None], jnp.int32))[0]
    unmasked_LxV = forward(model, tokens_1xL)[0, len(first):]
    gap, leak = float(jnp.abs(packed_LxV - alone_LxV).max()), float(jnp.abs(unmasked_LxV - alone_LxV).max())
    return {"attention": c.model.attention, "dtype": c.model.dtype, "pieces": list(plan["packed"]),
            "max_logit_gap_packed_vs_alone": gap, "max_logit_gap_without_segment_ids": leak,
            "scores_as_if_alone": bool(gap < 0.1 * leak)}


def attention_matches_xla(plan: dict, on_gpu: bool) -> dict:
    """cuDNN's fused attention (on a GPU) against XLA's on one packed batch, outputs and gradients.

    Two rows of packed pieces (the second ends in padding, segment id 0) go through one
    attention layer of the config's width in bf16, once with implementation='cudnn' (the
    segment mask as its bias) and once with 'xla', and both against a float32 reference
    written out here (scores, causal and segment masks, softmax). On a CPU (--dry-run) the
    first is XLA's too: the run checks the batch and the reference, not cuDNN."""
    from mgpt.model import gpt as model_lib

    c = _config(plan["config"], plan["seq_len"], 1, on_gpu)
    length, pieces = plan["seq_len"], plan["packed"]
    kw = {**{k: v for k, v in c.model.to_dict().items() if k in ("num_heads", "d_model", "mlp_dim", "max_len")},
          "vocab_size": 16, "num_layers": 1, "dtype": "bfloat16"}
    fused = model_lib.Attention(model_lib.ModelConfig(**kw, attention="cudnn" if on_gpu else "xla"), nnx.Rngs(0))
    xla = model_lib.Attention(model_lib.ModelConfig(**kw, attention="xla"), nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x_BxLxD = jnp.asarray(rng.normal(size=(2, length, kw["d_model"])), jnp.bfloat16)
    cut = [pieces[0], pieces[0] + pieces[1] // 2]  # row 0: three pieces; row 1: two, then padding
    seg0 = np.searchsorted(cut, np.arange(length), side="right") + 1
    seg1 = np.where(np.arange(length) < pieces[1], 1, np.where(np.arange(length) < pieces[1] + pieces[0] // 2, 2, 0))
    segments_BxL = jnp.asarray(np.stack([seg0, seg1]), jnp.int32)
    starts = [np.concatenate([[0], np.flatnonzero(np.diff(s)) + 1]) for s in (seg0, seg1)]
    positions_BxL = jnp.asarray(np.stack([np.arange(length) - st[np.searchsorted(st, np.arange(length), "right") - 1]
                                          for st in starts]), jnp.int32)

    def reference(layer, x):  # float32, written out
        q, k, v = (t.astype(jnp.float32) for t in layer._project(x.astype(jnp.float32), positions_BxL, False))
        s_BxNxLxL = jnp.einsum("blnk,bmnk->bnlm", q, k) * q.shape[-1] ** -0.5
        visible = (segments_BxL[:, :, None] == segments_BxL[:, None, :]) & jnp.tril(jnp.ones((length, length), bool))
        p = jax.nn.softmax(jnp.where(visible[:, None], s_BxNxLxL, -jnp.inf), axis=-1)
        o = jnp.einsum("bnlm,bmnk->blnk", p, v)
        return jnp.einsum("blnk,nkd->bld", o, layer.out[...].astype(jnp.float32))

    def out_and_grad(fn):
        loss = lambda x: jnp.sum(jnp.sin(fn(x).astype(jnp.float32)))
        return jax.jit(lambda x: (fn(x).astype(jnp.float32), jax.grad(loss)(x).astype(jnp.float32)))(x_BxLxD)

    o_f, g_f = out_and_grad(lambda x: fused(x, positions_BxL, segments_BxL))
    o_x, g_x = out_and_grad(lambda x: xla(x, positions_BxL, segments_BxL))
    o_r, g_r = out_and_grad(lambda x: reference(xla, x))
    gap = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())
    result = {"implementation": "cudnn" if on_gpu else "xla (dry run)", "rows": 2, "seq_len": length,
              "out_gap_vs_xla": gap(o_f, o_x), "grad_gap_vs_xla": gap(g_f, g_x),
              "out_gap_vs_f32": gap(o_f, o_r), "grad_gap_vs_f32": gap(g_f, g_r),
              "xla_out_gap_vs_f32": gap(o_x, o_r)}
    # bf16 keeps 8 bits: a few parts in a hundred of the largest value is rounding, not a wrong mask
    # (a piece reading its neighbour, or padding read, moves outputs by their own size).
    result["matches"] = bool(max(result["out_gap_vs_f32"], result["grad_gap_vs_f32"]) < 0.05
                             and max(result["out_gap_vs_xla"], result["grad_gap_vs_xla"]) < 0.05)
    return result


def _kept_going(check, *args) -> dict:
    """A check that fails records its error, so the measurements after it still run and the
    JSON is still written: on a lent GPU, every minute counts."""
    try:
        return check(*args)
    except Exception as e:  # noqa: BLE001 - whatever cuDNN or XLA raise, the run goes on
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def sample_rates(plan: dict, vocab: Vocabulary, on_gpu: bool, deadline: float = float("inf")) -> list[dict]:
    c = _config(plan["config"], plan["seq_len"], 1, on_gpu)
    c.model.attention = "xla"  # decoding writes its attention out (mgpt.model.Attention.decode)
    model = GPT(models.model_config(c.model, vocab.size), rngs=nnx.Rngs(0))
    rows = []
    for batch in plan["sample_batches"]:
        if rows and time.perf_counter() > deadline:
            rows.append({"batch": batch, "events": plan["events"], "ours_events_per_s": None,
                         "hf_events_per_s": None, "hf_params": "not measured: the check's time budget"})
            continue
        ours = _time_ours(model, vocab, batch, plan["events"])
        hf, hf_params = _time_hf(model.cfg, batch, plan["events"], on_gpu)
        rows.append({"batch": batch, "events": plan["events"], "ours_events_per_s": ours,
                     "hf_events_per_s": hf, "hf_params": hf_params})
    return rows


def corpus_rate(plan: dict, vocab: Vocabulary, on_gpu: bool, deadline: float = float("inf")) -> dict:
    """benchmarks/bench_sample.py --corpus at base's dimensions in bf16 (random weights, so pieces end
    at random EOSs or their 10-90 s budgets): the continuous sampler against the previous one,
    interleaved, their occupancy, and HF `generate` over the same pieces' lengths."""
    import bench_sample

    if time.perf_counter() > deadline:
        return {"error": "not measured: the check's time budget"}
    c = _config(plan["config"], plan["seq_len"], 1, on_gpu)
    c.model.attention = "xla"
    model = GPT(models.model_config(c.model, vocab.size), rngs=nnx.Rngs(0))
    p = plan["corpus"]
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        hf_pieces = p["hf_pieces"]
    except ImportError:
        hf_pieces = 0
    r = bench_sample.corpus_figure(model, vocab, p["pieces"], p["batch"], hf_pieces, threads=0,
                                   log=lambda line: None, hf_device="cuda" if on_gpu else "cpu")
    prev, new = r["previous"], r["continuous"]
    return {"pieces": p["pieces"], "batch": p["batch"], "mean_events": r["mean_events"],
            "events_per_s": new["events_per_s"], "occupancy": new["occupancy"],
            "steady_occupancy": new["steady_occupancy"],
            "previous_events_per_s": prev["events_per_s"], "previous_occupancy": prev["occupancy"],
            "vs_previous": new["events_per_s"] / prev["events_per_s"],
            "hf_events_per_s": r["hf_events_per_s"] if hf_pieces else None,
            "vs_hf": new["events_per_s"] / r["hf_events_per_s"] if hf_pieces else None}


def _time_ours(model, vocab: Vocabulary, batch: int, events: int) -> float:
    """New events/s of mgpt.sample.generate_tokens, the sampler mgpt.generate runs (top-k 32)."""
    from mgpt.sample.sampler import generate_tokens

    prompts = [np.asarray([vocab.unknown_style_id], np.int32)] * batch

    def run():
        return generate_tokens(model, vocab, prompts, seeds=list(range(batch)), max_events=events, top_k=32,
                               batch_size=batch)

    run()  # compiles
    start = time.perf_counter()
    out = run()
    elapsed = time.perf_counter() - start
    # Random weights may end a row early (EOS): count the events actually made.
    return sum(len(row) - 1 for row in out) / elapsed


def _time_hf(cfg, batch: int, events: int, on_gpu: bool):
    """GPT-2 `generate` at our dims: (events/s, parameters), or (None, why) without torch."""
    try:
        import torch
        import transformers
    except ImportError as e:
        return None, f"not measured: {e}"
    transformers.logging.set_verbosity_error()
    device = "cuda" if on_gpu else "cpu"
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model, n_layer=cfg.num_layers,
        n_head=cfg.num_heads, n_inner=3 * cfg.mlp_dim // 2, bos_token_id=0, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).to(device=device, dtype=torch.bfloat16).eval()
    hf.generation_config.eos_token_id = None
    ids = torch.full((batch, 1), 3, dtype=torch.long, device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=True, top_k=32, use_cache=True,
                  max_new_tokens=events, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(ids, **{**kwargs, "max_new_tokens": 8})  # warm up
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = hf.generate(ids, **kwargs)
        if on_gpu:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    assert out.shape == (batch, 1 + events), out.shape
    return batch * events / elapsed, sum(p.numel() for p in hf.parameters())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the code path, not the GPU")
    p.add_argument("--out", default="gpu_check.json", help="the JSON file written")
    p.add_argument("--budget_s", type=float, default=420.0,
                   help="seconds the check may take: the train batch search stops at 40 %% of it, and sampling "
                        "batches past it are skipped and marked so (default: 7 minutes, under a device loan's 8)")
    a = p.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not a.dry_run:
        raise SystemExit(f"gpu_check: no GPU here (jax backend {jax.default_backend()!r}); use --dry-run on a CPU")
    plan = DRY if a.dry_run else FULL
    vocab = Vocabulary()
    start = time.perf_counter()
    result = {
        "device": jax.devices()[0].device_kind, "dry_run": a.dry_run, "jax": jax.__version__,
        "python": platform.python_version(), "vocab_size": vocab.size,
        "packed": _kept_going(packed_alone, plan, vocab.size, on_gpu),
        "attention": _kept_going(attention_matches_xla, plan, on_gpu),
        "train": train_mfu(plan, vocab.size, on_gpu, search_until=start + 0.4 * a.budget_s),
        "sampling": sample_rates(plan, vocab, on_gpu, deadline=start + a.budget_s),
    }
    result["corpus"] = _kept_going(corpus_rate, plan, vocab, on_gpu, start + a.budget_s)
    result["seconds"] = time.perf_counter() - start
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)

    t, k = result["train"], result["packed"]
    print(f"{result['device']}, jax {result['jax']}{' (dry run: CPU, tiny shapes)' if a.dry_run else ''}")
    if "error" in k:
        print(f"packed pieces: the check failed ({k['error']})")
    else:
        print(f"packed pieces ({k['attention']} attention, {k['dtype']}, {k['pieces']} events): max logit gap "
              f"{k['max_logit_gap_packed_vs_alone']:.3g} against the piece alone, "
              f"{k['max_logit_gap_without_segment_ids']:.3g} without segment ids: "
              f"{'scores as if alone' if k['scores_as_if_alone'] else 'LEAKS ACROSS PIECES'}")
    a_ = result["attention"]
    if "error" in a_:
        print(f"attention against XLA: the check failed ({a_['error']})")
    else:
        print(f"attention {a_['implementation']} against XLA on a packed bf16 batch: output gap "
              f"{a_['out_gap_vs_xla']:.2g}, gradient gap {a_['grad_gap_vs_xla']:.2g} (of the largest value); against "
              f"float32: {a_['out_gap_vs_f32']:.2g}, {a_['grad_gap_vs_f32']:.2g}: "
              f"{'matches' if a_['matches'] else 'DIFFERS'}")
    if "error" in t:
        print(f"train: {t['error']} ({t['tried']})")
    else:
        print(f"train {t['config']} ({t['params'] / 1e6:.1f} M params), {t['batch']} x {t['seq_len']} events, "
              f"{t['attention']} attention, remat {t['remat']}: {t['step_s'] * 1e3:.1f} ms/step, "
              f"{t['tokens_per_s']:,.0f} tokens/s, MFU {100 * t['mfu']:.1f}% of {t['peak_flops'] / 1e12:.3g} "
              f"TFLOP/s ({t['peak_source']})")
    print(f"{'batch':>5} {'ours ev/s':>11} {'HF GPT-2 ev/s':>14} {'ours / HF':>10}")
    for r in result["sampling"]:
        ours, hf = r["ours_events_per_s"], r["hf_events_per_s"]
        if ours is None:
            print(f"{r['batch']:>5} {'-':>11} {'-':>14} {r['hf_params']}")
            continue
        versus = f"{ours / hf:.1f}x" if hf else r["hf_params"]  # without torch: why not measured
        print(f"{r['batch']:>5} {ours:>11,.0f} {f'{hf:,.0f}' if hf else '-':>14} {versus:>10}")
    c = result["corpus"]
    if "error" in c:
        print(f"corpus: {c['error']}")
    else:
        hf = f"{c['vs_hf']:.2f} x HF generate" if c["vs_hf"] else "HF generate not measured"
        print(f"corpus ({c['pieces']} pieces, batch {c['batch']}, previous sampler {c['previous_events_per_s']:.0f} "
              f"events/s at occupancy {100 * c['previous_occupancy']:.1f} %): {c['events_per_s']:.0f} events/s, "
              f"occupancy {100 * c['occupancy']:.1f} %, {c['vs_previous']:.2f} x the previous sampler, {hf}")
    print(f"wrote {a.out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
