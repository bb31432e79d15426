"""Controls followed by choice rather than by masking: each control segment drawn several times.

`Sampling.control_tries` = K > 1: a steered piece is written one control segment at a time. Each
segment is drawn K times from where the piece has got to (K rows of one batch, each with its own
seed), every draw is measured as the evaluation measures a piece (`data_prep.controls.segment_levels`
on its notes), and the draw whose levels are nearest the asked ones is kept; the piece goes on from
it. Every kept segment is one the model wrote unhindered where its guards are off, so the
piece keeps the model's own beat and texture; the guards, where on, still act inside each draw.
Ties keep the first draw. docs/controls.md measures it against the guards.

`Sampling.prefer_style`: ties go instead to the draw the model itself reads most as the piece's
style (`style_evidence`: the log-likelihood of the draw's events under the piece's STYLE against
STYLE:unknown, both reading the same controls). Every piece with a style is then drawn this way,
with controls or without, so that steered pieces and plain ones are chosen alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from data_prep import controls as data_controls
from mgpt.errors import UserError

# Mode is a class, not a scale: a draw in the wrong mode is as far off as one a level out.
_MODE = data_controls.ATTRIBUTES.index("mode")


def distance(got_SxA: np.ndarray, asked_SxA: np.ndarray) -> np.ndarray:
    """Per segment, how far measured levels are from asked ones: the sum over the asked controls
    (level > 0) of the levels between them, a wrong mode counting 1."""
    asked = asked_SxA > 0
    gap = np.abs(got_SxA.astype(np.int64) - asked_SxA)
    gap[..., _MODE] = got_SxA[..., _MODE] != asked_SxA[..., _MODE]
    return np.where(asked, gap, 0).sum(-1)


def seeds_of(seed: int, segment: int, tries: int) -> list[int]:
    """The seeds of one piece's `tries` draws of one segment: distinct, and the same on every run."""
    state = np.random.SeedSequence([int(seed), int(segment)]).generate_state(tries)
    return [int(s) for s in state]


