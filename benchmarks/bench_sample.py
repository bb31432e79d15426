"""Generated events per second: our cached sampler vs no cache vs Hugging Face GPT-2 `generate`.

    python benchmarks/bench_sample.py                 # small and base shapes, batch 1 and 16, 1024 events
    python benchmarks/bench_sample.py --quick         # small shape only, 256 events: about a minute
    python benchmarks/bench_sample.py --shapes=small --batches=1 --events=512

Each row of every system starts from a one-token prompt and generates exactly
--events new events (EOS is masked for us and disabled for HF) with top-k
sampling. The model context is --events + 16 for every system, so no sliding
window is involved and GPT-2's position table is large enough.

Peers, all on the same host:
- ours: `mgpt.sample.sample_window` (one jitted prefill + while_loop decode, KV cache,
  with the per-row sounding-note rules and the NOTE_OFF release of every real call);
- no cache: the same model and filter in a jitted while_loop that recomputes the
  full forward over the (fixed-size) context buffer for every event; its cost
  per event is constant, so it is timed over --nocache_events events, and only
  at the batch sizes in --nocache_batches (it needs O(context) work per event);
- HF: transformers' GPT-2, PyTorch CPU, `generate(use_cache=True, do_sample=True,
  top_k)`, same vocabulary, depth, width, heads, context; its plain MLP gets
  n_inner = 1.5 * mlp_dim so its MLP has as many weights as our gated one.
Random weights: speed does not depend on what the model learned.

Measured (2-core shared CPU host, load 2-5 from other jobs, jax 0.10.2, torch 2.13.0,
`python benchmarks/bench_sample.py --threads=1 --repeats=1`; events/s, higher is better):

    shape  batch  ours  no-cache   HF   vs no-cache  vs HF
    small      1  1406     11.9   339      118x      4.2x
    small     16  2889        -   986        -       2.9x
    base       1    18      0.5    26       36x      0.7x
    base      16    77        -    30        -       2.5x

Small models win on per-token Python overhead that `generate` pays and the
while_loop does not; at batch 1 on `base` both are bound by streaming the
weights from memory, where XLA:CPU's matrix-vector product is slower than
PyTorch's. With 2 threads on a busy host both sides fluctuate by 3-10x.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from data_prep.vocab import Vocabulary  # noqa: E402
from mgpt.model.gpt import GPT, ModelConfig  # noqa: E402
from mgpt.sample.sampler import (  # noqa: E402
    SILENT, RowLimits, RowState, _choose, sample_window, sampling_settings, token_tables,
)

# Fallbacks if configs/<name>.py is missing: (num_layers, num_heads, d_model, mlp_dim).
_SHAPES = {"small": (4, 4, 192, 512), "base": (12, 12, 768, 2560)}


def model_config(shape: str, vocab_size: int, context: int, dtype: str) -> ModelConfig:
    try:
        import importlib

        fields = importlib.import_module(f"configs.{shape}").get_config().model.to_dict()
    except ModuleNotFoundError:
        layers, heads, d, f = _SHAPES[shape]
        fields = dict(num_layers=layers, num_heads=heads, d_model=d, mlp_dim=f)
    fields.update(max_len=context, dtype=dtype, remat="none")
    return ModelConfig.from_config(fields, vocab_size)


def _bench_vocab(vocab: Vocabulary):
    tables = token_tables(vocab)
    # Random weights emit EOS now and then; every row must run the full budget.
    tables["banned_V"] = tables["banned_V"].at[vocab.eos_id].set(True)
    return tables


def time_ours(model, vocab, batch, events, top_k, repeats):
    graphdef, params = nnx.split(model)
    style = vocab.style_id("unknown")
    rows = max(batch, 2)  # as generate_tokens does: one row is padded to two, the spare one done
    num_pitches = vocab.max_pitch - vocab.min_pitch + 1
    state = RowState(  # nothing sounds; the spare row is done
        events_B=jnp.zeros(rows, jnp.int32), steps_B=jnp.zeros(rows, jnp.int32), done_B=jnp.arange(rows) >= batch,
        open_BxP=jnp.zeros((rows, num_pitches), jnp.int32), onset_BxP=jnp.full((rows, num_pitches), SILENT, jnp.int32))
    limits = RowLimits(  # max_note_steps_B 0: the guard costs the same whatever its limit
        max_events_B=jnp.full(rows, events, jnp.int32), max_steps_B=jnp.full(rows, np.iinfo(np.int32).max, jnp.int32),
        max_note_steps_B=jnp.zeros(rows, jnp.int32))
    args = (
        jnp.full((rows, 1), style, jnp.int32),  # prompt_BxP
        jnp.ones(rows, jnp.int32),  # lengths_B
        jnp.arange(rows, dtype=jnp.uint32),  # seeds_B
        state,
        limits,
        sampling_settings(top_k=top_k),
        _bench_vocab(vocab),
    )
    _, end_B, _ = jax.block_until_ready(sample_window(graphdef, params, *args))  # compile
    assert int(end_B[:batch].min()) == 1 + events, end_B
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(sample_window(graphdef, params, *args))
        best = min(best, time.perf_counter() - t)
    return batch * events / best


def time_nocache(model, vocab, batch, events, top_k):
    graphdef, params = nnx.split(model)
    window = model.cfg.max_len
    settings, tables = sampling_settings(top_k=top_k), _bench_vocab(vocab)

    @jax.jit
    def run(params, tokens_BxW, seeds_B):
        m = nnx.merge(graphdef, params)
        keys_B = jax.vmap(jax.random.key)(seeds_B)
        rows_B = jnp.arange(batch)

        def body(carry):
            tokens_BxW, n = carry
            logits_BxWxV = m(tokens_BxW)  # the whole context, every event
            logits_BxV = logits_BxWxV[:, n]
            keys = jax.vmap(jax.random.fold_in, (0, None))(keys_B, n)
            token_B = _choose(logits_BxV, keys, settings, tables["banned_V"])
            return tokens_BxW.at[rows_B, n + 1].set(token_B), n + 1

        return jax.lax.while_loop(lambda c: c[1] < events, body, (tokens_BxW, jnp.int32(0)))[0]

    tokens_BxW = jnp.full((batch, window), vocab.style_id("unknown"), jnp.int32)
    seeds_B = jnp.arange(batch, dtype=jnp.uint32)
    jax.block_until_ready(run(params, tokens_BxW, seeds_B))
    t = time.perf_counter()
    jax.block_until_ready(run(params, tokens_BxW, seeds_B))
    return batch * events / (time.perf_counter() - t)


def time_hf(cfg: ModelConfig, batch, events, top_k, threads):
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_len,
        n_embd=cfg.d_model,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=3 * cfg.mlp_dim // 2,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = torch.full((batch, 1), 3, dtype=torch.long)
    kwargs = dict(
        attention_mask=torch.ones_like(ids), do_sample=True, top_k=top_k, use_cache=True, max_new_tokens=events
    )
    with torch.inference_mode():
        hf.generate(ids, **{**kwargs, "max_new_tokens": 8})  # warm up
        t = time.perf_counter()
        out = hf.generate(ids, **kwargs)
        elapsed = time.perf_counter() - t
    assert out.shape == (batch, 1 + events), out.shape
    n_params = sum(p.numel() for p in hf.parameters())
    return batch * events / elapsed, n_params


# ----------------------------------------------------------------------------- --corpus


def corpus_plan(vocab: Vocabulary, pieces: int, seed: int = 0):
    """A corpus like a real one: piece i in style i % styles (every style but 'unknown'), seed i, and a
    budget drawn uniformly from 10-90 s of music (events capped at max(1024, 100 s), as
    `generate_tokens` caps them). Returns prompts, seeds, max_events, max_steps."""
    from mgpt.sample.sampler import budgets

    styles = [s for s in vocab.styles if vocab.style_id(s) != vocab.unknown_style_id] or ["unknown"]
    seconds = np.random.default_rng(seed).uniform(10.0, 90.0, pieces)
    prompts = [np.array([vocab.style_id(styles[i % len(styles)])], np.int32) for i in range(pieces)]
    limits = [budgets(vocab, 0, None, float(s)) for s in seconds]
    return prompts, list(range(pieces)), [e for e, _ in limits], [t for _, t in limits]


def run_previous(model, vocab, plan, batch, settings, tables, note_steps, stats: dict):
    """The re-prefill sampler (`_generate_batch`), `batch` pieces at a time in plan order; yields
    after each batch. stats gets rows, events, slot-steps and seconds. Slot-steps: the decode
    loop's iterations times its rows, counted from each window's ends (an iteration per event of
    the longest row, plus the one that stops it); the re-prefills are not counted."""
    import mgpt.sample.sampler as sampler_lib

    graphdef, params = nnx.split(model)
    prompts, seeds, max_events, max_steps = plan
    stats.update(rows=[], events=0, slot_steps=0, seconds=0.0, done=0)
    real_window = sampler_lib.sample_window

    def counted(*args, **kwargs):
        tokens_BxW, end_B, rows = real_window(*args, **kwargs)
        lengths_B, live_B = np.asarray(args[3]), ~np.asarray(args[5].done_B)
        if live_B.any():
            stats["slot_steps"] += len(lengths_B) * (int(np.max((np.asarray(end_B) - lengths_B)[live_B])) + 1)
        return tokens_BxW, end_B, rows

    for i in range(0, len(prompts), batch):
        g = slice(i, i + batch)
        sampler_lib.sample_window = counted
        try:
            t = time.perf_counter()
            rows = sampler_lib._generate_batch(graphdef, params, model.cfg.max_len, vocab, prompts[g], seeds[g],
                                               np.asarray(max_events[g]), np.asarray(max_steps[g]),
                                               np.full(len(prompts[g]), note_steps), settings, tables, None)
            stats["seconds"] += time.perf_counter() - t
        finally:
            sampler_lib.sample_window = real_window
        stats["rows"] += rows
        stats["events"] += sum(len(r) - len(p) for r, p in zip(rows, prompts[g]))
        stats["done"] = len(stats["rows"])
        yield


def run_continuous(model, vocab, plan, batch, settings, tables, note_steps, stats: dict, context: str = "rolling"):
    """The continuous sampler (over the rolling cache, or with re-prefilled windows); yields after each
    chunk. stats as `run_previous`'s, plus the steady-state figures (`ContinuousSampler.steady_events`)."""
    from mgpt.sample.continuous import ContinuousSampler

    prompts, seeds, max_events, max_steps = plan
    sampler = ContinuousSampler(model, vocab, batch_size=batch, settings=settings, tables=tables, context=context)
    for i, (p, s, e, m) in enumerate(zip(prompts, seeds, max_events, max_steps)):
        sampler.add(i, p, s, max_events=e, max_steps=m, max_note_steps=note_steps)
    rows, seconds = {}, 0.0
    stats.update(done=0)
    while sampler.busy:
        t = time.perf_counter()
        rows.update(sampler.step())
        seconds += time.perf_counter() - t
        stats.update(rows=[rows[i] for i in sorted(rows)], events=sampler.events, slot_steps=sampler.slot_steps,
                     steady_events=sampler.steady_events, steady_slot_steps=sampler.steady_slot_steps,
                     seconds=seconds, done=len(rows))
        yield
    stats["rows"] = [rows[i] for i in range(len(prompts))]


