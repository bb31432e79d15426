"""One musician's live event stream: what was played, by whom, and the model's KV cache over it.

The stream is the same event sequence the model was trained on (NOTE_ON, NOTE_OFF, TIME_SHIFT,
VELOCITY after a STYLE token), written as the music happens: step 0 is the clock's origin, a
TIME_SHIFT is time passing, so an event's place in the stream is its time. The user's notes
are appended when they arrive, after a TIME_SHIFT for the time since the stream's end, and fed
to the model together (what arrived in one turn of the session: one jitted cached forward of the
new tokens, or the first part of the model's next draw), so a hand-over never has a prompt to
prefill. The model's events are drawn by `mgpt.sample.choose_event`, the rule `mgpt.generate`
samples every event with (masks of what sounds, the released mass, top-p, the note-length guard,
style guidance with an unconditional twin row in the same cache), several in one jitted loop
when the lookahead needs them. The window slides to what the sampler's next window holds
(`mgpt.sample.window_prompt`: STYLE, the carried state, the latest events), but the events it
keeps keep their keys and values, moved in the cache (`Stream._keep`); only the carried state is
fed (and the last kept token again, for the next logits). Teacher-forced through the stream, that
reads held-out pieces as well as re-prefilling (benchmarks/bench_context.py, docs/live.md) at half a
slide's cost.

The model plays ahead of the clock by `lookahead_ms` (drawn again once less than REFILL of it is
left) and each event leaves with the time it is meant to sound. When the user plays at time t
while the model has events after t: answering, the stream is rewound to t (the KV cache is
positional: rewinding is moving the cursor) and the client is told to drop them (`retract`);
accompanying, they stay (they have been sent), the user's events go in between at t and the
model's are re-fed behind them. Either way the model's
next events are conditioned on what the user played.

Modes:
- continue (call and response): the model answers once the user has been silent `silence_ms`
  with every key up, or at once on the hand-over pedal (a CC); its answer lasts `answer_seconds`
  and ends with its notes released. The answer's first events are drawn while the user is
  silent (speculatively: a note played before the hand-over rewinds them), so the first NOTE_ON
  can leave as soon as the silence is over.
- accompany: the model plays along while the user plays, and `answer_seconds` after.
- infill: a stretch [S, E) of the take is redrawn by `mgpt.generate.Run.infill_rows` (the
  fill-in-the-middle sampler) with what follows it as the suffix.

Times on this object are seconds of the caller's clock; nothing here reads a clock or sleeps.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgpt.sample import run as generate
from mgpt.sample import sampler as sample
from mgpt.errors import UserError

MODES = ("continue", "accompany")
# who wrote an event: the player, the model, the clock, the controls (tokens at a segment's opening)
USER, MODEL, TIME, CONTROL = "user", "model", "time", "control"
# A key held this long with nothing else played counts as stuck (a lost NOTE_OFF), not as playing.
STUCK_KEY_SECONDS = 8.0
# Accompanying, the model's events begin this far ahead of the clock: drawing and sending one takes
# a few ms (10 to 35 ms for the demo model's draw call on a 2-core machine at load 9), and an event
# that arrives after its time is an under-run.
SEND_MARGIN_SECONDS = 0.05
# What a slide of the window does with the events it keeps (`Stream._keep`): 'keep' moves their keys
# and values in the cache, 'reprefill' computes them again in the new window (mgpt.generate's default).
SLIDES = ("keep", "reprefill")
HISTORY = 4096  # events read back when the window slides (notes held longer than that are forgotten)
# The model's events are drawn up to lookahead_ms ahead of the clock, then drawn again once less than
# this share of it is left (at least 2 send margins): fewer, longer draws, and fewer of the events
# drawn ahead are fed again behind a note the player strikes before them (docs/live.md has the
# real-time factor with and without it).
REFILL = 0.5


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a musician can change while playing; each applies from the model's next event."""

    mode: str = "continue"
    style: str = "unconditional"
    temperature: float = 0.9
    top_p: float = 0.95
    guidance: float = 1.0
    answer_seconds: float = 4.0  # an answer's length; in accompany, how long it plays on after you stop
    silence_ms: float = 600.0  # continue mode: silence that hands over to the model
    pedal_cc: int = 67  # continue mode: this CC pressed (value >= 64) hands over at once (67: soft pedal)
    lookahead_ms: float = 500.0  # how far ahead of the clock the model's events are drawn and sent
    seed: int = 0
    # Attribute controls, as mgpt.generate's --controls without times ("density=6,mode=minor"; a
    # model trained with control tokens): each segment that opens after a change is marked with them.
    controls: str = ""

    def updated(self, changes: dict, styles: list[str], vocab=None) -> "Settings":
        """A copy with `changes` applied, or a UserError naming the first bad one. `vocab` checks
        controls against the model's (without it they are not checked)."""
        out = {}
        for key, value in changes.items():
            if key == "controls":
                if not isinstance(value, str):
                    raise UserError(f"controls={value!r}: must be text such as 'density=6,mode=minor'")
                if ":" in value or ";" in value:
                    raise UserError(f"controls={value!r}: live controls take no times; they apply from the next "
                                    "segment")
                if vocab is not None:
                    control_levels(vocab, value)
            elif key == "mode":
                if value not in MODES:
                    raise UserError(f"mode={value!r}: not a mode; use one of {', '.join(MODES)}")
            elif key == "style":
                if value not in styles:
                    raise UserError(f"style={value!r}: not a style of this model; known: {', '.join(styles)}")
            elif key in RANGES:
                lo, hi = RANGES[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                    raise UserError(f"{key}={value!r}: must be a number in [{lo:g}, {hi:g}]")
                value = int(value) if isinstance(lo, int) and isinstance(hi, int) else float(value)
            else:
                raise UserError(f"{key!r}: not a setting; settings: mode, style, controls, {', '.join(RANGES)}")
            out[key] = value
        return dataclasses.replace(self, **out)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# (low, high) of each numeric setting: one line names a value outside it.
RANGES = {"temperature": (0.05, 3.0), "top_p": (0.05, 1.0), "guidance": (0.0, 5.0),
          "answer_seconds": (0.5, 60.0), "silence_ms": (100.0, 5000.0), "pedal_cc": (0, 127),
          "lookahead_ms": (50.0, 3000.0), "seed": (0, 2**31 - 1)}


def control_levels(vocab, text: str) -> list[int]:
    """The control tokens a live `controls` setting writes at each segment's opening ([] for none);
    UserError, one line, for a bad one or a model without controls (mgpt.sample.controls.parse)."""
    from data_prep import controls as data_controls
    from mgpt.sample import controls as controls_lib

    try:
        timeline = controls_lib.parse(vocab, text, flag="controls")
    except ValueError as e:
        raise UserError(str(e)) from None
    if timeline.empty:
        return []
    return data_controls.group(vocab, timeline.segment_levels(vocab, 1)[0])


@dataclasses.dataclass
class Note:
    """A note event leaving the stream: on/off, MIDI pitch and velocity, its time in seconds,
    the answer it belongs to, and the settings version it was drawn with."""

    on: bool
    pitch: int
    velocity: int
    time: float
    answer: int
    version: int


# One jitted call draws at most this many model events. More amortises the call's cost further, but
# a new note or setting waits for the call in progress (it is read between calls).
MAX_DRAW = 16
# An answer's first note is looked for this many events ahead, in one call (it may begin with rests).
FIRST_NOTE_EVENTS = 16
# Unfed tokens up to this many (the player's events, and the model's events re-fed behind them) go
# into the draw's own call; a longer run of them (a slide, an edit) is fed by a call of its own.
FUSED_FEED = 16


@flax.struct.dataclass
class _Drawing:
    """The draw loop's state: the cache, the logits of the next event, the rows' sampler state
    (`mgpt.sample.RowState`), the events drawn so far (tokens_K[:n], their TIME_SHIFT steps summed
    in `steps`), whether the last one drawn was refused (`ended`: EOS, or past the answer's end), and
    whether drawing stops (`stop`: refused, or the NOTE_ON asked for)."""

    cache: list
    logits_RxV: jax.Array
    rows: sample.RowState
    tokens_K: jax.Array
    n: jax.Array
    steps: jax.Array
    ended: jax.Array
    heard_RxP: jax.Array | None  # a model with sounding_pitches: the notes the rows have heard
    stop: jax.Array


@functools.lru_cache(maxsize=4)
def _programs(graphdef, treedef):
    """The stream's jitted calls for one model structure: (feed, draw, slide).

    graphdef and the parameters' tree structure are closed over, so a call neither hashes an nnx
    graphdef nor flattens an nnx State (together a fifth of a dense-playing profile when they were
    per call); the parameters themselves are arguments, a flat list of arrays.
    """

    def merge(leaves):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))

    def feed_chunk(model, cache, tokens_RxT, start, last, heard_RxP=None):
        positions_RxT = jnp.broadcast_to(start + jnp.arange(tokens_RxT.shape[1], dtype=jnp.int32), tokens_RxT.shape)
        logits_RxTxV, cache = model.decode(tokens_RxT, positions_RxT, cache, heard_RxP)
        return logits_RxTxV[:, last], cache

    @functools.partial(jax.jit, donate_argnames=("cache",))
    def feed(leaves, cache, tokens_RxT, start, last, heard_RxP=None):
        """Cached forward of T new tokens per row (right-padded) from position `start`; the logits
        after token `last`. heard_RxP: the notes heard before them (a model with sounding_pitches)."""
        return feed_chunk(merge(leaves), cache, tokens_RxT, start, last, heard_RxP)

    @functools.partial(jax.jit, static_argnames=("guided",), donate_argnames=("cache",))
    def draw(leaves, cache, chunk, logits_RxV, rows, limits, settings, tables, guidance, key, plan_6, guided,
             heard_RxP=None):
        """Feed `chunk` (None, or feed's (tokens_RxT, start, last)), then draw events one by one with
        the sampler's rule (`mgpt.sample.choose_event`, `track_notes`), each fed to the cache behind
        the last, until one of plan_6's limits. plan_6 (int32): [position of the first drawn event,
        the random counter of the first (event n uses fold_in(key, counter + n)), events at most,
        TIME_SHIFT steps to the horizon (drawing stops once they are reached), steps to the answer's
        end (an event past it, or EOS, is refused and ends the answer), stop after a NOTE_ON (0/1)].

        R = 2 model rows: the stream, and its twin under STYLE:unknown (style guidance; also, XLA:CPU
        runs a 2-row cache faster than a 1-row one, see mgpt.sample). Returns (tokens_K, n, ended,
        cache, the logits after the last kept event, the rows' state after it). heard_RxP: the notes
        heard before the chunk (or the first drawn event), for a model with sounding_pitches.
        """
        model = merge(leaves)
        pitches = model.cfg.sounding_pitches
        if chunk is not None:
            logits_RxV, cache = feed_chunk(model, cache, *chunk, heard_RxP)
            if pitches:  # the chunk's padding is PAD, which changes nothing
                heard_RxP = sample.heard_counts(chunk[0], pitches, heard_RxP)[:, -1]
        position, counter, most, horizon, answer_end, until_on = (plan_6[i] for i in range(6))
        num_pitches = rows.open_BxP.shape[1]

        def body(d: _Drawing) -> _Drawing:
            logits_BxV = (sample.guided_logits(d.logits_RxV, guidance) if guided
                          else d.logits_RxV[:1].astype(jnp.float32))
            key_1 = jax.random.fold_in(key, counter + d.n)[None]
            token_B = sample.choose_event(logits_BxV, d.rows, limits, settings, tables, key_1)
            token, shift = token_B[0], tables["shift_steps_V"][token_B[0]]
            refused = (token == tables["eos_id"]) | (d.steps + shift > answer_end)
            kept = ~refused
            logits_Rx1xV, cache = model.decode(jnp.stack([token, token])[:, None],
                                               jnp.full((2, 1), position + d.n, jnp.int32), d.cache, d.heard_RxP)
            heard_RxP = d.heard_RxP
            if pitches:
                heard_RxP = jnp.where(kept, sample.heard_counts(jnp.stack([token, token])[:, None], pitches, heard_RxP)[:, 0],
                                      heard_RxP)
            open_BxP, onset_BxP = sample.track_notes(d.rows, token_B, kept[None], tables)
            r = d.rows
            rows = r.replace(events_B=r.events_B + kept, steps_B=r.steps_B + jnp.where(kept, shift, 0),
                             open_BxP=open_BxP, onset_BxP=onset_BxP)
            struck = until_on.astype(bool) & (tables["on_pitch_V"][token] < num_pitches)
            return _Drawing(cache=cache, logits_RxV=jnp.where(kept, logits_Rx1xV[:, 0], d.logits_RxV), rows=rows,
                            tokens_K=d.tokens_K.at[d.n].set(token), n=d.n + kept,
                            steps=d.steps + jnp.where(kept, shift, 0), ended=refused, stop=refused | struck,
                            heard_RxP=heard_RxP)

        def more(d: _Drawing):
            return ~d.stop & (d.n < most) & (d.steps < horizon)

        zero = jnp.zeros((), jnp.int32)
        no = jnp.zeros((), bool)
        d = _Drawing(cache=cache, logits_RxV=logits_RxV.astype(jnp.float32), rows=rows,
                     tokens_K=jnp.zeros(max(MAX_DRAW, FIRST_NOTE_EVENTS), jnp.int32), n=zero, steps=zero,
                     ended=no, stop=no, heard_RxP=heard_RxP)
        d = jax.lax.while_loop(more, body, d)
        return d.tokens_K, d.n, d.ended, d.cache, d.logits_RxV, d.rows

    @functools.partial(jax.jit, donate_argnames=("cache",))
    def slide(leaves, cache, src, dst, count, tokens_RxT=None, heard_RxP=None):
        """The window slid without computing its kept events again: their keys and values move from
        slots src.. to dst.. (`GPT.move_cache`), and tokens_RxT (the carried state that opens the new
        window, right-padded, or None) are fed at position 1, behind the STYLE token."""
        model = merge(leaves)
        fed = cache
        if tokens_RxT is not None:
            fed = feed_chunk(model, cache, tokens_RxT, 1, 0, heard_RxP)[1]
        return model.move_cache(cache, src, dst, count, into=fed)

    return feed, draw, slide