def style_evidence(run, rows: Sequence[np.ndarray], starts: Sequence[int]) -> np.ndarray:
    """float64[len(rows)]: how much more likely the model finds each row's events from `starts[i]` on
    under the row's STYLE (its first token) than under STYLE:unknown, in nats: the sum over those
    events of log p(event | STYLE, context) - log p(event | STYLE:unknown, context). Both read the
    same context, control tokens included, through the window the sampler would give the row next
    (`sampler.window_prompt`); control tokens are asked for, not drawn, and are not counted, nor
    are events that window no longer holds. A row of STYLE:unknown scores 0."""
    import jax.numpy as jnp

    from mgpt.sample.sampler import window_prompt

    vocab = run.vocab
    window = run.model.cfg.max_len
    score = run.scorer()
    tokens_BxW = np.zeros((len(rows), window), np.int32)
    counted_BxW = np.zeros((len(rows), window), bool)  # position j: the event at j + 1 counts
    for b, (row, start) in enumerate(zip(rows, starts)):
        row = [int(t) for t in row]
        ctx = window_prompt(row, window, vocab)
        # A re-windowed row keeps its last events after STYLE and the carried state (at most a
        # quarter of the window); the events before them are out of sight.
        new = min(len(row) - int(start), len(ctx) - 1 if len(ctx) == len(row) else window // 4 - 1)
        tokens_BxW[b, :len(ctx)] = ctx
        if new > 0 and row[0] != vocab.unknown_style_id:
            nxt = np.asarray(ctx[len(ctx) - new:], np.int64)
            counted_BxW[b, len(ctx) - new - 1:len(ctx) - 1] = ~vocab.is_control(nxt)
    out = np.zeros(len(rows), np.float64)
    chunk = 64
    for lo in range(0, len(rows), chunk):
        part = tokens_BxW[lo:lo + chunk]
        pad = -len(part) % 8  # a few batch shapes, not one per group size
        part = np.concatenate([part, np.zeros((pad, window), np.int32)])
        gain_BxW = np.asarray(score(jnp.asarray(part), jnp.int32(vocab.unknown_style_id)))[:len(part) - pad]
        out[lo:lo + chunk] = np.where(counted_BxW[lo:lo + chunk], gain_BxW, 0.0).sum(-1)
    return out


def sample_by_segment(run, prompts: Sequence[np.ndarray], seeds: Sequence[int], sampling,
                      texts: Sequence[str | None], tries: int, **kwargs) -> list[np.ndarray]:
    """`Run.sample_ids` with each control segment drawn `tries` times and the nearest draw kept
    (with `sampling.prefer_style`, of the nearest the one most in the piece's style).

    `texts`: each prompt's --controls text (None: none, the mood alone, as in `Run.sample_ids`),
    asking for levels by segment of the piece's clock, with `sampling.mood`. `sampling` must have its budget in seconds
    (`max_seconds`); `kwargs` go to `Run.sample_ids` (batch_size, devices). Returns the rows as
    `Run.sample_ids` does."""
    vocab = run.vocab
    spec = vocab.controls
    if sampling.max_seconds is None:
        raise UserError(f"--control_tries={tries} draws pieces a control segment at a time: give their length "
                        "in seconds (--max_seconds), not in events")
    if len(texts) != len(prompts):
        raise ValueError(f"{len(texts)} timelines for {len(prompts)} prompts")
    timelines = [dataclasses.replace(sampling, controls=t).timeline(vocab) for t in texts]
    seg = data_controls.segment_steps(vocab)
    now = [int(data_controls.steps_after(vocab, p)[-1]) for p in prompts]  # the piece's clock, in steps
    ends = [n + int(round(float(sampling.max_seconds) * vocab.steps_per_second)) for n in now]
    segments = max(ends) // seg + 1
    asked = [t.segment_levels(vocab, segments) for t in timelines]
    rows = [np.asarray(p, np.int32) for p in prompts]
    done = [False] * len(rows)
    # A round takes each row across the end of its segment: the draw may go on for the longest
    # TIME_SHIFT past it (so any shift that crosses it is drawn), and is cut right after the shift
    # that crosses it, where the next segment's controls go.
    margin = vocab.max_shift_steps
    while not all(done):
        live = [i for i in range(len(rows)) if not done[i]]
        last = [i for i in live if (now[i] // seg + 1) * seg >= ends[i]]  # the piece ends in this segment
        for group, final in ((last, True), ([i for i in live if i not in last], False)):
            if not group:
                continue
            budget = max((ends[i] if final else (now[i] // seg + 1) * seg + margin) - now[i] for i in group)
            cand_seeds = [x for i in group for x in seeds_of(seeds[i], now[i] // seg, tries)]
            s = dataclasses.replace(sampling, max_seconds=budget / vocab.steps_per_second, max_events=None,
                                    control_tries=1, prefer_style=False)
            drawn = run.sample_ids([rows[i] for i in group for _ in range(tries)], cand_seeds, s,
                                   timelines=[texts[i] for i in group for _ in range(tries)],
                                   piece_ends_s=[ends[i] / vocab.steps_per_second for i in group for _ in range(tries)],
                                   **kwargs)
            picks = []  # (piece, its draws cut at the segment's end, whether each crossed it, distances)
            for g, i in enumerate(group):
                k, stop = now[i] // seg, (now[i] // seg + 1) * seg
                options, crossed = [], []
                for row in drawn[g * tries:(g + 1) * tries]:
                    new = row[len(rows[i]):]
                    clock = now[i] + data_controls.steps_after(vocab, new) if len(new) else np.zeros(0, np.int64)
                    over = np.flatnonzero(clock > ends[i])
                    past = np.flatnonzero(clock >= stop) if not final else over[:0]
                    if len(past) and clock[past[0]] <= ends[i]:
                        row = row[:len(rows[i]) + past[0] + 1]
                    elif len(over):  # the piece's budget ends before this shift, as in one draw
                        row, past = row[:len(rows[i]) + over[0]], past[:0]
                    crossed.append(bool(len(past)))
                    options.append(row)
                levels = [data_controls.segment_levels(vocab.decode_notes(r), spec, k + 1)[k:k + 1] for r in options]
                far = np.array([distance(lv, asked[i][k:k + 1])[0] for lv in levels], np.float64)
                if any(crossed):  # a draw that ended the piece (EOS) early is kept only if every draw did
                    far[~np.asarray(crossed)] = np.inf
                picks.append((i, options, crossed, far))
            if sampling.prefer_style:  # the nearest draws' style evidence, for the whole group at once
                near = [(g, j) for g, (i, options, _, far) in enumerate(picks) for j in np.flatnonzero(far == far.min())]
                gain = style_evidence(run, [picks[g][1][j] for g, j in near], [len(rows[picks[g][0]]) for g, _ in near])
                chosen = {}  # among the nearest, the most in style; ties (and pieces with no style) keep the first
                for (g, j), e in zip(near, gain):
                    if g not in chosen or e > chosen[g][1]:
                        chosen[g] = (j, e)
            for g, (i, options, crossed, far) in enumerate(picks):
                best = chosen[g][0] if sampling.prefer_style else int(np.argmin(far))
                rows[i] = options[best]
                now[i] = int(data_controls.steps_after(vocab, rows[i])[-1])
                done[i] = final or not crossed[best] or now[i] >= ends[i]
    return rows
