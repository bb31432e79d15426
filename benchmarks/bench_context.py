"""What a piece should read past the model's window: re-prefilled windows or a rolling cache.

    python benchmarks/bench_context.py --workdir=runs/demo            # NLL and Bach density
    python benchmarks/bench_context.py --workdir=runs/demo --pieces=24 --no_nll

1. NLL (nats/event) of the real held-out pieces (validation and test splits) longer than two
   windows, on their events from the end of the first window up to --events, teacher-forced
   under each scheme:
   - reprefill: the sampler's windows (`sampler.window_prompt`: STYLE, the carried state, the
     most recent events, W/2 tokens, re-prefilled whenever the window fills);
   - rolling: the rolling cache with the STYLE token as its sink (`GPT.decode_rolling`), exactly
     as the continuous sampler reads;
   - sink, recomputed / sink + carried, recomputed: a fresh forward over STYLE (+ the carried
     state, `Vocabulary.carried_state`) + the most recent events, W tokens in all, every
     --stride events: what a rolling cache would read if it re-stated the sounding notes;
   - live stream, re-prefilled / kept: the events fed one by one through `mgpt.live`'s stream,
     its window slid by re-prefill or by keeping the kept events' keys and values (its default).
2. Bach notes per onset (`mgpt.music.features.onset_polyphony` over the onsets of each stretch) by
   stretch of 256 events and by third, for --pieces pieces of --events events sampled with the
   run's defaults under `--context=reprefill` and `--context=rolling`, beside the train split's
   Bach pieces (their whole length, and their last thirds).
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mgpt.music.features import onset_polyphony  # noqa: E402
from mgpt.model.gpt import heard_counts  # noqa: E402
from mgpt.sample.run import Sampling, load_run  # noqa: E402
from mgpt.sample.sampler import window_prompt  # noqa: E402


def held_out_pieces(run, min_events: int, max_events: int):
    """[(style, STYLE + events, piece id)] of the validation and test pieces with at least min_events
    events, cut at max_events."""
    from mgpt.train import data as data_lib

    out = []
    for split in ("validation", "test"):
        src = data_lib.open_source(run.dataset_dir, split)
        for i in range(len(src)):
            tokens = np.asarray(src[i]["tokens"], np.int32)
            if len(tokens) >= min_events:
                style = data_lib.record_text(src[i]["style"])
                out.append((style, np.concatenate([[run.vocab.style_id(style)], tokens[:max_events]]).astype(np.int32),
                            data_lib.record_text(src[i]["piece_id"])))
    return out


_FORWARDS: dict = {}


def _forward(model):
    """A cached batched full forward: rows of <= W ids -> their log-probs."""
    if id(model) in _FORWARDS:
        return _FORWARDS[id(model)]
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda p, t: jax.nn.log_softmax(nnx.merge(graphdef, p)(t), axis=-1))
    window = model.cfg.max_len

    def logp(rows):  # rows: list of 1-D id arrays of <= W tokens -> list of (len x V) log-probs
        out = []
        for i in range(0, len(rows), 16):
            part = rows[i : i + 16]
            batch = np.zeros((16, window), np.int32)
            for b, r in enumerate(part):
                batch[b, : len(r)] = r
            lp = np.asarray(fn(params, jnp.asarray(batch)))
            out += [lp[b, : len(r)] for b, r in enumerate(part)]
        return out

    _FORWARDS[id(model)] = logp
    return logp


def nll_reprefill(model, vocab, row, first: int) -> np.ndarray:
    """Per-event NLL of row[j] for j >= first, reading the re-prefill sampler's windows."""
    window, logp = model.cfg.max_len, _forward(model)
    nll = np.full(len(row), np.nan)
    (lp,) = logp([row[:window]])
    nll[1:window] = -lp[np.arange(window - 1), row[1:window]]
    end = window
    while end < len(row):
        prompt = window_prompt(list(row[:end]), window, vocab)
        cont = row[end : end + window - len(prompt)]
        (lp,) = logp([np.concatenate([prompt, cont])])
        at = len(prompt) - 1 + np.arange(len(cont))
        nll[end : end + len(cont)] = -lp[at, cont]
        end += len(cont)
    return nll[first:]