def run_continuous_reprefill(model, vocab, plan, batch, settings, tables, note_steps, stats: dict):
    """The continuous sampler with the previous sampler's re-prefilled windows (the same pieces)."""
    return run_continuous(model, vocab, plan, batch, settings, tables, note_steps, stats, context="reprefill")


SAMPLERS = {"previous": run_previous, "continuous": run_continuous, "continuous_reprefill": run_continuous_reprefill}


def interleaved(runs: dict, pieces: int) -> None:
    """Advances whichever of `runs` (name -> (generator, stats)) is furthest behind in the plan, one
    unit (a batch, a chunk) at a time, so all run under the same load from start to end."""
    live = dict(runs)
    while live:
        name = min(live, key=lambda n: live[n][1].get("done", 0) / pieces)
        try:
            next(live[name][0])
        except StopIteration:
            del live[name]


def time_hf_corpus(cfg: ModelConfig, lengths: list[int], batch: int, top_k: int, threads: int, device: str = "cpu"):
    """HF `generate` over the same pieces, `batch` at a time in plan order: each batch runs until
    its longest piece is done (it has no way to refill a row). Useful events / seconds. On a GPU
    (device 'cuda') in bfloat16."""
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=max(lengths) + 2, n_embd=cfg.d_model,
                                     n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=3 * cfg.mlp_dim // 2,
                                     bos_token_id=0, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    if device != "cpu":
        hf = hf.to(device=device, dtype=torch.bfloat16)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    elapsed = 0.0
    with torch.inference_mode():
        ids = torch.full((batch, 1), 3, dtype=torch.long, device=device)
        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=top_k, max_new_tokens=8)
        for i in range(0, len(lengths), batch):
            part = lengths[i : i + batch]
            ids = torch.full((len(part), 1), 3, dtype=torch.long, device=device)
            sync()
            t = time.perf_counter()
            hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=top_k, use_cache=True,
                        max_new_tokens=max(1, max(part)))
            sync()
            elapsed += time.perf_counter() - t
    return sum(lengths) / elapsed


