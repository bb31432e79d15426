"""Continuous batching over a rolling KV cache: every slot of the batch always has a piece.

`run_chunk` is the compiled core: a `lax.while_loop` over B slots (a slot table), each
holding one piece of the plan in a rolling KV cache of W = cfg.max_len slots whose first S
(the sink: the STYLE token) stay while the events roll (`mgpt.model.gpt.RollingCache`). Per
loop step each slot does one of:
- feed the next token of its prompt (forced, no sampling): a prompt of L tokens takes L steps;
- sample one event (`choose_event`, the same rule as `sample_window`) and feed it;
- finish (EOS or a budget), and in the same step take the next piece of the queue, whose first
  prompt token it feeds at once: a slot idles only when the queue is empty.
A piece never pauses at the end of a window and is never re-prefilled. Under context 'reprefill'
instead, a piece whose window is full leaves its slot and comes back first in the queue with its
next window (`sampler.window_prompt`), fed as forced steps: the windowed sampler's pieces, byte for
byte, at continuous batching's occupancy between windows.

The host runs the loop in chunks of K steps (`ContinuousSampler`); between chunks it tops
up the queue and takes the finished pieces, so a corpus writes them as they come and a kill
loses only the pieces in flight. New pieces enter the queue longest budget first (ties in the
order they were added): a plan's long pieces then start early, and its tail, where slots idle
because nothing is left to take, is made of the short ones.

A piece depends only on its prompt, seed and budgets, never on its slot, the batch size, its
neighbours or the order of the plan: its event n is drawn with `fold_in(key(seed), n)` (as in
`sample_window`), its positions restart at 0 in its slot, and the slot's cache is emptied
(`RollingCache.forget`) when it arrives.

Classifier-free guidance runs each slot twice (cache rows b and B + b; the twin's STYLE
token is STYLE:unknown), as `sample_window` does. Infilling (fill rows) is not run here:
`generate_tokens` keeps it on the windowed path.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import heapq
import itertools
import math
from collections.abc import Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_prep.vocab import Vocabulary
from mgpt.model.gpt import GPT, RollingCache, heard_counts
from mgpt.sample import sampler as sampler_lib
from mgpt.sample.sampler import (SILENT, RowLimits, RowState, choose_event, guided_logits, sounding_state,
                                 track_notes)

DEFAULT_CHUNK_STEPS = 256  # loop steps per host round trip: finished pieces come back this often
DEFAULT_SINK = 1  # the STYLE token


@flax.struct.dataclass
class Queue:
    """Pieces waiting for a slot, in plan order (Q entries; piece_Q -1 = no piece).

    piece_Q: the host's id of the piece. prompt_QxL / length_Q: its prompt, right-padded.
    seed_Q: uint32. open_QxP / onset_QxP: the notes sounding at the prompt's end (`RowState.start`).
    max_events_Q / max_steps_Q / max_note_steps_Q: its budgets and note-length guard (`RowLimits`).
    events_Q / steps_Q: the new events and time steps it has made already (0 but for a piece that goes
    on in a re-prefilled window).
    """

    piece_Q: jax.Array
    prompt_QxL: jax.Array
    length_Q: jax.Array
    seed_Q: jax.Array
    open_QxP: jax.Array
    onset_QxP: jax.Array
    max_events_Q: jax.Array
    max_steps_Q: jax.Array
    max_note_steps_Q: jax.Array
    events_Q: jax.Array
    steps_Q: jax.Array


@flax.struct.dataclass
class Slots:
    """The slot table (B slots; under guidance the cache has 2B rows).

    piece_B: the host's id of the slot's piece, -1 when idle. prompt_BxL / length_B: its prompt,
    fed_B of which are fed. position_B: where its next token goes. logits_BxV: its next-event
    logits. rows / limits: what `choose_event` needs. taken: queue entries taken this chunk.
    """

    cache: RollingCache
    logits_BxV: jax.Array
    piece_B: jax.Array
    prompt_BxL: jax.Array
    length_B: jax.Array
    fed_B: jax.Array
    position_B: jax.Array
    seed_B: jax.Array
    rows: RowState
    limits: RowLimits
    taken: jax.Array
    heard_RxP: jax.Array | None = None  # a model with sounding_pitches: the notes each cache row has heard


@flax.struct.dataclass
class Chunk:
    """What one `run_chunk` call did, step by step (K steps; -1 = nothing).

    token_KxB / piece_KxB: the event each slot emitted at each step and whose it is.
    finished_KxB: the piece a slot finished at that step. paused_KxB (context 'reprefill'): the
    piece whose window a slot filled at that step; the host queues its next window. steps: steps
    run (<= K).
    """

    token_KxB: jax.Array
    piece_KxB: jax.Array
    finished_KxB: jax.Array
    paused_KxB: jax.Array
    steps: jax.Array


def empty_slots(model: GPT, vocab: Vocabulary, batch: int, prompt_len: int, guided: bool,
                sink: int = DEFAULT_SINK) -> Slots:
    """A slot table of `batch` idle slots, prompts of up to `prompt_len` tokens (2 * batch cache rows when guided)."""
    num_pitches = vocab.max_pitch - vocab.min_pitch + 1
    zeros_B = jnp.zeros(batch, jnp.int32)
    # Copied leaf by leaf: run_chunk donates the table, and no buffer may be donated twice.
    return jax.tree.map(jnp.copy, Slots(
        cache=model.init_rolling_cache(2 * batch if guided else batch, sink=sink),
        logits_BxV=jnp.zeros((batch, model.cfg.vocab_size), jnp.float32),
        piece_B=jnp.full(batch, -1, jnp.int32),
        prompt_BxL=jnp.zeros((batch, prompt_len), jnp.int32),
        length_B=zeros_B, fed_B=zeros_B, position_B=zeros_B,
        seed_B=jnp.zeros(batch, jnp.uint32),
        rows=RowState(events_B=zeros_B, steps_B=zeros_B, done_B=jnp.ones(batch, bool),
                      open_BxP=jnp.zeros((batch, num_pitches), jnp.int32),
                      onset_BxP=jnp.full((batch, num_pitches), SILENT, jnp.int32)),
        limits=RowLimits(max_events_B=zeros_B, max_steps_B=zeros_B, max_note_steps_B=zeros_B),
        taken=jnp.zeros((), jnp.int32),
        heard_RxP=(jnp.zeros((2 * batch if guided else batch, model.cfg.sounding_pitches), jnp.int32)
                   if model.cfg.sounding_pitches else None),
    ))


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "reprefill"), donate_argnames=("slots",))
def run_chunk(graphdef, params, slots: Slots, queue: Queue, settings, tables, guidance=None, *, steps: int,
              reprefill: bool = False):
    """Up to `steps` loop steps of the slot table (module docstring): (slots, Chunk).

    Stops early once every slot is idle and the queue is spent. guidance: None, or a float32
    scalar G (`guided_logits`); None and a value trace different functions. reprefill: a piece
    whose window is full (W tokens fed) leaves its slot, paused, instead of rolling on.
    """
    model = nnx.merge(graphdef, params)
    batch = slots.piece_B.shape[0]
    queue_len = queue.piece_Q.shape[0]
    twin = (lambda x_B: x_B) if guidance is None else (lambda x_B: jnp.concatenate([x_B, x_B]))
    slot_B = jnp.arange(batch)
    window = model.cfg.max_len

    def waiting(s: Slots):
        return (s.taken < queue_len) & (queue.piece_Q[jnp.minimum(s.taken, queue_len - 1)] >= 0)

    def body(carry):
        s, out, k = carry
        r, limits = s.rows, s.limits
        # 1. Slots whose prompt is in sample an event; a stop frees the slot, and so does a full
        # window under re-prefill (the host queues the piece's next window).
        ready_B = (s.piece_B >= 0) & (s.fed_B >= s.length_B)
        paused_B = ready_B & (s.position_B >= window) if reprefill else jnp.zeros_like(ready_B)
        sampling_B = ready_B & ~paused_B
        keys_B = jax.vmap(jax.random.fold_in)(jax.vmap(jax.random.key)(s.seed_B), r.events_B)
        token_B = choose_event(s.logits_BxV, r, limits, settings, tables, keys_B)
        new_steps_B = r.steps_B + tables["shift_steps_V"][token_B]
        stop_B = sampling_B & ((token_B == tables["eos_id"]) | (new_steps_B > limits.max_steps_B)
                               | (r.events_B >= limits.max_events_B))
        emit_B = sampling_B & ~stop_B
        open_BxP, onset_BxP = track_notes(r, token_B, emit_B, tables)
        events_B = r.events_B + emit_B
        steps_B = jnp.where(emit_B, new_steps_B, r.steps_B)
        out = Chunk(token_KxB=out.token_KxB.at[k].set(jnp.where(emit_B, token_B, -1)),
                    piece_KxB=out.piece_KxB.at[k].set(jnp.where(emit_B, s.piece_B, -1)),
                    finished_KxB=out.finished_KxB.at[k].set(jnp.where(stop_B, s.piece_B, -1)),
                    paused_KxB=out.paused_KxB.at[k].set(jnp.where(paused_B, s.piece_B, -1)), steps=k + 1)
        piece_B = jnp.where(stop_B | paused_B, -1, s.piece_B)

        # 2. Idle slots take the next pieces of the queue, in slot order.
        idle_B = piece_B < 0
        q_B = s.taken + jnp.cumsum(idle_B) - 1
        q_B = jnp.minimum(q_B, queue_len - 1)
        new_B = idle_B & (s.taken + jnp.cumsum(idle_B) - 1 < queue_len) & (queue.piece_Q[q_B] >= 0)

        def pick(slot_value, queue_value):
            new = new_B.reshape(new_B.shape + (1,) * (slot_value.ndim - 1))
            return jnp.where(new, queue_value[q_B], slot_value)

        piece_B = pick(piece_B, queue.piece_Q)
        prompt_BxL = pick(s.prompt_BxL, queue.prompt_QxL)
        length_B = pick(s.length_B, queue.length_Q)
        seed_B = pick(s.seed_B, queue.seed_Q)
        fed_B = jnp.where(new_B, 0, s.fed_B)
        position_B = jnp.where(new_B, 0, s.position_B)
        rows = RowState(events_B=pick(events_B, queue.events_Q), steps_B=pick(steps_B, queue.steps_Q),
                        done_B=piece_B < 0, open_BxP=pick(open_BxP, queue.open_QxP),
                        onset_BxP=pick(onset_BxP, queue.onset_QxP))
        limits = limits.replace(max_events_B=pick(limits.max_events_B, queue.max_events_Q),
                                max_steps_B=pick(limits.max_steps_B, queue.max_steps_Q),
                                max_note_steps_B=pick(limits.max_note_steps_B, queue.max_note_steps_Q))
        cache = s.cache.forget(twin(new_B))

        # 3. One decode step: the next prompt token, or the event just drawn.
        feeding_B = (piece_B >= 0) & (fed_B < length_B)
        prompt_token_B = prompt_BxL[slot_B, jnp.minimum(fed_B, prompt_BxL.shape[1] - 1)]
        in_B = jnp.where(feeding_B, prompt_token_B, token_B)
        in_R = twin(in_B)
        if guidance is not None:  # the unconditional twin reads STYLE:unknown at position 0
            in_R = in_R.at[batch:].set(jnp.where(feeding_B & (fed_B == 0), tables["unknown_style_id"], in_B))
        heard_RxP = s.heard_RxP
        if heard_RxP is not None:  # a new piece has heard nothing
            heard_RxP = jnp.where(twin(new_B)[:, None], 0, heard_RxP)
        logits_RxV, cache = model.decode_rolling(in_R, twin(position_B), cache, heard_RxP)
        moved_B = feeding_B | emit_B
        if heard_RxP is not None:
            heard_RxP = jnp.where(twin(moved_B)[:, None],
                                  heard_counts(in_R[:, None], model.cfg.sounding_pitches, heard_RxP)[:, 0], heard_RxP)
        s = Slots(cache=cache, logits_BxV=guided_logits(logits_RxV, guidance), piece_B=piece_B,
                  prompt_BxL=prompt_BxL, length_B=length_B, fed_B=fed_B + feeding_B,
                  position_B=position_B + moved_B, seed_B=seed_B, rows=rows, limits=limits,
                  taken=s.taken + jnp.sum(new_B), heard_RxP=heard_RxP)
        return s, out, k + 1

    def more(carry):
        s, _, k = carry
        return (k < steps) & (jnp.any(s.piece_B >= 0) | waiting(s))

    none_KxB = jnp.full((steps, batch), -1, jnp.int32)
    out = Chunk(token_KxB=none_KxB, piece_KxB=none_KxB, finished_KxB=none_KxB, paused_KxB=none_KxB,
                steps=jnp.zeros((), jnp.int32))
    slots, out, _ = jax.lax.while_loop(more, body, (slots, out, jnp.zeros((), jnp.int32)))
    return slots, out


def _bucket(n: int, floor: int = 1) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, floor, 1))))


@dataclasses.dataclass
class _Entry:
    """A queued piece, or a re-prefilled piece's next window: what `Queue` holds of it."""

    piece: int
    prompt: np.ndarray  # what the slot feeds: the piece's prompt, or its next window
    seed: int
    max_events: int
    max_steps: int
    max_note_steps: int
    open_P: np.ndarray
    onset_P: np.ndarray
    events: int = 0
    steps: int = 0