@functools.partial(jax.jit, static_argnames=("pitches",))
def _heard_at(tokens_1xW, n, pitches: int):
    """`heard_counts` after the first n tokens (zeros for n = 0), for the stream's two rows: 2xP."""
    count_P = jnp.where(n > 0, sample.heard_counts(tokens_1xW, pitches)[0, jnp.maximum(n - 1, 0)], 0)
    return jnp.broadcast_to(count_P, (2, pitches))


def _sets_a_note(v, events) -> bool:
    """Whether a VELOCITY put back before `events` ((id, who, answer), in order) still sets the
    loudness of a note: no other VELOCITY comes first, before their next NOTE_ON or their end (the
    model's next notes are then drawn at it)."""
    for i, _, _ in events:
        if v.velocity_offset <= i < v.style_offset:
            return False
        if v.note_on_offset <= i < v.note_off_offset:
            return True
    return True


def _bucket(n: int, fused: bool) -> int:
    """The length a chunk of n tokens is padded to: few shapes to compile, little padding to run.
    Powers of 4 for a chunk a draw feeds (up to FUSED_FEED: a draw compiles slowly); for a feed of
    its own (a long chunk costs its compute: the padding matters more), powers of 2, but multiples of
    32 from 32 to 256 tokens (the demo model's whole window; past it, so many shapes would make the
    warm-up of a long-context model slow)."""
    if not fused and 32 < n <= 256:
        return 32 * math.ceil(n / 32)
    return 1 << ((2 if fused else 1) * max(0, math.ceil(math.log(max(n, 1), 4 if fused else 2))))