def corpus_figure(model, vocab: Vocabulary, pieces: int, batch: int, hf_pieces: int = 0, threads: int = 1,
                  top_k: int = 0, log=print, hf_device: str = "cpu", with_reprefill: bool = False) -> dict:
    """Events/s and occupancy (events / slot-steps) of the previous sampler and the continuous one on
    one plan (`corpus_plan`), interleaved (`interleaved`: a batch of one, a chunk of the other, so a
    change in the host's load hits both). Both are compiled first. Then HF `generate` over the
    first `hf_pieces` pieces (0 = none) at the lengths the continuous sampler gave them."""
    from mgpt.sample.sampler import note_steps, sampling_settings, token_tables

    settings, tables = sampling_settings(temperature=0.9, top_p=0.95, top_k=top_k), token_tables(vocab)
    guard = int(note_steps(vocab, 8.0))
    warm = corpus_plan(vocab, 2 * batch, seed=1)
    warm = (warm[0], warm[1], [model.cfg.max_len + 8] * len(warm[0]), warm[3])  # past one window: compiles all
    names = ("previous", "continuous", "continuous_reprefill") if with_reprefill else ("previous", "continuous")
    for name in names:
        for _ in SAMPLERS[name](model, vocab, warm, batch, settings, tables, guard, {}):
            pass
    plan = corpus_plan(vocab, pieces)
    stats = {name: {} for name in names}
    interleaved({name: (SAMPLERS[name](model, vocab, plan, batch, settings, tables, guard, stats[name]), stats[name])
                 for name in names}, pieces)
    out = {}
    for name, st in stats.items():
        out[name] = {"events": st["events"], "slot_steps": st["slot_steps"], "seconds": st["seconds"],
                     "events_per_s": st["events"] / st["seconds"], "occupancy": st["events"] / max(st["slot_steps"], 1)}
        log(f"  {name:20s}: {st['events']} events in {st['seconds']:.1f} s, occupancy "
            f"{100 * out[name]['occupancy']:.1f} %")
    c = stats["continuous"]
    out["continuous"]["steady_occupancy"] = c["steady_events"] / max(c["steady_slot_steps"], 1)
    lengths = [len(row) - len(p) for row, p in zip(c["rows"], plan[0])]
    out["pieces"], out["batch"], out["mean_events"] = pieces, batch, float(np.mean(lengths))
    out["hf_events_per_s"] = float("nan")
    if hf_pieces:
        out["hf_events_per_s"] = time_hf_corpus(model.cfg, lengths[:hf_pieces], batch, top_k or 50, threads,
                                                hf_device)
    return out