class ContinuousSampler:
    """Pieces in, finished pieces out, B slots always busy (module docstring).

        sampler = ContinuousSampler(model, vocab, batch_size=16, settings=..., tables=...)
        sampler.add(piece_id, prompt, seed, max_events=..., max_steps=..., max_note_steps=...)
        for piece_id, row in sampler:   # row: prompt + new events, int32, no EOS
            ...                         # may add() more (a copy guard's re-draw)

    context: 'rolling' (the rolling cache) or 'reprefill': a piece whose window fills leaves its
    slot and is queued first again with its next window (`sampler.window_prompt`: STYLE, the
    carried state, its latest events), which a slot feeds as forced steps; its events are the
    windowed sampler's. `events` and `slot_steps` count the events emitted and the slot-steps
    run: occupancy is their ratio (`steady_*`: over the chunks that ended with pieces still
    queued, which leaves out the tail of a finite plan). A batch of 1 runs 2 slots (see
    `sampler._generate_batch`).

    order: 'longest_first' (new pieces are offered by budget, seconds then events, longest first;
    equal budgets keep the order they were added) or 'plan' (the order they were added). Either
    way a piece is the same: only when it comes out changes.
    """

    def __init__(self, model: GPT, vocab: Vocabulary, *, batch_size: int, settings, tables, guidance=None,
                 context: str = "rolling", sink: int = DEFAULT_SINK, chunk_steps: int = DEFAULT_CHUNK_STEPS,
                 queue_size: int | None = None, order: str = "longest_first"):
        if context not in ("rolling", "reprefill"):
            raise ValueError(f"context must be 'rolling' or 'reprefill', got {context!r}")
        if order not in ("longest_first", "plan"):
            raise ValueError(f"order must be 'longest_first' or 'plan', got {order!r}")
        self.model, self.vocab = model, vocab
        self.graphdef, self.params = nnx.split(model)
        self.batch = _bucket(batch_size, floor=2)
        self.settings, self.tables, self.guidance = settings, tables, guidance
        self.reprefill = context == "reprefill"
        self.sink, self.chunk_steps = sink, chunk_steps
        self.queue_size = queue_size or 2 * self.batch
        # What the next chunk offers: re-prefilled windows first, then new pieces topped up from
        # `_waiting` (a heap in `order`) up to queue_size, so a late add never reorders them.
        self.pending: collections.deque[_Entry] = collections.deque()
        self.longest_first = order == "longest_first"
        self._waiting: list[tuple[int, int, int, _Entry]] = []
        self._added = itertools.count()
        self.slots: Slots | None = None
        self.prompt_len = 0
        self._in_flight: dict[int, list] = {}  # piece -> its prompt and the events so far
        self._entries: dict[int, _Entry] = {}  # piece -> its first entry (seed, budgets)
        self._prompts: dict[int, np.ndarray] = {}  # piece -> its own prompt
        self.events = 0
        self.slot_steps = 0
        self.steady_events = 0  # the same, over chunks that ended with pieces still queued
        self.steady_slot_steps = 0

    def add(self, piece: int, prompt: Sequence[int], seed: int, *, max_events: int, max_steps: int,
            max_note_steps: int = 0) -> None:
        """Queues a piece (ids: any int >= 0, unique among pieces in flight)."""
        prompt = np.asarray(prompt, np.int32).reshape(-1)
        if prompt.size < 1:
            raise ValueError("a prompt needs at least its STYLE token")
        open_P, onset_P = sounding_state(self.vocab, prompt)
        self._prompts[int(piece)] = prompt
        feed = prompt
        if self.reprefill and prompt.size >= self.model.cfg.max_len:  # a primer longer than the window
            from mgpt.sample.sampler import window_prompt

            feed = np.asarray(window_prompt(list(prompt), self.model.cfg.max_len, self.vocab), np.int32)
        entry = _Entry(int(piece), feed, int(seed), int(max_events), int(max_steps), int(max_note_steps), open_P,
                       onset_P)
        rank = (-entry.max_steps, -entry.max_events) if self.longest_first else (0, 0)
        heapq.heappush(self._waiting, (*rank, next(self._added), entry))

    def _next_window(self, entry: _Entry, row: np.ndarray) -> _Entry:
        """A paused piece's next window (re-prefill), going on from its events, time and sounding notes."""
        from mgpt.sample.sampler import window_prompt

        new = row[len(self._prompts[entry.piece]) :]
        shift = self.tables["shift_steps_V"]
        steps = int(np.asarray(shift)[new].sum()) if len(new) else 0
        open_P, onset_P = sounding_state(self.vocab, row)  # onsets relative to the row's end
        onset_P = np.where(onset_P == SILENT, SILENT, onset_P.astype(np.int64) + steps).astype(np.int32)
        prompt = np.asarray(window_prompt(list(row), self.model.cfg.max_len, self.vocab), np.int32)
        return dataclasses.replace(entry, prompt=prompt, open_P=open_P, onset_P=onset_P, events=len(new), steps=steps)

    def _queue(self) -> Queue:
        q, entries = self.queue_size, list(self.pending)[: self.queue_size]
        num_pitches = self.vocab.max_pitch - self.vocab.min_pitch + 1
        piece_Q = np.full(q, -1, np.int32)
        prompt_QxL = np.zeros((q, self.prompt_len), np.int32)
        length_Q, max_events_Q, max_steps_Q, max_note_steps_Q, events_Q, steps_Q = (np.zeros(q, np.int32)
                                                                                  for _ in range(6))
        seed_Q = np.zeros(q, np.uint32)
        open_QxP = np.zeros((q, num_pitches), np.int32)
        onset_QxP = np.full((q, num_pitches), SILENT, np.int32)
        for i, e in enumerate(entries):
            piece_Q[i], length_Q[i], seed_Q[i] = e.piece, e.prompt.size, e.seed
            prompt_QxL[i, : e.prompt.size] = e.prompt
            max_events_Q[i], max_steps_Q[i], max_note_steps_Q[i] = e.max_events, e.max_steps, e.max_note_steps
            open_QxP[i], onset_QxP[i], events_Q[i], steps_Q[i] = e.open_P, e.onset_P, e.events, e.steps
        return jax.tree.map(jnp.asarray, Queue(piece_Q=piece_Q, prompt_QxL=prompt_QxL, length_Q=length_Q, seed_Q=seed_Q,
                                               open_QxP=open_QxP, onset_QxP=onset_QxP, max_events_Q=max_events_Q,
                                               max_steps_Q=max_steps_Q, max_note_steps_Q=max_note_steps_Q,
                                               events_Q=events_Q, steps_Q=steps_Q))

    def _grow_prompts(self, length: int) -> None:
        """Room for prompts of `length` tokens (a new compiled shape, so in power-of-two steps)."""
        new_len = _bucket(length, floor=8)
        if self.slots is None:
            self.prompt_len = new_len
            self.slots = empty_slots(self.model, self.vocab, self.batch, new_len, self.guidance is not None, self.sink)
        elif new_len > self.prompt_len:
            pad = new_len - self.prompt_len
            self.slots = self.slots.replace(prompt_BxL=jnp.pad(self.slots.prompt_BxL, ((0, 0), (0, pad))))
            self.prompt_len = new_len

    @property
    def busy(self) -> bool:
        """Pieces are queued or in flight."""
        return bool(self.pending or self._waiting or self._in_flight)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        while self.busy:
            yield from self.step()

    def step(self) -> list[tuple[int, np.ndarray]]:
        """One chunk of the loop: the pieces that finished in it, in the order they finished."""
        in_flight = self._in_flight
        while self._waiting and len(self.pending) < self.queue_size:
            self.pending.append(heapq.heappop(self._waiting)[-1])
        longest = max((e.prompt.size for e in self.pending), default=1)
        if self.slots is None or longest > self.prompt_len:
            self._grow_prompts(longest)
        queue = self._queue()
        offered = list(self.pending)[: self.queue_size]
        for e in offered:
            if e.piece not in in_flight:  # a re-prefilled window goes on with the events so far
                in_flight[e.piece] = [self._prompts[e.piece]]
                self._entries[e.piece] = e
        self.slots, chunk = run_chunk(self.graphdef, self.params, self.slots, queue, self.settings, self.tables,
                                      self.guidance, steps=self.chunk_steps, reprefill=self.reprefill)
        chunk, taken = jax.device_get((chunk, self.slots.taken))
        for _ in range(int(taken)):
            self.pending.popleft()
        self.slots = self.slots.replace(taken=jnp.zeros((), jnp.int32))
        steps = int(chunk.steps)
        token_KxB, piece_KxB = chunk.token_KxB[:steps], chunk.piece_KxB[:steps]
        emitted = piece_KxB >= 0
        events = int(emitted.sum())
        self.events += events
        self.slot_steps += steps * self.batch
        if self.pending or self._waiting:  # the queue never ran dry in this chunk: what a long corpus sees throughout
            self.steady_events += events
            self.steady_slot_steps += steps * self.batch
        for b in range(self.batch):
            col = emitted[:, b]
            if not col.any():
                continue
            pieces_N, tokens_N = piece_KxB[col, b], token_KxB[col, b]
            cuts = np.flatnonzero(np.diff(pieces_N)) + 1
            for part_pieces, part_tokens in zip(np.split(pieces_N, cuts), np.split(tokens_N, cuts)):
                in_flight[int(part_pieces[0])].append(part_tokens)
        paused_KxB = chunk.paused_KxB[:steps]
        # Full windows go first in the queue, in the order they filled.
        for piece in paused_KxB[paused_KxB >= 0].tolist()[::-1]:
            row = np.concatenate(in_flight[piece]).astype(np.int32)
            self.pending.appendleft(self._next_window(self._entries[piece], row))
        finished_KxB = chunk.finished_KxB[:steps]
        done = []
        for piece in finished_KxB[finished_KxB >= 0].tolist():  # step order: the order they finished
            self._entries.pop(piece, None)
            self._prompts.pop(piece, None)
            done.append((piece, np.concatenate(in_flight.pop(piece)).astype(np.int32)))
        return done


def generate_tokens(model: GPT, vocab: Vocabulary, prompts: Sequence[np.ndarray], **kwargs) -> list[np.ndarray]:
    """`mgpt.sample.sampler.generate_tokens` (same arguments, same checks) through a rolling cache
    under continuous batching: `batch_size` slots, each taking the next prompt as its piece ends.

    Infilling, hard limits and controls are not in this sampler yet: with any of them the rows
    go through the windowed sampler, as `generate_tokens` there would draw them.
    """
    job = sampler_lib.prepare(model, vocab, prompts, **kwargs)
    if job.gaps is not None or job.hard_limits is not None or job.controls is not None:
        return sampler_lib.windowed(job)
    sampler = ContinuousSampler(model, vocab, batch_size=job.batch_size, settings=job.settings, tables=job.tables,
                                guidance=job.guidance)
    for i, (prompt, seed) in enumerate(zip(job.prompts, job.seeds)):
        sampler.add(i, prompt, int(seed), max_events=job.max_events, max_steps=job.max_steps,
                    max_note_steps=int(job.max_note_steps[i]))
    rows = dict(sampler)
    return [rows[i] for i in range(len(job.prompts))]