class Stream:
    """The stream of one client (see the module docstring). `run`: a loaded `mgpt.generate.Run`."""

    def __init__(self, run, settings: Settings | None = None, origin: float = 0.0, slide: str = "keep"):
        if slide not in SLIDES:
            raise ValueError(f"slide={slide!r}: one of {', '.join(SLIDES)}")
        self.slide = slide
        self.run = run
        self.vocab = run.vocab
        graphdef, params = nnx.split(run.model)
        self._leaves, treedef = jax.tree.flatten(params)
        self._feed_call, self._draw_call, self._slide_call = _programs(graphdef, treedef)
        self.window = run.model.cfg.max_len
        self._segment = 0  # steps per control segment (a model trained with control tokens)
        if self.vocab.controls is not None:
            from data_prep import controls as data_controls

            self._segment = data_controls.segment_steps(self.vocab)
        self.tables = sample.token_tables(self.vocab)
        self.styles = [generate.UNCONDITIONAL, *run.styles]
        self.settings = settings or Settings(guidance=run.default_guidance)
        self.version = 0
        self._settings_arrays()
        self.clear(origin)

    # ------------------------------------------------------------------ state
    def clear(self, origin: float) -> None:
        """Forget everything: the clock's origin is `origin` seconds."""
        self.origin = origin
        self.events: list[int] = []  # the whole take, without STYLE
        self.who: list[str] = []
        self.answer_of: list[int] = []  # per event: the answer that wrote it (0 = none)
        self.undo_log: list = []  # per event: how to undo what it did (see _pop)
        self.answers = 0
        self.answer = 0  # the answer being played (0 = listening)
        self.answer_end_step = 0
        self.end_step = 0  # the stream's time, in steps from origin
        self.velocity = None  # VELOCITY id in force
        self.sounding: dict[int, list[str]] = collections.defaultdict(list)  # pitch -> owners, oldest first
        self.last_user = None  # time (s) of the user's latest event; None once an answer takes over
        self.keys_down: set[int] = set()  # the player's keys now down
        self.held: list = []  # a prepared answer's first events, sent at the hand-over
        self.prepared_at = None  # (events before it, hand-over step, settings version)
        self.sampled = 0  # events drawn since clear: the random key's counter
        self.cache = None  # a fresh one (and none left donated by a call that failed)
        self._rebuild()

    def _settings_arrays(self) -> None:
        s = self.settings
        self._sampling = sample.sampling_settings(temperature=s.temperature, top_p=s.top_p)
        self._guidance = jnp.asarray(s.guidance, jnp.float32)
        self._key = jax.random.key(s.seed)
        self._style_id = generate.style_token(self.vocab, s.style)
        limit = self.run.max_note_seconds(np.asarray([self._style_id]), generate.Sampling())
        steps = max(1, round(limit * self.vocab.steps_per_second)) if limit > 0 else 0
        self._controls = control_levels(self.vocab, s.controls) if s.controls else []
        self._limits = sample.RowLimits(max_events_B=jnp.full(1, 2**31 - 1, jnp.int32),
                                        max_steps_B=jnp.full(1, 2**31 - 1, jnp.int32),
                                        max_note_steps_B=jnp.full(1, steps, jnp.int32))

    def update(self, changes: dict) -> None:
        """Apply settings (UserError on a bad one, nothing changed). A new style re-reads the window."""
        new = self.settings.updated(changes, self.styles, self.vocab)
        restyle = new.style != self.settings.style
        self._drop_prepared()
        self.settings = new
        self.version += 1
        self._settings_arrays()
        if restyle:
            self._rebuild()

    def step_of(self, t: float) -> int:
        return int(math.floor((t - self.origin) * self.vocab.steps_per_second + 1e-6))

    def time_of(self, step: int) -> float:
        return self.origin + step / self.vocab.steps_per_second

    # ------------------------------------------------------------------ the take and the window
    def _rebuild(self, pending: int | None = None) -> None:
        """Re-read the window from the take (a slide, a new style, an undo, an infill).

        Only the take's latest HISTORY events are read for the state the window carries, so that a
        long session's slides cost the same as a short one's. `pending`, for a slide: how many of the
        take's latest events the old window did not have yet; with slide 'keep' the events both
        windows hold keep their keys and values (`_keep`)."""
        if pending is not None:
            old, old_events, old_fed = self.ctx, self.ctx_events, self._fed
        events = self.events[-HISTORY:]
        lead = []
        if self._segment and len(self.events) > HISTORY:
            # The controls in force are found by the segment grid, counted from the row's start: time
            # up to where the history begins keeps that grid (it is never in the window itself).
            from data_prep import controls as data_controls
            from mgpt.sample.fim import gap_tokens

            shifts = int(data_controls.steps_after(self.vocab, events)[-1])
            lead = gap_tokens(self.vocab, (self.end_step - shifts) % self._segment)
        row = [self._style_id, *lead, *events]
        ctx = sample.window_prompt(row, self.window, self.vocab)
        # How many of the take's latest events the window holds (before them: STYLE and the state
        # carried at the first of them).
        kept = len(ctx) - 1
        while kept > 0 and (ctx[len(ctx) - kept:] != row[len(row) - kept:]
                            or self.vocab.carried_state(row, len(row) - kept, limit=self.window // 4)
                            != ctx[1:len(ctx) - kept]):
            kept -= 1
        self.ctx = [int(i) for i in ctx]
        self.ctx_events = kept
        if self.cache is None:
            self.cache = self.run.model.init_cache(2, self.window)
        # Otherwise the cache is written over from slot 0 (or from the carried state, `_keep`): what
        # it held past the new window's end is hidden by causality, as any slot past a row's position
        # is (mgpt.model.gpt).
        self._fed = 0
        if pending is not None and self.slide == "keep":
            self._keep(old, old_events, old_fed, pending)
        self._flush()

    def _keep(self, old: list[int], old_events: int, old_fed: int, pending: int) -> None:
        """A slide that keeps what the cache computed: the events the old window held and had fed
        (its `old_events` last tokens were the take's events up to `pending` before its end) move
        to their places in the new one, with their keys and values (`GPT.move_cache`), behind the
        carried state, which is fed; the rest is fed as usual. Each kept key was computed when its
        event saw the events before it in the old window, as in a rolling cache."""
        n = len(self.events)
        first = n - self.ctx_events  # the take's index of the new window's first event
        if first < n - pending - old_events:
            return  # the new window reaches back further than the old one held
        src = len(old) - (n - pending - first)
        dst = len(self.ctx) - self.ctx_events
        count = old_fed - src
        if count <= 0 or dst > src or old[src:old_fed] != self.ctx[dst:dst + count]:
            return
        carried = self.ctx[1:dst]
        tokens_RxT = None
        if carried:
            tokens_RxT = np.zeros((2, _bucket(len(carried), False)), np.int32)
            tokens_RxT[:, :len(carried)] = carried
        self.cache = self._slide_call(self._leaves, self.cache, np.int32(src), np.int32(dst), np.int32(count),
                                      tokens_RxT, self._heard(1))
        # The last kept token is fed again, so that the next event is drawn from logits read in the new
        # window (one token more in the next call), as after a re-prefill.
        self._fed = dst + count - 1
        self.rows = None

    def _chunk(self, fused: bool = False):
        """The window's tokens the cache has not seen, as a feed's (tokens_RxT, start, last) padded
        to a bucket (row 1 is the STYLE:unknown twin); None when there are none, or when `fused`
        (for a draw's own call) and there are more than FUSED_FEED."""
        new = self.ctx[self._fed:]
        if not new or (fused and len(new) > FUSED_FEED):
            return None
        t = _bucket(len(new), fused)
        tokens_RxT = np.zeros((2, t), np.int32)
        tokens_RxT[:, :len(new)] = new
        if self._fed == 0:
            tokens_RxT[1, 0] = self.vocab.unknown_style_id
        return tokens_RxT, np.int32(self._fed), np.int32(len(new) - 1)

    def _heard(self, n: int):
        """The notes the window's first n tokens leave sounding (`heard_counts`, the model's own rule),
        for both rows: a model with sounding_pitches; else None."""
        pitches = self.run.model.cfg.sounding_pitches
        if not pitches:
            return None
        tokens_1xW = np.zeros((1, self.window), np.int32)  # PAD past n counts nothing
        tokens_1xW[0, :n] = self.ctx[:n]
        return _heard_at(tokens_1xW, np.int32(n), pitches)

    def _flush(self) -> None:
        """Feed the window's tokens the cache has not seen, in one call. Edits only mark tokens
        unfed; a draw feeds them in its own call, and `advance` flushes what is left at its end
        (except while the model accompanies: its next draw does), so the events that arrive
        together are fed together."""
        chunk = self._chunk()
        if chunk is None:
            return
        self.logits, self.cache = self._feed_call(self._leaves, self.cache, *chunk, self._heard(self._fed))
        self._fed = len(self.ctx)
        self.rows = None  # recomputed from the window before the next draw

    def _push(self, token: int, who: str) -> str | None:
        """One event onto the take: the clock, the velocity in force and who holds each sounding
        note follow it. Returns whose note a NOTE_OFF ended (its own player's first, else the
        oldest), None for other events or a NOTE_OFF of a silent pitch."""
        v = self.vocab
        self.events.append(token)
        self.who.append(who)
        self.answer_of.append(self.answer if who == MODEL else 0)
        undo, ended = None, None
        if v.time_shift_offset <= token < v.velocity_offset:
            self.end_step += token - v.time_shift_offset + 1
        elif v.velocity_offset <= token < v.style_offset:
            undo, self.velocity = ("velocity", self.velocity), token
        elif v.note_on_offset <= token < v.note_off_offset:
            self.sounding[token - v.note_on_offset + v.min_pitch].append(who)
            undo = ("on",)
        elif v.note_off_offset <= token < v.time_shift_offset:
            owners = self.sounding[token - v.note_off_offset + v.min_pitch]
            if owners:
                k = owners.index(who) if who in owners else 0
                ended = owners.pop(k)
                undo = ("off", k, ended)
        self.undo_log.append(undo)
        return ended

    def _pop(self) -> None:
        """The take's last event off again (the inverse of `_push`)."""
        v = self.vocab
        token, undo = self.events.pop(), self.undo_log.pop()
        self.who.pop()
        self.answer_of.pop()
        if v.time_shift_offset <= token < v.velocity_offset:
            self.end_step -= token - v.time_shift_offset + 1
        elif undo and undo[0] == "velocity":
            self.velocity = undo[1]
        elif undo and undo[0] == "on":
            self.sounding[token - v.note_on_offset + v.min_pitch].pop()
        elif undo and undo[0] == "off":
            self.sounding[token - v.note_off_offset + v.min_pitch].insert(undo[1], undo[2])

    def _append(self, ids: list[int], who: str) -> list:
        """Events onto the take and the window (fed at the next _flush), with the control tokens due
        among them (`_controls_due`); whose notes their NOTE_OFFs ended."""
        ended, written = [], []
        for i in ids:
            written += self._controls_due(None)
            before = self.end_step
            ended.append(self._push(int(i), who))
            written += [int(i)] + self._controls_due(before)
        self._extend(written)
        return ended

    def _controls_due(self, before: int | None) -> list[int]:
        """The control tokens due now, pushed onto the take (the caller puts them on the window):
        with `before` None, the opening group of a take that is still empty; else the group after
        the event just pushed, if it moved the clock from `before` into a new segment. The data
        pipeline marks a piece's segments the same way (data_prep/controls.py). [] without controls."""
        if not self._controls:
            return []
        if before is None and self.events:
            return []
        if before is not None and before // self._segment == self.end_step // self._segment:
            return []
        for c in self._controls:
            self._push(c, CONTROL)
        return list(self._controls)

    def _extend(self, ids: list[int]) -> None:
        """The take's latest len(ids) events, just pushed, onto the window (it slides if they overflow it)."""
        if len(self.ctx) + len(ids) > self.window:
            self._rebuild(pending=len(ids))
        else:
            self.ctx += [int(i) for i in ids]
            self.ctx_events += len(ids)

    def _truncate(self, n: int) -> None:
        """Drop the take's events from index n on (the cache's cursor moves back with them; it is
        fed again with whatever is appended first, by the next draw or flush)."""
        drop = len(self.events) - n
        if drop <= 0:
            return
        for _ in range(drop):
            self._pop()
        if drop > self.ctx_events:
            self._rebuild()
            return
        del self.ctx[len(self.ctx) - drop:]
        self.ctx_events -= drop
        # The logits after the new last token: feed it again (same slot, same keys and values).
        self._fed = min(self._fed, len(self.ctx) - 1)

    def _replace_take(self, events: list[int], who: list[str], answer_of: list[int]) -> None:
        """A new take (undo, infill): replayed from an empty one, then the window re-read."""
        self.events, self.who, self.answer_of, self.undo_log = [], [], [], []
        self.end_step, self.velocity = 0, None
        self.sounding = collections.defaultdict(list)
        for token, w, a in zip(events, who, answer_of):
            self._push(int(token), w)
            self.answer_of[-1] = a
        self._rebuild()

    def _shift_to(self, step: int, who: str = TIME) -> None:
        if step > self.end_step:
            from mgpt.sample.fim import gap_tokens

            self._append(gap_tokens(self.vocab, step - self.end_step), who)

    # ------------------------------------------------------------------ input
    def user_note(self, on: bool, pitch: int, velocity: int, t: float) -> list:
        """A key the user pressed or released at time t (s). Returns what leaves at once: a
        ('retract', time) when model events after t were dropped, and the model's notes it ends."""
        v = self.vocab

        def tokens():
            if not v.min_pitch <= pitch <= v.max_pitch:
                return []  # played, but not heard by the model
            if on:
                vel_id = v.velocity_offset + int(v.velocity_to_bin(max(1, min(127, velocity)))) - 1
                return ([vel_id] if vel_id != self.velocity else []) + [v.note_on_offset + pitch - v.min_pitch]
            # A release of a note the model's stream already ended (its guard, or a NOTE_OFF of its own) is not heard.
            return [v.note_off_offset + pitch - v.min_pitch] if USER in self.sounding[pitch] else []

        out = self._play_at(t, tokens)
        (self.keys_down.add if on else self.keys_down.discard)(pitch)
        self.last_user = t
        return out

    def all_notes_off(self, t: float) -> list:
        """MIDI's panic (CC 123): every key the player holds is released now."""
        v = self.vocab
        out = self._play_at(t, lambda: [v.note_off_offset + p - v.min_pitch for p, owners in self.sounding.items()
                                        for w in owners if w == USER])
        self.keys_down.clear()
        return out

    def pedal(self, t: float) -> list:
        """The hand-over pedal: the model answers now (continue mode)."""
        out = self._play_at(t, list)
        if self.settings.mode == "continue" and self.answer == 0:
            self.keys_down.clear()
            out += self._start_answer(self.step_of(t))
            # As a prepared answer does: its first note is drawn now, however far ahead it falls.
            self._draw(out.append, max_events=FIRST_NOTE_EVENTS, until_note=True)
        return out

    def _play_at(self, t: float, tokens) -> list:
        """The player's events `tokens()` (made for the state at t) enter the stream at time t.

        What the model had drawn after t: accompanying, it stays (it has been sent) and the
        player's events go in between, at their time, and the model's events after them are fed
        again in one call behind them; answering (continue mode), it is dropped, the client told
        to drop it too (`retract`), and the answer ends. A prepared answer is dropped."""
        out = []
        self._drop_prepared()
        step = max(self.step_of(t), 0)
        v = self.vocab
        tail = []
        if step < self.end_step:
            # Lift off the events that end after `step`, from the end.
            n, at = len(self.events), self.end_step
            while n > 0 and at > step:
                i = self.events[n - 1]
                at -= i - v.time_shift_offset + 1 if v.time_shift_offset <= i < v.velocity_offset else 0
                n -= 1
            if self.answer and self.settings.mode == "accompany":
                tail = list(zip(self.events[n:], self.who[n:], self.answer_of[n:]))
            self._truncate(n)
            if not tail:
                out.append(("retract", self.time_of(self.end_step)))
        start = self.end_step
        velocity = self.velocity
        self._shift_to(step)
        ids = tokens()
        if ids:
            self._append(ids, USER)
        if tail:
            # The lifted shift spanned `step`: what is left of it after the player's events, then the rest.
            first, who, answer = tail[0]
            left = start + first - v.time_shift_offset + 1 - step
            from mgpt.sample.fim import gap_tokens

            back = [(i, who, answer) for i in gap_tokens(v, left)]
            if self.velocity != velocity and velocity is not None:  # the model's notes keep their loudness
                back.append((velocity, MODEL, answer))
            back += tail[1:]
            written = []
            for k, (i, w, a) in enumerate(back):
                if w == CONTROL:  # segments are marked again where they now open
                    continue
                if v.velocity_offset <= i < v.style_offset and (i == self.velocity
                                                                or not _sets_a_note(v, back[k + 1:])):
                    # A VELOCITY that changes nothing (the one in force, or another comes before the next
                    # NOTE_ON): put back behind each note the player strikes, they would pile up.
                    continue
                before = self.end_step
                self._push(int(i), w)
                self.answer_of[-1] = a
                written += [int(i)] + self._controls_due(before)
            self._extend(written)
        if self.answer and self.settings.mode == "continue":
            out += self._end_answer()
        return out

    # ------------------------------------------------------------------ the model plays
    def next_wake(self, now: float) -> float | None:
        """When `advance` next has work (seconds on the clock), None when only input can wake it."""
        s = self.settings
        if self.answer:
            return self.time_of(self.end_step) - self._refill_seconds()
        if self.last_user is None:
            return None
        if s.mode == "continue" and self._playing(now):
            return self.last_user + STUCK_KEY_SECONDS
        if s.mode == "continue" and self.prepared_at is not None and self.prepared_at[2] == self.version:
            return self.last_user + s.silence_ms / 1000
        return now

    def _refill_seconds(self) -> float:
        """How far ahead of the clock the model's events must still reach not to be drawn again yet (REFILL)."""
        lookahead = self.settings.lookahead_ms / 1000
        return min(lookahead, max(REFILL * lookahead, 2 * SEND_MARGIN_SECONDS))

    def _playing(self, now: float) -> bool:
        """A key is down, and has not been down so long with nothing else played that it is stuck."""
        return bool(self.keys_down) and now - self.last_user < STUCK_KEY_SECONDS

    def advance(self, now: float, emit, interrupted=lambda: False) -> None:
        """Do what is due at `now`: prepare or start an answer, draw the model's events up to
        now + lookahead, end an answer. `emit(item)` gets each Note (and ('answer', id, state)) as
        soon as it exists; `interrupted()` True stops drawing (new input is waiting)."""
        s = self.settings
        if not self.answer and self.last_user is not None:
            if s.mode == "accompany":
                self._start_answer(max(self.step_of(now), self.end_step), emit)
            elif not self._playing(now):
                handover = self.last_user + s.silence_ms / 1000
                if self.prepared_at is None or self.prepared_at[2] != self.version:
                    self._prepare(max(self.step_of(handover), self.end_step), interrupted)
                if now >= handover and self.prepared_at is not None:
                    self._release_prepared(emit)
        if not self.answer:
            self._flush()
            return
        horizon = self.step_of(now + s.lookahead_ms / 1000)
        if s.mode == "accompany" and self.last_user is not None:
            # Accompaniment plays on answer_seconds past the user's latest event.
            self.answer_end_step = self.step_of(self.last_user + s.answer_seconds)
            # After a rewind (or idling) the stream's end is the past: the model's next event is placed
            # SEND_MARGIN ahead of the clock, so that it can still leave before it is due.
            if self.end_step < self.step_of(now + SEND_MARGIN_SECONDS):
                self._shift_to(self.step_of(now + SEND_MARGIN_SECONDS))
        if self.end_step > self.step_of(now + self._refill_seconds()):
            horizon = self.end_step  # enough drawn ahead for now
        while self.answer and self.end_step < horizon and not interrupted():
            # An event due within 2 SEND_MARGINs leaves on its own, not after a batch drawn behind it.
            soon = self.end_step < self.step_of(now + 2 * SEND_MARGIN_SECONDS)
            self._draw(emit, horizon, max_events=1 if soon else MAX_DRAW)
        if not (self.answer and s.mode == "accompany"):
            # What arrived is fed now, in one call. Accompanying, it waits for the model's next draw
            # (once its lookahead runs below REFILL): what the player plays until then, and the model's
            # events re-fed behind it, go in together, rather than the tail once per player's note.
            self._flush()

    def _start_answer(self, step: int, emit=None) -> list:
        self.answers += 1
        self.answer = self.answers
        self._shift_to(step)
        self.answer_end_step = step + round(self.settings.answer_seconds * self.vocab.steps_per_second)
        if self.settings.mode == "continue":
            self.last_user = None
        item = ("answer", self.answer, "start")
        if emit:
            emit(item)
        return [item]

    def _prepare(self, handover_step: int, interrupted) -> None:
        """Draw the answer's first events before the hand-over, held until it (see the docstring)."""
        self._drop_prepared()
        n, last_user = len(self.events), self.last_user
        self._start_answer(handover_step)
        held: list = []
        if not interrupted():
            self._draw(held.append, max_events=FIRST_NOTE_EVENTS, until_note=True)
        self.held = held
        self.answer, self.answers, self.last_user = 0, self.answers - 1, last_user
        self.prepared_at = (n, handover_step, self.version)

    def _drop_prepared(self) -> None:
        if self.prepared_at is not None:
            n = self.prepared_at[0]
            self.prepared_at, self.held = None, []
            self._truncate(n)

    def _release_prepared(self, emit) -> None:
        """The hand-over: the prepared answer becomes the answer, and its first notes leave."""
        held, self.held, handover_step = self.held, [], self.prepared_at[1]
        self.prepared_at = None
        self.answers += 1
        self.answer = self.answers
        self.answer_end_step = handover_step + round(self.settings.answer_seconds * self.vocab.steps_per_second)
        self.last_user = None
        emit(("answer", self.answer, "start"))
        for item in held:
            emit(item)
            if not isinstance(item, Note):  # the model ended its answer before its first note
                self.answer = 0

    def _draw(self, emit, horizon: int | None = None, max_events: int = MAX_DRAW, until_note: bool = False) -> None:
        """Model events drawn in one jitted call (the window's unfed tokens fed first, in the same
        call): up to max_events, until the stream's end reaches `horizon` (a step; None: no limit),
        after the first NOTE_ON with until_note, or until the answer ends (EOS, or an event past its
        length). Each is put on the take and emitted if it is a note, in order, as the one-event
        draw did; the random key of the stream's n-th draw is fold_in(key(seed), n) whatever the
        calls."""
        v = self.vocab
        due = len(self._controls)  # room for a segment's control tokens after the events drawn
        horizon_asked = horizon
        if due and not self.events:  # a take the model opens: its first segment's tokens first
            self._extend(self._controls_due(None))
        if len(self.ctx) + 1 + due > self.window:
            self._rebuild(pending=0)  # the window slides
        if due:  # a draw stops at the next segment's opening, whose control tokens go in before more is drawn
            boundary = (self.end_step // self._segment + 1) * self._segment
            horizon = boundary if horizon is None else min(horizon, boundary)
        if len(self.ctx) - self._fed > FUSED_FEED:
            self._flush()
        chunk = self._chunk(fused=True)
        rows = self.rows
        if chunk is not None or rows is None:  # the sampler's state at the window's end (host arrays)
            rows = sample.RowState.start(v, [self.ctx], 1)
        most = min(max_events, self.window - len(self.ctx) - due)
        far = 2**31 - 1
        plan_6 = np.asarray([len(self.ctx), self.sampled, most,
                             far if horizon is None else horizon - self.end_step,
                             self.answer_end_step - self.end_step, until_note], np.int32)
        tokens_K, n, ended, self.cache, logits, rows = self._draw_call(
            self._leaves, self.cache, chunk, self.logits, rows, self._limits, self._sampling, self.tables,
            self._guidance, self._key, plan_6, guided=self.settings.guidance != 1, heard_RxP=self._heard(self._fed))
        tokens_K, n, ended = jax.device_get((tokens_K, n, ended))  # one wait for the whole call
        self.logits, self.rows = logits, rows
        self.sampled += int(n) + bool(ended)
        # The cache holds the chunk and the kept events; a refused event's slot is past the cursor.
        self._fed = len(self.ctx) + int(n)
        for token in tokens_K[:n].tolist():
            before = self.end_step
            ended_by = self._push(token, MODEL)
            self.ctx.append(token)
            self.ctx_events += 1
            opening = self._controls_due(before)  # fed by the next call
            self.ctx += opening
            self.ctx_events += len(opening)
            t = self.time_of(self.end_step)
            if v.note_on_offset <= token < v.note_off_offset:
                emit(Note(True, token - v.note_on_offset + v.min_pitch, self._midi_velocity(), t, self.answer,
                          self.version))
            elif ended_by == MODEL:  # a NOTE_OFF that ends a note the user holds is the model's business only
                emit(Note(False, token - v.note_off_offset + v.min_pitch, 0, t, self.answer, self.version))
        if ended:
            for item in self._end_answer():
                emit(item)
        elif (due and until_note and 0 < int(n) < max_events and self.answer_end_step > self.end_step
              and not any(v.note_on_offset <= t < v.note_off_offset for t in tokens_K[:n].tolist())
              and (horizon_asked is None or self.end_step < horizon_asked)):
            # Stopped at a segment's opening before the note it looks for: on, behind its control tokens.
            self._draw(emit, horizon_asked, max_events - int(n), until_note)

    def _midi_velocity(self) -> int:
        if self.velocity is None:
            return 64
        return int(self.vocab.bin_to_velocity(self.velocity - self.vocab.velocity_offset + 1))

    def _end_answer(self) -> list:
        """The answer ends: the model's sounding notes are released now (in the stream too)."""
        v = self.vocab
        out = []
        t = self.time_of(self.end_step)
        offs = [v.note_off_offset + pitch - v.min_pitch for pitch, owners in self.sounding.items()
                for w in owners if w == MODEL]
        if offs:
            self._append(offs, MODEL)
            out += [Note(False, i - v.note_off_offset + v.min_pitch, 0, t, self.answer, self.version) for i in offs]
        out.append(("answer", self.answer, "end"))
        self.answer = 0
        if self.settings.mode == "accompany":
            self.last_user = None
        return out

    # ------------------------------------------------------------------ edits
    def undo(self) -> tuple[int, list]:
        """Take the latest answer's notes out of the stream: (its id, 0 when there is none; what
        leaves now: the end of that answer if it is still playing)."""
        answered = [a for a in self.answer_of if a]
        if not answered:
            return 0, []
        target = max(answered)
        out = self._end_answer() if self.answer == target else []
        self._drop_prepared()
        v = self.vocab
        keep = [k for k, (i, a) in enumerate(zip(self.events, self.answer_of))
                if not (a == target and v.note_on_offset <= i < v.time_shift_offset)]
        self._replace_take([self.events[k] for k in keep], [self.who[k] for k in keep],
                           [0 if self.answer_of[k] == target else self.answer_of[k] for k in keep])
        return target, out

    def take(self) -> list[int]:
        """The take's events as played so far (without a prepared answer that has not begun)."""
        return self.events[:self.prepared_at[0]] if self.prepared_at is not None else list(self.events)

    def take_notes(self, stretch: tuple[float, float] | None = None) -> list[dict]:
        """The take's notes: pitch, velocity, start and end (seconds on the clock), and who played
        it (a note beginning inside `stretch` is the model's, else the player's)."""
        notes = self.vocab.decode_notes(self.take())
        out = []
        for p, vel, a, b in zip(notes.pitch.tolist(), notes.velocity.tolist(), notes.start_s.tolist(),
                                notes.end_s.tolist()):
            who = MODEL if stretch and stretch[0] <= self.origin + a < stretch[1] else USER
            out.append({"pitch": p, "vel": vel, "start": self.origin + a, "end": self.origin + b, "who": who})
        return out

    def infill(self, start: float, end: float) -> None:
        """Redraw the take's stretch [start, end) (seconds on the clock) with the fill-in-the-middle
        sampler (`Run.infill_rows`); the rest of the take is kept."""
        from mgpt.sample import fim

        if not self.vocab.fim:
            raise UserError("infill: this model has no FIM tokens (train one with data.fim_rate > 0, "
                            "as configs/small.py does)")
        s, e = self.step_of(start), self.step_of(end)
        if not 0 <= s < e <= self.end_step:
            raise UserError(f"infill: the stretch {start - self.origin:.2f}-{end - self.origin:.2f} s is not inside "
                            f"the take (0-{self.end_step / self.vocab.steps_per_second:.2f} s)")
        if self.answer:
            self._end_answer()
        self._drop_prepared()
        ids = np.asarray(self.events, np.int32)
        gap = fim.Gap.cut(self.vocab, ids, s, e)
        try:
            fim.prompt(self.vocab, self._style_id, gap.prefix, gap, gap.steps, budget=self.window // 2)
        except ValueError:
            raise UserError(f"infill: a {(e - s) / self.vocab.steps_per_second:g} s stretch is too long for this "
                            f"model's {self.window}-token context; select a shorter one") from None
        infill = generate.Infill("the live take", start - self.origin, end - self.origin, ids, gap)
        st = self.settings
        rows, _ = self.run.infill_rows(infill, [st.style], [st.seed + self.sampled],
                                       generate.Sampling(temperature=st.temperature, top_p=st.top_p,
                                                         guidance=st.guidance))
        self.sampled += 1
        joined = [int(i) for i in rows[0][1:]]
        n_prefix, n_suffix = len(gap.prefix), len(gap.suffix)
        n_middle = len(joined) - n_prefix - n_suffix
        # Outside the stretch every note now counts as the player's, inside it as the model's.
        self.answers += 1
        self._replace_take(joined, [USER] * n_prefix + [MODEL] * n_middle + [USER] * n_suffix,
                           [0] * n_prefix + [self.answers] * n_middle + [0] * n_suffix)
        self.last_user = None


def warm_up(run, guidance: tuple[float, ...] = (1.0, 1.5)) -> None:
    """Compile what a session runs (a feed of each chunk length bucket; a draw with each chunk it
    feeds in its own call, and with none; with and without guidance) before the first player
    arrives, so no one waits for XLA mid-phrase. It goes through a Stream's own calls: jit keys its
    cache on how its arguments were made, not only their shapes."""
    s = Stream(run)
    shift = s.vocab.time_shift_offset
    noop = lambda item: None  # noqa: E731
    sizes = sorted({min(_bucket(n, False), s.window - 2) for n in range(1, s.window - 1)})
    for g in guidance:
        s.update({"guidance": g})
        for n in sizes:  # every bucket of _chunk
            s.clear(0.0)
            s._replace_take([shift] * (n - 1), [TIME] * (n - 1), [0] * (n - 1))  # a window fed on a fresh cache
            s.clear(0.0)
            s._append([shift] * n, TIME)
            s._flush()  # a chunk fed behind others
            s.clear(0.0)
            s._append([shift] * n, TIME)
            s._draw(noop, max_events=1)  # a draw with that chunk (or, past FUSED_FEED, after its feed)
            s._draw(noop, max_events=1)  # a draw behind a draw: its rows and logits
    # A slide that keeps its events, behind a carried state of each length bucket (or none).
    zero = np.int32(0)
    for n in [0, *sorted({_bucket(n, False) for n in range(1, s.window // 4 + 1)})]:
        tokens_RxT = np.full((2, n), shift, np.int32) if n else None
        s.cache = s._slide_call(s._leaves, s.cache, zero, zero, zero, tokens_RxT, s._heard(1))
    # A phrase, its hand-over and answer, then accompaniment, as a player would go through them.
    for g in guidance:
        for mode in MODES:
            s.clear(0.0)
            s.update({"guidance": g, "mode": mode})
            t = 0.0
            for k in range(3):
                s.user_note(True, 60 + k, 80, t)
                s.advance(t, lambda item: None)
                s.user_note(False, 60 + k, 0, t + 0.1)
                s.advance(t + 0.1, lambda item: None)
                t += 0.2
            for _ in range(3):
                t += 0.5
                s.advance(t, lambda item: None)