def nll_recomputed(model, vocab, row, first: int, stride: int, carried: bool) -> np.ndarray:
    """Per-event NLL of row[j] for j >= first from fresh windows of STYLE (+ carried state) + the latest events."""
    window, logp = model.cfg.max_len, _forward(model)
    nll = np.full(len(row), np.nan)
    contexts, spans = [], []
    for a in range(first, len(row), stride):
        b = min(a + stride, len(row))
        start = b - (window - 1)
        while True:  # the carried state's length depends on the start
            state = vocab.carried_state(row, start, limit=window // 4) if carried else []
            need = b - (window - 1 - len(state))
            if need <= start:
                break
            start = need
        contexts.append(np.concatenate([row[:1], state, row[start:b]]).astype(np.int32))
        spans.append((a, b))
    for ctx, (a, b), lp in zip(contexts, spans, logp(contexts)):
        at = len(ctx) - 1 - (b - np.arange(a, b))
        nll[a:b] = -lp[at, row[a:b]]
    return nll[first:]


def nll_rolling(model, rows, first: int, sink: int = 1) -> list[np.ndarray]:
    """Per-event NLL of row[j] for j >= first through the rolling cache, all rows at once."""
    graphdef, params = nnx.split(model)
    n = max(len(r) for r in rows)
    tokens_BxN = np.zeros((len(rows), n), np.int32)
    for b, r in enumerate(rows):
        tokens_BxN[b, : len(r)] = r

    @jax.jit
    def run(params, tokens_BxN):
        m = nnx.merge(graphdef, params)

        pitches = m.cfg.sounding_pitches  # a model that hears the notes: counted over the whole piece, as
        # the continuous sampler counts them

        def step(carry, t):
            cache, heard_BxP = carry
            token_B = tokens_BxN[:, t]
            logits_BxV, cache = m.decode_rolling(token_B, jnp.full(tokens_BxN.shape[0], t, jnp.int32), cache,
                                                 heard_BxP if pitches else None)
            if pitches:
                heard_BxP = heard_counts(token_B[:, None], pitches, heard_BxP)[:, 0]
            lp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
            nxt_B = tokens_BxN[:, jnp.minimum(t + 1, n - 1)]
            return (cache, heard_BxP), -jnp.take_along_axis(lp_BxV, nxt_B[:, None], axis=1)[:, 0]

        heard_BxP = jnp.zeros((tokens_BxN.shape[0], max(pitches, 1)), jnp.int32)
        _, nll_NxB = jax.lax.scan(step, (m.init_rolling_cache(tokens_BxN.shape[0], sink=sink), heard_BxP),
                                  jnp.arange(n - 1))
        return nll_NxB.T

    nll_BxN1 = np.asarray(run(params, jnp.asarray(tokens_BxN)))
    return [nll_BxN1[b, first - 1 : len(r) - 1] for b, r in enumerate(rows)]


def nll_stream(run, style: str, row, first: int, slide: str) -> np.ndarray:
    """NLL (nats) of row[first:] read through a live session's stream (`mgpt.live.stream.Stream`,
    guidance 1), the row's events appended and fed one by one as a player's would be: its window
    slides as `slide` says ('keep': the kept events' keys and values move; 'reprefill')."""
    from mgpt.live import stream as stream_lib

    s = stream_lib.Stream(run, stream_lib.Settings(guidance=1.0, style=style), slide=slide)
    out = []
    for i, token in enumerate(row[1:].tolist(), start=1):
        if i >= first:
            out.append(-float(jax.nn.log_softmax(s.logits[0])[token]))
        s._append([token], stream_lib.USER)
        s._flush()
    return np.asarray(out)


def stretch_density(vocab, ids: np.ndarray, edges) -> list[float]:
    """Notes per onset over the onsets that fall in each stretch [edges[i], edges[i+1]) of events (STYLE excluded)."""
    events = np.asarray(ids[1:], np.int64)
    shift = (events >= vocab.time_shift_offset) & (events < vocab.time_shift_offset + vocab.max_shift_steps)
    steps = np.where(shift, events - vocab.time_shift_offset + 1, 0)
    at_s = np.concatenate([[0], np.cumsum(steps)]) / vocab.steps_per_second  # time before event i
    notes = vocab.decode_notes(events)
    start, end = np.asarray(notes[2]), np.asarray(notes[3])
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        if a >= len(events):
            out.append(np.nan)
            continue
        t0, t1 = at_s[a], at_s[min(b, len(events))]
        onsets = np.unique(start[(start >= t0) & (start < t1)])
        if not len(onsets):
            out.append(np.nan)
            continue
        out.append(float(np.mean([np.sum((start <= t) & (end > t)) for t in onsets])))
    return out


def thirds(n: int) -> list[int]:
    return [0, n // 3, 2 * n // 3, n]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--events", type=int, default=1024)
    p.add_argument("--pieces", type=int, default=12, help="Bach pieces sampled per scheme")
    p.add_argument("--stride", type=int, default=32, help="recomputed schemes: events scored per fresh window")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--no_nll", action="store_true")
    p.add_argument("--no_density", action="store_true")
    a = p.parse_args()
    run = load_run(a.workdir)
    vocab, model = run.vocab, run.model
    window = model.cfg.max_len
    print(f"{a.workdir}: step {run.step}, context {window}; jax {jax.__version__} on {jax.devices()[0].platform}",
          flush=True)

    if not a.no_nll:
        pieces = held_out_pieces(run, 2 * window, a.events + 1)
        rows = [r for _, r, _ in pieces]
        print(f"NLL over events {window}..{a.events} of {len(rows)} held-out pieces "
              f"({', '.join(sorted({s for s, _, _ in pieces}))}), nats/event:", flush=True)
        t = time.perf_counter()
        schemes = {
            "reprefill": [nll_reprefill(model, vocab, r, window) for r in rows],
            "rolling (sink)": nll_rolling(model, rows, window),
            "sink, recomputed": [nll_recomputed(model, vocab, r, window, a.stride, False) for r in rows],
            "sink + carried, recomputed": [nll_recomputed(model, vocab, r, window, a.stride, True) for r in rows],
            "live stream, re-prefilled": [nll_stream(run, st, r, window, "reprefill") for st, r, _ in pieces],
            "live stream, kept (default)": [nll_stream(run, st, r, window, "keep") for st, r, _ in pieces],
        }
        edges = [window, 512, 768, a.events + 1]
        print(f"  {'scheme':28s} {'all':>6s} " + " ".join(f"{f'{x}-{y - 1}':>9s}" for x, y in zip(edges, edges[1:])),
              flush=True)
        for name, per_piece in schemes.items():
            flat = np.concatenate(per_piece)
            by = []
            for x, y in zip(edges, edges[1:]):
                vals = np.concatenate([v[max(0, x - window) : max(0, y - window)] for v in per_piece])
                by.append(f"{np.mean(vals):9.4f}" if len(vals) else f"{'-':>9s}")
            print(f"  {name:28s} {np.mean(flat):6.4f} " + " ".join(by), flush=True)
        base = schemes["reprefill"]
        for name, per_piece in list(schemes.items())[1:]:
            gaps = np.array([np.mean(x) - np.mean(y) for x, y in zip(per_piece, base)])
            worst = np.argsort(-np.abs(gaps))[:2]
            print(f"  {name} - reprefill, per piece: mean {np.mean(gaps):+.4f}, lower on {int(np.sum(gaps < 0))} of "
                  f"{len(gaps)} pieces; furthest: " + ", ".join(f"{pieces[k][2]} {gaps[k]:+.4f}" for k in worst),
                  flush=True)
        print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)

    if not a.no_density:
        from mgpt.train import data as data_lib

        edges = list(range(0, a.events + 1, 256))
        src = data_lib.open_source(run.dataset_dir, "train")
        real = [np.concatenate([[0], np.asarray(src[i]["tokens"], np.int32)]) for i in range(len(src))
                if data_lib.record_text(src[i]["style"]) == "bach"]
        whole = np.nanmean([stretch_density(vocab, r, [0, len(r)])[0] for r in real])
        last = np.nanmean([stretch_density(vocab, r, thirds(len(r) - 1))[2] for r in real])
        print(f"Bach, notes per onset: train split ({len(real)} pieces) {whole:.2f} over whole pieces, "
              f"{last:.2f} in their last thirds", flush=True)
        print(f"  {'context':10s} " + " ".join(f"{f'{x}-{y}':>9s}" for x, y in zip(edges, edges[1:]))
              + "   thirds: first / middle / last   (pieces reaching each stretch)", flush=True)
        prompts = run.prompts(["bach"] * a.pieces)
        for context in ("reprefill", "rolling"):
            t = time.perf_counter()
            out = run.sample_ids(prompts, list(range(a.pieces)), Sampling(max_events=a.events, context=context),
                                 batch_size=a.batch)
            by = np.array([stretch_density(vocab, r, edges) for r in out])
            th = np.array([stretch_density(vocab, r, thirds(len(r) - 1)) for r in out])
            reach = [int(np.sum(~np.isnan(by[:, i]))) for i in range(by.shape[1])]
            print(f"  {context:10s} " + " ".join(f"{v:9.2f}" for v in np.nanmean(by, axis=0))
                  + f"   {' / '.join(f'{v:.2f}' for v in np.nanmean(th, axis=0))}   ({', '.join(map(str, reach))}; "
                  f"{np.mean([len(r) - 1 for r in out]):.0f} events a piece, {time.perf_counter() - t:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
