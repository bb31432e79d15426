"""Controls followed by choice rather than by masking: each control segment drawn several times.

`Sampling.control_tries` = K > 1: a steered piece is written one control segment at a time. Each
segment is drawn K times from where the piece has got to (K rows of one batch, each with its own
seed), every draw is measured as the evaluation measures a piece (`data_prep.controls.segment_levels`
on its notes), and the draw whose levels are nearest the asked ones is kept; the piece goes on from
it. Every kept segment is one the model wrote unhindered where its guards are off, so the
piece keeps the model's own beat and texture; the guards, where on, still act inside each draw.
Ties keep the first draw. docs/controls.md measures it against the guards.
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


def sample_by_segment(run, prompts: Sequence[np.ndarray], seeds: Sequence[int], sampling,
                      texts: Sequence[str | None], tries: int, **kwargs) -> list[np.ndarray]:
    """`Run.sample_ids` with each control segment drawn `tries` times and the nearest draw kept.

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
                                    control_tries=1)
            drawn = run.sample_ids([rows[i] for i in group for _ in range(tries)], cand_seeds, s,
                                   timelines=[texts[i] for i in group for _ in range(tries)], **kwargs)
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
                best = int(np.argmin(far))
                rows[i] = options[best]
                now[i] = int(data_controls.steps_after(vocab, rows[i])[-1])
                done[i] = final or not crossed[best] or now[i] >= ends[i]
    return rows