def corpus_main(a, threads: int) -> None:
    if a.workdir:
        from mgpt.sample.run import load_run

        run = load_run(a.workdir)
        model, vocab, what = run.model, run.vocab, f"the trained model in {a.workdir}"
    else:
        vocab = Vocabulary([f"style{i}" for i in range(12)])
        model = GPT(model_config(a.shapes.split(",")[0], vocab.size, 256, a.dtype), rngs=nnx.Rngs(0))
        what = f"random weights, {a.shapes.split(',')[0]} shape"
    cfg = model.cfg
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus), {threads} threads; "
          f"{what}: {cfg.num_params():,} params, context {cfg.max_len}; {a.pieces} pieces of 10-90 s, batch {a.batch}",
          flush=True)
    hf_pieces = 0 if a.no_hf else (a.hf_pieces or a.pieces)
    r = corpus_figure(model, vocab, a.pieces, a.batch, hf_pieces, a.hf_threads or threads,
                      log=lambda s: print(s, flush=True), with_reprefill=a.with_reprefill)
    prev, new = r["previous"], r["continuous"]
    print(f"previous  : {prev['events_per_s']:.0f} events/s, occupancy {100 * prev['occupancy']:.1f} %", flush=True)
    print(f"continuous: {new['events_per_s']:.0f} events/s, occupancy {100 * new['occupancy']:.1f} % "
          f"({100 * new['steady_occupancy']:.1f} % while pieces were queued; mean piece {r['mean_events']:.0f} "
          "events)", flush=True)
    if "continuous_reprefill" in r:
        c = r["continuous_reprefill"]
        print(f"continuous, re-prefilled windows: {c['events_per_s']:.0f} events/s, occupancy "
              f"{100 * c['occupancy']:.1f} %, {c['events_per_s'] / prev['events_per_s']:.2f} x the previous sampler "
              "(the same pieces)", flush=True)
    print(f"HF generate: {r['hf_events_per_s']:.0f} useful events/s over the first {hf_pieces} pieces", flush=True)
    print(f"corpus: {new['events_per_s']:.0f} events/s, occupancy {100 * new['occupancy']:.1f} %, "
          f"{new['events_per_s'] / prev['events_per_s']:.2f} x the previous sampler, "
          f"{new['events_per_s'] / r['hf_events_per_s']:.2f} x HF generate", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shape only, 256 events")
    p.add_argument("--shapes", default="small,base")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--events", type=int, default=1024, help="new events per row")
    p.add_argument("--nocache_events", type=int, default=4, help="events timed for the no-cache peer")
    p.add_argument(
        "--nocache_batches", default="1", help="batches at which to time the no-cache peer (it is slow: O(context) per event)"
    )
    p.add_argument("--top_k", type=int, default=40)
    p.add_argument("--dtype", default="float32", help="our compute dtype")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no_hf", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both XLA and PyTorch (0 = all)")
    p.add_argument("--corpus", action="store_true", help="the corpus figure (continuous vs previous sampler, HF)")
    p.add_argument("--pieces", type=int, default=256, help="--corpus: pieces in the plan")
    p.add_argument("--batch", type=int, default=16, help="--corpus: batch (slots)")
    p.add_argument("--with_reprefill", action="store_true",
                   help="--corpus: also the continuous sampler with the previous sampler's re-prefilled windows")
    p.add_argument("--hf_threads", type=int, default=0, help="--corpus: PyTorch threads (0 = --threads)")
    p.add_argument("--hf_pieces", type=int, default=0, help="--corpus: pieces HF generates (0 = all)")
    p.add_argument("--workdir", default=None, help="--corpus: a trained run (default: random weights, --shapes' first)")
    a = p.parse_args()
    threads = a.threads or os.cpu_count() or 1
    if a.threads:
        # Read when the CPU backend starts, which is below; one thread is steadier on a busy host.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={str(threads > 1).lower()}"
            f" intra_op_parallelism_threads={threads}"
        )
    if a.corpus:
        return corpus_main(a, threads)
    if a.quick:
        a.shapes, a.events = "small", 256

    vocab = Vocabulary([f"style{i}" for i in range(12)])
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus); vocab {vocab.size}; "
          f"{a.events} new events per row, top_k={a.top_k}, context {a.events + 16}, {threads} threads", flush=True)
    header = f"{'shape':6} {'batch':>5} {'params':>11} {'ours ev/s':>10} {'no-cache':>9} {'HF ev/s':>9} {'vs nocache':>10} {'vs HF':>7}"
    print(header, flush=True)
    for shape in a.shapes.split(","):
        cfg = model_config(shape, vocab.size, a.events + 16, a.dtype)
        model = GPT(cfg, rngs=nnx.Rngs(0))
        for batch in (int(b) for b in a.batches.split(",")):
            ours = time_ours(model, vocab, batch, a.events, a.top_k, a.repeats)
            nocache = float("nan")
            if str(batch) in a.nocache_batches.split(","):
                nocache = time_nocache(model, vocab, batch, min(a.nocache_events, a.events), a.top_k)
            hf, hf_params = (float("nan"), 0) if a.no_hf else time_hf(cfg, batch, a.events, a.top_k, threads)
            print(
                f"{shape:6} {batch:5d} {cfg.num_params():11,d} {ours:10.0f} {nocache:9.1f} {hf:9.0f}"
                f" {ours / nocache:9.1f}x {ours / hf:6.1f}x   (HF params {hf_params:,})",
                flush=True,
            )


if __name__ == "__main__":
    main()
