"""Fast batched sampling: one jitted prefill + `lax.while_loop` decode per window.

`sample_window` is the compiled core. For a batch of right-padded prompts it
prefills all of them in one cached forward pass, then decodes one event per row
per loop iteration until every row has finished (EOS or budget) or filled the
model's context. Parameters are arguments (never compiled-in constants), and
batch size and prompt length are padded to power-of-two buckets, so repeated
calls reuse the compiled function.

Sliding window (pieces longer than the context `W = cfg.max_len` events):
the KV cache holds one window of W positions. When a row fills it, that row
pauses until the other rows finish or fill theirs; then, on the host, each
unfinished row restarts from a fresh window made of its conditioning (STYLE)
token, the state carried at the cut (`Vocabulary.carried_state`: the VELOCITY in
force and a NOTE_ON for each note still sounding) and its most recent events,
W/2 tokens in all, re-prefilled at positions 0..W/2-1: exactly the shape of the
mid-piece crops the model was trained on (mgpt/train/data.py). A Python loop runs once
per window, never per token.

What sounds: the loop state (`_SamplingState`, whose `RowState` is what each row carries
from window to window; `RowLimits` holds its budgets) tracks per row and pitch the time
step at which a sounding note began (`onset_BxP`) and how many notes of it sound
(`open_BxP`; a unison struck twice is two), inside the jitted loop. A
NOTE_OFF of a silent pitch and a NOTE_ON of a sounding one are masked, so every
sampled event is possible. The note-length guard (`max_note_seconds` per row,
0 = off) emits a note's NOTE_OFF in place of the first event after it has sounded
that long.

Classifier-free style guidance (`guidance` G != 1): every row runs twice in the same
loop, as rows b and B + b of one 2B-row batch and KV cache: once with its prompt, once
with the same prompt whose STYLE token is STYLE:unknown (in every window). The event
is drawn from l_uncond + G * (l_cond - l_uncond) and fed to both. G = 1 is plain
sampling and runs the plain B-row function: it costs nothing extra. G = 0 samples
exactly as a STYLE:unknown prompt would. With controls the twin reads no control token
either (they are left out of its prompt, and it skips them in the loop), so guidance
strengthens the controls with the style; the rows then each keep their own position. With
a `steered_guidance` the twins of rows with a style read the controls instead, and those
rows are drawn at that G: guidance pulls towards the style within the controls
(`controls.steered_twins`). With `contrast_style` those twins read the controls and the row's
contrast style (a style named for it, or with 'auto' the other style its controls suggest most):
guidance pulls away from it.

Infilling (`gaps`, mgpt/sample/fim.py): a row fills the gap of a piece. Its prompt is the FIM
prompt (prefix, suffix and the time left, then the state where the middle goes on), and
the loop makes it end exactly at the gap's end: a TIME_SHIFT that would pass E becomes the
one that lands on E, EOS is masked, and notes the piece holds through the whole gap are
never released. A middle that fills its window goes on in a fresh FIM prompt whose prefix
now ends with the middle written so far.

Hard limits (`hard_limits`: pitch range, maximum polyphony, velocity range; mgpt/sample/limits.py)
join the mask, so they hold on every sampled event. Controls (`controls`, a model trained with
control tokens; mgpt/sample/controls.py): when the row's clock enters a new segment, the
tokens asked for are written in place of the next drawn events, as the data pipeline wrote
them in training; they count neither as events of the budget nor for the rng.

Randomness: row b's event number n (counting from the start of generation,
across windows) is drawn with `fold_in(key(seed_b), n)`, so a seed gives the
same piece whatever batch or position the row is in.

Budgets are per row: a count of new events, and/or seconds of music, measured as
the sum of TIME_SHIFT steps (10 ms by default); a TIME_SHIFT that would pass the
seconds budget ends the piece instead of being emitted, so pieces never run
longer than asked.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax
from flax import nnx

from data_prep.vocab import Vocabulary
from mgpt.model.gpt import GPT, heard_counts
from mgpt.sample import controls as controls_lib
from mgpt.sample import limits as limits_lib


# What a row reads past its first window (`generate_tokens`): re-prefilled windows, or a rolling cache.
CONTEXTS = ("reprefill", "rolling")
SILENT = np.iinfo(np.int32).max  # onset_BxP value of a pitch that is not sounding
RELEASE_SHARE = 1.0  # see release_mass


def token_tables(vocab: Vocabulary) -> dict[str, jax.Array]:
    """Per-token facts the decode loop needs, as arrays (so the vocabulary is not static).

    banned_V: tokens never sampled mid-piece (PAD and every STYLE token).
    shift_steps_V: how many time steps a token advances (0 for non-TIME_SHIFT).
    on_pitch_V / off_pitch_V: the pitch index (0..P-1) a NOTE_ON / NOTE_OFF acts on, P for
    any other token. note_off_P: the NOTE_OFF id of each pitch index. eos_id: end of piece.
    unknown_style_id: the unconditional rows' STYLE token under guidance.
    control_offset: the first control token (data_prep/controls.py); the vocabulary's size without them.
    """
    ids_V = np.arange(vocab.size)
    num_pitches = vocab.max_pitch - vocab.min_pitch + 1
    banned_V = (ids_V == vocab.pad_id) | (ids_V >= vocab.style_offset)
    is_shift_V = (ids_V >= vocab.time_shift_offset) & (ids_V < vocab.time_shift_offset + vocab.max_shift_steps)
    shift_steps_V = np.where(is_shift_V, ids_V - vocab.time_shift_offset + 1, 0)
    is_on_V = (ids_V >= vocab.note_on_offset) & (ids_V < vocab.note_off_offset)
    is_off_V = (ids_V >= vocab.note_off_offset) & (ids_V < vocab.time_shift_offset)
    return {
        "banned_V": jnp.asarray(banned_V),
        "shift_steps_V": jnp.asarray(shift_steps_V, jnp.int32),
        "on_pitch_V": jnp.asarray(np.where(is_on_V, ids_V - vocab.note_on_offset, num_pitches), jnp.int32),
        "off_pitch_V": jnp.asarray(np.where(is_off_V, ids_V - vocab.note_off_offset, num_pitches), jnp.int32),
        "note_off_P": jnp.asarray(vocab.note_off_offset + np.arange(num_pitches), jnp.int32),
        "eos_id": jnp.asarray(vocab.eos_id, jnp.int32),
        "time_shift_offset": jnp.asarray(vocab.time_shift_offset, jnp.int32),
        "unknown_style_id": jnp.asarray(vocab.unknown_style_id, jnp.int32),
        "is_velocity_V": jnp.asarray(vocab.is_velocity(ids_V)),
        "control_offset": jnp.asarray(vocab.control_offset if vocab.controls is not None else vocab.size, jnp.int32),
    }


def sounding_state(vocab: Vocabulary, prompt: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(open_P, onset_P) int32 at the end of `prompt`: how many notes of each pitch sound, and
    the onset of its latest one in time steps relative to the prompt's end (<= 0; SILENT when
    none sounds). The decode loop's start state."""
    num_pitches = vocab.max_pitch - vocab.min_pitch + 1
    open_P = np.zeros(num_pitches, np.int32)
    onset_P = np.full(num_pitches, SILENT, np.int64)
    state = vocab.sounding_at(np.asarray(prompt), len(prompt))
    open_P[state.pitch - vocab.min_pitch] = state.count
    onset_P[state.pitch - vocab.min_pitch] = state.onset_step - state.now
    return open_P, onset_P.astype(np.int32)


def sampling_settings(
    *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, greedy=False, release_share=RELEASE_SHARE
) -> dict[str, jax.Array]:
    """Validated sampling controls as arrays: changing them does not recompile."""
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (or use greedy), got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p must be in [0, 1), got {min_p}")
    if not 0 <= release_share <= 1:
        raise ValueError(f"release_share must be in [0, 1], got {release_share}")
    return {
        "temperature": jnp.asarray(temperature if temperature > 0 else 1.0, jnp.float32),
        "top_k": jnp.asarray(top_k, jnp.int32),
        "top_p": jnp.asarray(top_p, jnp.float32),
        "min_p": jnp.asarray(min_p, jnp.float32),
        "greedy": jnp.asarray(bool(greedy)),
        "release_share": jnp.asarray(float(release_share), jnp.float32),
    }


def _ordered_key(x):
    """float32 -> uint32 with the same order (the radix-sort trick), so thresholds bisect exactly."""
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def _largest_threshold(key_BxV, weight_BxV, target_B):
    """Per row, the largest T with sum(weight[key >= T]) >= target, in 32 exact bisection steps.

    A sort of the vocabulary costs several times more on CPU (XLA's sort is
    comparator-based); these 32 steps are fused elementwise passes.
    """
    b = key_BxV.shape[0]

    def body(_, lo_hi):
        lo_B, hi_B = lo_hi
        gap_B = hi_B - lo_B
        mid_B = lo_B + gap_B // 2 + gap_B % 2
        ok_B = jnp.sum(jnp.where(key_BxV >= mid_B[:, None], weight_BxV, 0), axis=-1) >= target_B
        return jnp.where(ok_B, mid_B, lo_B), jnp.where(ok_B, hi_B, mid_B - 1)

    init = (jnp.zeros(b, jnp.uint32), jnp.full(b, 0xFFFFFFFF, jnp.uint32))
    return jax.lax.fori_loop(0, 32, body, init, unroll=True)[0]


def filter_logits(logits_BxV, settings, banned_V):
    """Temperature and banned tokens, then min-p, top-k and top-p, composed.

    min-p keeps p >= min_p * p_max; top-k keeps the k most likely; top-p then
    keeps the shortest most-likely prefix whose (renormalised) mass reaches
    top_p. Ties at a threshold are kept. top_k=0, min_p=0 and top_p=1 are
    no-ops. Returns float32 logits with filtered-out tokens at -inf; the most
    likely allowed token always survives.
    """
    neg_inf = jnp.float32(-jnp.inf)
    x_BxV = jnp.where(banned_V, neg_inf, logits_BxV.astype(jnp.float32) / settings["temperature"])
    b, v = x_BxV.shape
    # min-p in log space: p >= min_p * p_max  <=>  x >= x_max + log(min_p).
    x_BxV = jnp.where(x_BxV >= jnp.max(x_BxV, -1, keepdims=True) + jnp.log(settings["min_p"]), x_BxV, neg_inf)

    def top_k(x_BxV):
        key_BxV = _ordered_key(x_BxV)
        kth_B = _largest_threshold(key_BxV, jnp.ones((b, v), jnp.int32), jnp.full(b, settings["top_k"]))
        return jnp.where(key_BxV >= kth_B[:, None], x_BxV, neg_inf)

    def top_p(x_BxV):
        key_BxV = _ordered_key(x_BxV)
        probs_BxV = jax.nn.softmax(x_BxV, axis=-1)
        threshold_B = _largest_threshold(key_BxV, probs_BxV, jnp.full(b, settings["top_p"]))
        return jnp.where(key_BxV >= threshold_B[:, None], x_BxV, neg_inf)

    keep = lambda x: x  # noqa: E731
    x_BxV = jax.lax.cond((settings["top_k"] > 0) & (settings["top_k"] < v), top_k, keep, x_BxV)
    return jax.lax.cond(settings["top_p"] < 1, top_p, keep, x_BxV)


def _choose(logits_BxV, keys_B, settings, banned):
    """One token per row: greedy, or inverse-CDF sampling of the filtered distribution.

    `banned` is V or BxV (True = never chosen).
    """
    filtered_BxV = filter_logits(logits_BxV, settings, banned)
    # One uniform per row instead of a Gumbel per token: the same distribution, less RNG work.
    u_B = jax.vmap(jax.random.uniform)(keys_B)
    probs_BxV = jax.nn.softmax(filtered_BxV, axis=-1)
    cdf_BxV = jnp.cumsum(probs_BxV, axis=-1)
    # The first token whose cdf passes u * total. Counting `cdf <= u` (not `<`) skips the
    # zero-mass prefix, so u == 0 (probability 2^-23 per draw) cannot pick a filtered
    # token such as PAD; rounding that puts u * total at the top is held to the last
    # token with mass.
    v = probs_BxV.shape[-1]
    last_B = v - 1 - jnp.argmax(jnp.flip(probs_BxV > 0, axis=-1), axis=-1)
    sampled_B = jnp.minimum(jnp.sum(cdf_BxV <= u_B[:, None] * cdf_BxV[:, -1:], axis=-1), last_B)
    return jnp.where(settings["greedy"], jnp.argmax(filtered_BxV, axis=-1), sampled_B).astype(jnp.int32)


def note_rules(open_BxP, onset_BxP, steps_B, tables, hold_BxP=None):
    """What the sounding notes allow: (banned_BxV, force_B, oldest_age_B).

    banned_BxV: a NOTE_OFF of a silent pitch, and a NOTE_ON of a sounding one (the data
    almost never strikes a held key: note-seq's sustain handling closes it first, so the
    model re-strikes with NOTE_OFF then NOTE_ON, which stays allowed; a unison held in
    two voices, which the data does have, comes only from the prompt and closes with two
    NOTE_OFFs). force_B: the NOTE_OFF of the longest-sounding note, oldest_age_B its age
    in steps (-1 when nothing sounds); see `apply_guard`. hold_BxP (infilling): notes per
    pitch that must sound on (they sound through the whole gap); they are never released,
    by the model or by the guard.
    """
    sounding_BxP = open_BxP > 0
    releasable_BxP = sounding_BxP if hold_BxP is None else open_BxP > hold_BxP
    sounding_BxP1 = jnp.pad(sounding_BxP, ((0, 0), (0, 1)))  # column P: "not a note token"
    releasable_BxP1 = jnp.pad(releasable_BxP, ((0, 0), (0, 1)))
    banned_on_BxV = sounding_BxP1[:, tables["on_pitch_V"]]
    is_off_V = tables["off_pitch_V"] < sounding_BxP.shape[1]
    banned_off_BxV = is_off_V & ~releasable_BxP1[:, tables["off_pitch_V"]]
    banned_BxV = tables["banned_V"] | banned_on_BxV | banned_off_BxV
    age_BxP = jnp.where(releasable_BxP, steps_B[:, None] - onset_BxP, -1)
    oldest_B = jnp.argmax(age_BxP, axis=-1)
    return banned_BxV, tables["note_off_P"][oldest_B], jnp.max(age_BxP, axis=-1)


def release_mass(logits_BxV, banned_BxV, tables, share):
    """Give `share` of the masked NOTE_OFFs' probability to the NOTE_OFFs of sounding pitches.

    A small model knows better *that* a note should end than *which* pitches still
    sound, and spreads its NOTE_OFF mass over silent pitches. Masking those alone hands
    that mass to every other event, mostly TIME_SHIFTs, and notes are held ever longer
    (an earlier demo model's Bach: 2.2x the real polyphony, 1.7x the note length, on
    the validation split). In log
    space the sounding NOTE_OFFs are raised by share * log(P(any NOTE_OFF) / P(sounding
    NOTE_OFFs)), keeping the model's own preferences among them. RELEASE_SHARE = 1: the
    model's whole probability of ending a note now goes to the notes that can end; it
    fit the demo model's Bach and Palestrina best of 0.5, 0.75 and 1 on the validation
    split (README, "Notes that hold together"). 0 is plain masking.
    """
    is_off_V = tables["off_pitch_V"] < tables["note_off_P"].shape[0]
    logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    neg_inf = jnp.float32(-jnp.inf)
    all_off_B = jax.nn.logsumexp(jnp.where(is_off_V, logp_BxV, neg_inf), axis=-1)
    valid_off_BxV = is_off_V & ~banned_BxV
    valid_off_B = jax.nn.logsumexp(jnp.where(valid_off_BxV, logp_BxV, neg_inf), axis=-1)
    boost_B = share * jnp.where(jnp.isfinite(valid_off_B), all_off_B - valid_off_B, 0.0)
    return jnp.where(valid_off_BxV, logp_BxV + boost_B[:, None], logp_BxV)


def apply_guard(token_B, force_B, oldest_age_B, max_note_steps_B):
    """The note-length guard: once the longest-sounding note has sounded max_note_steps, its
    NOTE_OFF is emitted in place of the next event. 0 = off.

    So a note ends at the first event at or past the limit: it may outlast the limit by the
    TIME_SHIFT that carried it there, and is never cut before it. An earlier guard also
    replaced the TIME_SHIFT that would carry a note past the limit, which ended notes a beat
    early, where the model had not chosen to change anything; the model then struck them
    again, and Bach pieces thickened to 5.7 notes per onset against 3.1 unguarded."""
    overdue_B = (max_note_steps_B > 0) & (oldest_age_B >= 0) & (oldest_age_B >= max_note_steps_B)
    return jnp.where(overdue_B, force_B, token_B)


def guided_logits(logits_RxV, guidance):
    """The next-event logits of B rows from the model's logits of R rows.

    Without guidance (None) R = B and they pass through. With guidance R = 2B, rows
    B + b being row b's unconditional twin: l_uncond + G * (l_cond - l_uncond), float32.
    """
    if guidance is None:
        return logits_RxV
    cond_BxV, uncond_BxV = jnp.split(logits_RxV.astype(jnp.float32), 2)
    return uncond_BxV + guidance * (cond_BxV - uncond_BxV)


@flax.struct.dataclass
class RowState:
    """What each row carries from one window to the next (B rows).

    events_B / steps_B: new events and their TIME_SHIFT steps so far, across windows.
    done_B: the row is finished (EOS or a budget), or is batch padding; it is left untouched.
    open_BxP: notes sounding per pitch; onset_BxP: the time step (on the steps_B clock) of the
    latest NOTE_ON of a sounding pitch, or SILENT. The sampler's own record of what sounds.
    velocity_B: the VELOCITY id in force, tracked only under hard limits (mgpt/sample/limits.py;
    None otherwise, which traces as before).
    """

    events_B: jax.Array
    steps_B: jax.Array
    done_B: jax.Array
    open_BxP: jax.Array
    onset_BxP: jax.Array
    velocity_B: jax.Array | None = None
    control_B: jax.Array | None = None  # with controls: the next forced token of the segment (mgpt/sample/controls.py)
    segment_notes_B: jax.Array | None = None  # the guards: notes struck in the row's current segment
    segment_pitch_sum_B: jax.Array | None = None  # the register guard: the sum of their pitch indices
    segment_pitch_time_Bx12: jax.Array | None = None  # the mode guard: steps each pitch class has sounded in it
    pitch_class_notes_Bx12: jax.Array | None = None  # and the row's NOTE_ONs per pitch class (its scale)
    segment_onsets_B: jax.Array | None = None  # the polyphony guard: its onsets before the current step
    segment_polyphony_sum_B: jax.Array | None = None  # and the notes sounding at each

    @classmethod
    def start(cls, vocab: Vocabulary, prompts: Sequence[Sequence[int]], batch: int) -> "RowState":
        """Nothing emitted yet; the notes sounding at each prompt's end (`sounding_state`).
        Rows from len(prompts) to batch are padding, done from the start. Host (numpy) arrays:
        `sample_window` takes them as they are."""
        num_pitches = vocab.max_pitch - vocab.min_pitch + 1
        open_BxP = np.zeros((batch, num_pitches), np.int32)
        onset_BxP = np.full((batch, num_pitches), SILENT, np.int32)
        for b, p in enumerate(prompts):
            open_BxP[b], onset_BxP[b] = sounding_state(vocab, p)
        return cls(events_B=np.zeros(batch, np.int32), steps_B=np.zeros(batch, np.int32),
                   done_B=np.arange(batch) >= len(prompts), open_BxP=open_BxP, onset_BxP=onset_BxP)


@flax.struct.dataclass
class RowLimits:
    """Each row's budgets and constraints, fixed for the whole piece (B rows).

    max_events_B / max_steps_B: budgets for RowState's events_B / steps_B totals.
    max_note_steps_B: the note-length guard (0 = off; `apply_guard`).
    fill_B / hold_BxP (infilling, mgpt/sample/fim.py; None for plain sampling, which then traces as
    before): a fill row must spend exactly max_steps_B: EOS is masked, a TIME_SHIFT that would
    pass it is cut to land on it, and the row is done as soon as its clock reaches it.
    hold_BxP: notes per pitch the row may not release (see `note_rules`).
    mask: hard limits (`mgpt.sample.limits.MaskLimits`; None = none, which traces as before).
    """

    max_events_B: jax.Array
    max_steps_B: jax.Array
    max_note_steps_B: jax.Array
    fill_B: jax.Array | None = None
    hold_BxP: jax.Array | None = None
    mask: limits_lib.MaskLimits | None = None
    controls: controls_lib.ControlPlan | None = None  # control tokens to force (None = none, traced as before)


@flax.struct.dataclass
class _SamplingState:
    """The decode loop's state: one window of tokens, its KV cache, the next logits, and the rows.

    Under guidance the cache holds 2B rows (see `guided_logits`); everything else B.
    """

    tokens_BxW: jax.Array
    cache: list
    logits_BxV: jax.Array
    end_B: jax.Array  # row b's window is tokens_BxW[b, :end_B[b]]
    rows: RowState
    heard_RxP: jax.Array | None = None  # a model with sounding_pitches: the notes its rows have heard (`heard_counts`)
    # Guidance with controls (`_twin_prompt`): the twins skip control tokens, so each has its own
    # end, and logits_BxV holds the rows' own logits while twin_logits_BxV holds their twins'.
    twin_end_B: jax.Array | None = None
    twin_logits_BxV: jax.Array | None = None


def choose_event(logits_BxV, rows: RowState, limits: RowLimits, settings, tables, keys_B):
    """The sampler's rule for one event per row, from the model's next-event logits: int32 token_B.

    What sounds masks the impossible events (`note_rules`), the masked NOTE_OFFs' mass goes to
    the sounding notes (`release_mass`), the filtered distribution is sampled (`_choose`), a fill
    row's TIME_SHIFT past its end lands on it, and the note-length guard (`apply_guard`) may
    replace the event. keys_B: the event's random key per row. `sample_window` draws every event
    with it, and so does the live session (mgpt/live), one event at a time.
    """
    fill_B, hold_BxP = limits.fill_B, limits.hold_BxP
    banned_BxV, force_B, oldest_age_B = note_rules(rows.open_BxP, rows.onset_BxP, rows.steps_B, tables, hold_BxP)
    if fill_B is not None:  # a middle does not end before E
        eos_V = jnp.arange(banned_BxV.shape[1]) == tables["eos_id"]
        banned_BxV = banned_BxV | (fill_B[:, None] & eos_V[None, :])
    if limits.mask is not None:  # hard limits: pitch range, polyphony, velocity range
        banned_BxV = banned_BxV | limits_lib.mask_rules(limits.mask, rows.open_BxP, rows.velocity_B, tables)
    ruled_BxV = banned_BxV  # what the note rules and the hard limits ban: never every event
    density_BxV = controls_lib.density_banned(limits.controls, rows.segment_notes_B, rows.steps_B, tables,
                                              rows.open_BxP.shape[1], rows.open_BxP, rows.onset_BxP)
    if density_BxV is not None:  # the density guard: as many notes in a segment as its level holds
        banned_BxV = banned_BxV | density_BxV
    register_BxV = controls_lib.register_banned(limits.controls, rows.segment_notes_B, rows.segment_pitch_sum_B,
                                                rows.steps_B, banned_BxV, tables)
    if register_BxV is not None:  # the register guard: the segment's mean pitch in its level
        banned_BxV = banned_BxV | register_BxV
    mode_BxV = controls_lib.mode_banned(limits.controls, rows.segment_pitch_time_Bx12, rows.steps_B, banned_BxV,
                                        tables, rows.pitch_class_notes_Bx12)
    if mode_BxV is not None:  # the mode guard: the segment's pitch classes towards the mode asked for
        banned_BxV = banned_BxV | mode_BxV
    loudness_BxV = controls_lib.loudness_banned(limits.controls, rows.steps_B, banned_BxV)
    if loudness_BxV is not None:  # the loudness guard: no VELOCITY far from the level asked for
        banned_BxV = banned_BxV | loudness_BxV
    polyphony_BxV = controls_lib.polyphony_banned(limits.controls, rows.segment_onsets_B, rows.segment_polyphony_sum_B,
                                                  rows.open_BxP, rows.onset_BxP, rows.steps_B, banned_BxV, tables)
    if polyphony_BxV is not None:  # the polyphony guard: the segment's onsets towards the level asked for
        banned_BxV = banned_BxV | polyphony_BxV
    if limits.controls is not None:
        # A guard cornered by a hard limit (the density guard owes a note on a segment's last step,
        # --max_polyphony forbids striking it, and the note struck just now may not end at once)
        # leaves no event: that row draws this event under the note rules and hard limits alone.
        stuck_B = jnp.all(banned_BxV, axis=1)
        banned_BxV = jnp.where(stuck_B[:, None], ruled_BxV, banned_BxV)
    logits_BxV = jax.lax.cond(settings["release_share"] > 0, release_mass,
                              lambda l, b, t, a: l.astype(jnp.float32),
                              logits_BxV, banned_BxV, tables, settings["release_share"])
    if limits.mask is not None:  # the masked VELOCITYs' mass goes to an allowed one (limits.velocity_mass)
        logits_BxV = limits_lib.velocity_mass(logits_BxV, limits.mask, rows.open_BxP, rows.velocity_B, tables,
                                              banned_BxV)
    token_B = _choose(logits_BxV, keys_B, settings, banned_BxV)
    if fill_B is not None:
        # A TIME_SHIFT past E becomes the one that lands on E, and the middle ends there: the
        # model's probability of moving past E is its probability of ending the middle now.
        # (Masking those shifts instead handed it to NOTE_ONs: near E the demo model struck
        # note after note until it drew a shift short enough.)
        left_B = limits.max_steps_B - rows.steps_B
        past_B = fill_B & (tables["shift_steps_V"][token_B] > left_B)
        token_B = jnp.where(past_B, tables["time_shift_offset"] + left_B - 1, token_B)
    token_B = apply_guard(token_B, force_B, oldest_age_B, limits.max_note_steps_B)
    if limits.controls is not None:  # a control token due at a segment's opening is written, not drawn
        forced_B, control_token_B = controls_lib.forced(limits.controls, rows.steps_B, rows.control_B)
        token_B = jnp.where(forced_B, control_token_B, token_B)
    return token_B


def track_notes(rows: RowState, token_B, emit_B, tables):
    """(open_BxP, onset_BxP) after rows emit token_B (where emit_B): what sounds, and since when."""
    num_pitches = rows.open_BxP.shape[1]
    struck_BxP = emit_B[:, None] & (tables["on_pitch_V"][token_B][:, None] == jnp.arange(num_pitches))
    released_BxP = emit_B[:, None] & (tables["off_pitch_V"][token_B][:, None] == jnp.arange(num_pitches))
    open_BxP = rows.open_BxP + struck_BxP.astype(jnp.int32) - released_BxP.astype(jnp.int32)
    onset_BxP = jnp.where(struck_BxP, rows.steps_B[:, None], jnp.where(open_BxP == 0, SILENT, rows.onset_BxP))
    return open_BxP, onset_BxP


@functools.partial(jax.jit, static_argnames=("graphdef",))
def sample_window(graphdef, params, prompt_BxP, lengths_B, seeds_B, rows: RowState, limits: RowLimits, settings,
                  tables, guidance=None):
    """Prefill right-padded prompts, then decode until every row is done or its window is full.

    graphdef/params: `nnx.split(model)` (graphdef static, params traced).
    prompt_BxP: int32 ids, row b valid up to lengths_B[b] (1 <= length <= P <= W).
    seeds_B: uint32. rows: the state earlier windows left (`RowState`; its open_BxP/onset_BxP
    are the notes sounding at the end of each prompt). limits: `RowLimits`.
    guidance: None (plain sampling), or a float32 scalar G: each row also runs with
    STYLE:unknown in place of its STYLE token, in the same 2B-row cache, and events are
    drawn from `guided_logits`. None and a value trace different functions.
    Returns (tokens_BxW, end_B, rows): the window (prompt then new events; row b's is
    tokens_BxW[b, :end_B[b]]) and the rows' state after it. A row is done at EOS or a
    budget; a row neither done nor at end_B == W cannot occur.
    """
    model = nnx.merge(graphdef, params)
    batch, prompt_len = prompt_BxP.shape
    window = model.cfg.max_len
    keys_B = jax.vmap(jax.random.key)(seeds_B)
    fill_B, hold_BxP = limits.fill_B, limits.hold_BxP

    # R model rows: B, or 2B under guidance (row B + b: row b with STYLE:unknown).
    twin = (lambda x_B: x_B) if guidance is None else (lambda x_B: jnp.concatenate([x_B, x_B]))
    # Guidance with controls: the twins read neither the style nor the controls (`_twin_prompt`),
    # except the twins of rows with a style where the plan says so (`controls.steered_twins`):
    # those read the controls, and each row has its own G.
    apart = guidance is not None and limits.controls is not None
    styled_B = None
    if apart and limits.controls.styled_B is not None:
        styled_B, guidance = limits.controls.styled_B, limits.controls.guidance_B[:, None]
    if apart:
        twin_prompt_BxP, twin_lengths_B = _twin_prompt(prompt_BxP, lengths_B, tables, styled_B,
                                                       limits.controls.twin_style_B)
        prompt_RxP = jnp.concatenate([prompt_BxP, twin_prompt_BxP])
        lengths_R = jnp.concatenate([lengths_B, twin_lengths_B])
    else:
        prompt_RxP = prompt_BxP if guidance is None else jnp.concatenate(
            [prompt_BxP, prompt_BxP.at[:, 0].set(tables["unknown_style_id"])])
        lengths_R = twin(lengths_B)
    model_rows = prompt_RxP.shape[0]
    cache = model.init_cache(model_rows, window)
    positions_RxP = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (model_rows, prompt_len))
    logits_RxPxV, cache = model.decode(prompt_RxP, positions_RxP, cache)
    logits_RxV = jnp.take_along_axis(logits_RxPxV, (lengths_R - 1)[:, None, None], axis=1)[:, 0]
    pitches = model.cfg.sounding_pitches
    heard_RxP = None
    if pitches:  # what the prompt's last token heard: padding past it changes nothing
        heard_RxP = jnp.take_along_axis(heard_counts(prompt_RxP, pitches), (lengths_R - 1)[:, None, None],
                                        axis=1)[:, 0]
    if apart:
        logits_BxV, twin_logits_BxV = jnp.split(logits_RxV, 2)
    else:
        logits_BxV, twin_logits_BxV = guided_logits(logits_RxV, guidance), None
    tokens_BxW = jnp.zeros((batch, window), jnp.int32).at[:, :prompt_len].set(prompt_BxP)
    rows_B = jnp.arange(batch)

    def active(s: _SamplingState):
        return ~s.rows.done_B & (s.end_B < window)

    def body(s: _SamplingState) -> _SamplingState:
        r = s.rows
        live_B = active(s)
        step_keys_B = jax.vmap(jax.random.fold_in)(keys_B, r.events_B)
        logits_BxV = s.logits_BxV
        if apart:
            logits_BxV = guided_logits(jnp.concatenate([s.logits_BxV, s.twin_logits_BxV]), guidance)
        token_B = choose_event(logits_BxV, r, limits, settings, tables, step_keys_B)
        new_steps_B = r.steps_B + tables["shift_steps_V"][token_B]
        stop_B = ((token_B == tables["eos_id"]) | (new_steps_B > limits.max_steps_B)
                  | (r.events_B >= limits.max_events_B))
        emit_B = live_B & ~stop_B
        # Rows that do not emit write out of bounds, which mode='drop' discards.
        tokens_BxW = s.tokens_BxW.at[rows_B, jnp.where(emit_B, s.end_B, window)].set(token_B, mode="drop")
        # --- controls (mgpt/sample/controls.py): forced tokens are not events of the budget or the rng
        forced_B, _ = controls_lib.forced(limits.controls, r.steps_B, r.control_B)
        counted_B = emit_B if forced_B is None else emit_B & ~forced_B
        # A twin that skips a control token feeds it at its next free position, which its next
        # event overwrites before anything reads it, and keeps the logits it had.
        twin_emit_B = counted_B if styled_B is None else jnp.where(styled_B, emit_B, counted_B)
        emit_R = twin(emit_B) if not apart else jnp.concatenate([emit_B, twin_emit_B])
        end_R = twin(s.end_B) if not apart else jnp.concatenate([s.end_B, s.twin_end_B])
        logits_Rx1xV, cache = model.decode(twin(token_B)[:, None], end_R[:, None], s.cache, s.heard_RxP)
        heard_RxP = s.heard_RxP
        if pitches:  # a row that did not emit will feed another token at the same position
            heard_RxP = jnp.where(emit_R[:, None], heard_counts(twin(token_B)[:, None], pitches, heard_RxP)[:, 0],
                                  heard_RxP)
        open_BxP, onset_BxP = track_notes(r, token_B, emit_B, tables)
        if apart:
            next_BxV, twin_next_BxV = jnp.split(logits_Rx1xV[:, 0], 2)
            twin_next_BxV = jnp.where(twin_emit_B[:, None], twin_next_BxV, s.twin_logits_BxV)
            twin_end_B = s.twin_end_B + twin_emit_B
        else:
            next_BxV, twin_next_BxV, twin_end_B = guided_logits(logits_Rx1xV[:, 0], guidance), None, None
        control_B = controls_lib.advance(limits.controls, r.control_B, r.steps_B, jnp.where(emit_B, new_steps_B, r.steps_B),
                                         emit_B, forced_B)
        struck_B = counted_B & (tables["on_pitch_V"][token_B] < r.open_BxP.shape[1])
        segment_notes_B = controls_lib.count_notes(limits.controls, r.segment_notes_B, r.steps_B,
                                                   jnp.where(emit_B, new_steps_B, r.steps_B), struck_B)
        segment_pitch_sum_B = controls_lib.sum_pitches(limits.controls, r.segment_pitch_sum_B, r.steps_B,
                                                       jnp.where(emit_B, new_steps_B, r.steps_B), struck_B,
                                                       tables["on_pitch_V"][token_B])
        segment_onsets_B, segment_polyphony_sum_B = controls_lib.count_onsets(
            limits.controls, r.segment_onsets_B, r.segment_polyphony_sum_B, r.open_BxP, r.onset_BxP, r.steps_B,
            jnp.where(emit_B, new_steps_B, r.steps_B))
        segment_pitch_time_Bx12 = controls_lib.pitch_class_time(limits.controls, r.segment_pitch_time_Bx12,
                                                                r.open_BxP, r.steps_B,
                                                                jnp.where(emit_B, new_steps_B, r.steps_B))
        pitch_class_notes_Bx12 = controls_lib.count_pitch_classes(limits.controls, r.pitch_class_notes_Bx12,
                                                                  struck_B, tables["on_pitch_V"][token_B])
        # ---
        filled_B = False if fill_B is None else fill_B & emit_B & (new_steps_B >= limits.max_steps_B)
        return _SamplingState(
            tokens_BxW=tokens_BxW,
            cache=cache,
            logits_BxV=next_BxV,
            end_B=s.end_B + emit_B,
            rows=RowState(
                events_B=r.events_B + counted_B,
                steps_B=jnp.where(emit_B, new_steps_B, r.steps_B),
                done_B=r.done_B | (live_B & stop_B) | filled_B,
                open_BxP=open_BxP,
                onset_BxP=onset_BxP,
                velocity_B=limits_lib.track_velocity(r.velocity_B, token_B, emit_B, tables),
                control_B=control_B,
                segment_notes_B=segment_notes_B,
                segment_pitch_sum_B=segment_pitch_sum_B,
                segment_pitch_time_Bx12=segment_pitch_time_Bx12,
                pitch_class_notes_Bx12=pitch_class_notes_Bx12,
                segment_onsets_B=segment_onsets_B,
                segment_polyphony_sum_B=segment_polyphony_sum_B,
            ),
            heard_RxP=heard_RxP,
            twin_end_B=twin_end_B,
            twin_logits_BxV=twin_next_BxV,
        )

    state = _SamplingState(
        tokens_BxW=tokens_BxW,
        cache=cache,
        logits_BxV=logits_BxV,
        end_B=jnp.asarray(lengths_B, jnp.int32),
        rows=RowState(events_B=jnp.asarray(rows.events_B, jnp.int32), steps_B=jnp.asarray(rows.steps_B, jnp.int32),
                      done_B=jnp.asarray(rows.done_B, bool), open_BxP=jnp.asarray(rows.open_BxP, jnp.int32),
                      onset_BxP=jnp.asarray(rows.onset_BxP, jnp.int32),
                      velocity_B=None if rows.velocity_B is None else jnp.asarray(rows.velocity_B, jnp.int32),
                      control_B=None if rows.control_B is None else jnp.asarray(rows.control_B, jnp.int32),
                      segment_notes_B=None if rows.segment_notes_B is None
                      else jnp.asarray(rows.segment_notes_B, jnp.int32),
                      segment_pitch_sum_B=None if rows.segment_pitch_sum_B is None
                      else jnp.asarray(rows.segment_pitch_sum_B, jnp.int32),
                      segment_pitch_time_Bx12=None if rows.segment_pitch_time_Bx12 is None
                      else jnp.asarray(rows.segment_pitch_time_Bx12, jnp.float32),
                      pitch_class_notes_Bx12=None if rows.pitch_class_notes_Bx12 is None
                      else jnp.asarray(rows.pitch_class_notes_Bx12, jnp.float32),
                      segment_onsets_B=None if rows.segment_onsets_B is None
                      else jnp.asarray(rows.segment_onsets_B, jnp.int32),
                      segment_polyphony_sum_B=None if rows.segment_polyphony_sum_B is None
                      else jnp.asarray(rows.segment_polyphony_sum_B, jnp.int32)),
        heard_RxP=heard_RxP,
        twin_end_B=jnp.asarray(twin_lengths_B, jnp.int32) if apart else None,
        twin_logits_BxV=twin_logits_BxV,
    )
    state = jax.lax.while_loop(lambda s: jnp.any(active(s)), body, state)
    return state.tokens_BxW, state.end_B, state.rows


def _twin_prompt(prompt_BxP, lengths_B, tables, styled_B=None, twin_style_B=None):
    """The unconditional twins' prompts under guidance with controls: STYLE:unknown, and every
    control token left out (the rest moves up; twin_lengths_B says how much is left). A model
    trained with control dropout has seen rows without them; the event is then drawn from
    l_uncond + G * (l_cond - l_uncond), which pushes towards the style and the controls together.
    Rows where styled_B is True keep their control tokens: only their STYLE differs, STYLE:unknown
    or, with twin_style_B, the row's contrast style (`controls.steered_twins`)."""
    batch, prompt_len = prompt_BxP.shape
    keep_BxP = prompt_BxP < tables["control_offset"]
    if styled_B is not None:
        keep_BxP = keep_BxP | styled_B[:, None]
    keep_BxP = keep_BxP & (jnp.arange(prompt_len)[None, :] < lengths_B[:, None])
    to_BxP = jnp.where(keep_BxP, jnp.cumsum(keep_BxP, axis=1) - 1, prompt_len)
    twin_BxP = jnp.zeros_like(prompt_BxP).at[jnp.arange(batch)[:, None], to_BxP].set(prompt_BxP, mode="drop")
    style_B = tables["unknown_style_id"] if twin_style_B is None else twin_style_B
    return twin_BxP.at[:, 0].set(style_B), jnp.sum(keep_BxP, axis=1).astype(lengths_B.dtype)


def _bucket(n: int, cap: int | None = None, floor: int = 1) -> int:
    """Next power of two >= max(n, floor), at most cap: few shapes, few compiles."""
    b = 1 << max(0, math.ceil(math.log2(max(n, floor, 1))))
    return min(b, cap) if cap else b


def generate_tokens(model: GPT, vocab: Vocabulary, prompts: Sequence[np.ndarray], **options) -> list[np.ndarray]:
    """Continue each prompt (STYLE token + optional primer events) with sampled events.

    With `gaps` (one `mgpt.sample.fim.Gap` per prompt, each prompt its STYLE token + `gap.prefix`;
    the model's vocabulary must have the FIM tokens) each row is the middle of its gap
    instead: the model reads the FIM prompt (prefix, suffix, time left) and writes events
    until their TIME_SHIFTs sum to exactly `gap.steps` (see `sample_window`'s fill rows);
    notes sounding through the whole gap are held. max_seconds is then ignored. Close the
    result with `mgpt.sample.fim.close`.

    Sampled events are always possible ones: no NOTE_OFF of a silent pitch, no NOTE_ON of
    a sounding one; `release_share` of the masked NOTE_OFFs' probability goes to the
    sounding notes (`release_mass`). `max_note_seconds` (one value, or one per prompt;
    0 = off) closes any note that has sounded that long at the next event (`apply_guard`).
    `guidance` G >= 0: classifier-free style guidance (see the module docstring); 1 = off,
    and it then runs the plain sampler, so G = 1 gives the same pieces at the same cost.
    `hard_limits` (`mgpt.sample.limits.HardLimits`: pitch range, maximum polyphony, velocity
    range) hold on every sampled event, by masking; the prompts' own events are left as they are.
    `controls` (`mgpt.sample.controls.Timeline`, one for all prompts or one per prompt; the
    vocabulary must have control tokens) are written at each segment's opening of the piece's
    clock, the first right after the prompt; an empty timeline samples exactly as none.
    `steered_guidance` G_s (with controls and guidance != 1): rows with a style are drawn at G_s
    from a twin that reads their controls (`controls.steered_twins`); None: every twin reads
    neither, at `guidance`. `contrast_style` (with controls and guidance != 1; `controls.parse_contrast`'s
    'auto' or {style id: contrast id}): the twins of rows with a style read their controls and
    their contrast style, at G_s or `guidance`.

    `options` are `prepare`'s keyword arguments (seeds, the budgets, the sampling settings, the
    guards, guidance, batch_size, gaps, hard_limits, controls, steered_guidance, contrast_style),
    checked there.

    Returns, per prompt, the full row: prompt + new events, up to and excluding
    EOS (int32). Budgets: `max_events` new events and/or `max_seconds` of music
    (TIME_SHIFT sum of the new events); with neither, max_events = cfg.max_len;
    with only max_seconds, new events are also capped at
    max(1024, 100 * max_seconds). Rows are processed `batch_size` at a time
    (default: all at once).

    A row longer than the model's window is re-prefilled here, window by window, batch by batch.
    `mgpt.sample.continuous.generate_tokens` takes the same arguments and reads past the window
    through a rolling KV cache (the STYLE token its sink) under continuous batching: a finished
    row's slot takes the next prompt at once.
    """
    return windowed(prepare(model, vocab, prompts, **options))


@dataclasses.dataclass
class Job:
    """`generate_tokens`' arguments checked and resolved (`prepare`): budgets in events and steps,
    the note guard in steps, the sampling settings and token tables, guidance as None or a scalar."""

    model: GPT
    vocab: Vocabulary
    prompts: list
    seeds: list
    max_events: int
    max_steps: int
    max_note_steps: np.ndarray
    settings: dict
    tables: dict
    guidance: jax.Array | None
    batch_size: int
    gaps: Sequence | None
    hard_limits: "limits_lib.HardLimits | None"
    controls: "list[controls_lib.Timeline] | None"
    steered_guidance: float | None = None
    contrast_style: dict | str | None = None


def prepare(
    model: GPT,
    vocab: Vocabulary,
    prompts: Sequence[np.ndarray],
    *,
    seeds: Sequence[int],
    max_events: int | None = None,
    max_seconds: float | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    greedy: bool = False,
    max_note_seconds: float | Sequence[float] = 0.0,
    release_share: float = RELEASE_SHARE,
    guidance: float = 1.0,
    batch_size: int | None = None,
    gaps: Sequence | None = None,
    hard_limits: limits_lib.HardLimits | None = None,
    controls: controls_lib.Timeline | Sequence[controls_lib.Timeline] | None = None,
    steered_guidance: float | None = None,
    contrast_style: dict | str | None = None,
) -> Job:
    """`generate_tokens`' checks (ValueError naming the argument) and resolved settings."""
    cfg = model.cfg
    if vocab.size != cfg.vocab_size:
        raise ValueError(f"vocabulary has {vocab.size} tokens but the model expects {cfg.vocab_size}")
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if cfg.max_len < 4:
        raise ValueError(f"model.max_len={cfg.max_len} is too short to sample with a sliding window")
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    for i, p in enumerate(prompts):
        if p.size == 0 or not vocab.is_style(p[:1])[0]:
            raise ValueError(f"prompt {i} must start with a STYLE token")
        if np.any((p < 0) | (p >= vocab.size)):
            raise ValueError(f"prompt {i} has ids outside 0..{vocab.size - 1}")
    for i, s in enumerate(seeds):
        if not 0 <= int(s) < 2**32:
            raise ValueError(f"seed {s} (prompt {i}) must be in 0..2**32-1")
    if max_events is not None and max_events < 0:
        raise ValueError(f"max_events must be >= 0, got {max_events}")
    if max_seconds is not None and max_seconds < 0:
        raise ValueError(f"max_seconds must be >= 0, got {max_seconds}")
    max_note_seconds = np.broadcast_to(np.asarray(max_note_seconds, np.float64), (len(prompts),))
    if not np.all(max_note_seconds >= 0):
        raise ValueError(f"max_note_seconds must be >= 0 (0 = off), got {max_note_seconds.min()}")
    max_note_steps = note_steps(vocab, max_note_seconds)
    if not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"guidance must be a finite number >= 0 (1 = off), got {guidance}")
    if steered_guidance is not None and not (math.isfinite(steered_guidance) and steered_guidance >= 0):
        raise ValueError(f"steered_guidance must be a finite number >= 0, got {steered_guidance}")
    if gaps is not None:
        if len(gaps) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(gaps)} gaps")
        if not vocab.fim:
            raise ValueError("infilling needs a model trained with FIM tokens (data.fim_rate > 0)")
        max_seconds = max(g.steps for g in gaps) / vocab.steps_per_second
    max_events, max_steps = budgets(vocab, cfg.max_len, max_events, max_seconds)
    settings = sampling_settings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, greedy=greedy,
                                 release_share=release_share)
    tables = token_tables(vocab)
    batch_size = len(prompts) if not batch_size else batch_size
    if hard_limits is not None and not hard_limits.active:
        hard_limits = None  # no limit at all: the plain trace, byte-identical pieces
    if hard_limits is not None:
        hard_limits.banned_V(vocab)  # a range that leaves nothing to play fails here, before any work
    if isinstance(controls, controls_lib.Timeline):
        controls = [controls] * len(prompts)
    if controls is not None and len(controls) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(controls)} control timelines")
    if controls is not None and all(t.empty for t in controls):
        controls = None  # nothing asked: the plain trace, byte-identical pieces
    if controls is not None:
        if vocab.controls is None:
            raise ValueError("controls need a model trained with control tokens (data.control_seconds > 0)")
        if gaps is not None:
            raise ValueError("controls and infilling cannot be combined yet")
    if not any(controls_lib.steered_rows(vocab, prompts, controls)):
        steered_guidance = None  # no row it acts on
    if steered_guidance is not None and guidance == 1:
        # G = 1 runs the plain trace, whose pieces depend on nothing else in the batch: a steered row
        # would put every row of the job through the guided one.
        raise ValueError("steered_guidance needs guidance != 1 (the pieces without a style would be drawn "
                         "through the guided sampler)")
    # None selects the plain B-row trace of sample_window: G = 1 must cost nothing.
    guidance = None if guidance == 1 else jnp.asarray(guidance, jnp.float32)
    return Job(model=model, vocab=vocab, prompts=prompts, seeds=list(seeds), max_events=max_events,
               max_steps=max_steps, max_note_steps=max_note_steps, settings=settings, tables=tables,
               guidance=guidance, batch_size=batch_size, gaps=gaps, hard_limits=hard_limits, controls=controls,
               steered_guidance=None if steered_guidance is None else float(steered_guidance),
               contrast_style=contrast_style or None)


def windowed(job: Job) -> list[np.ndarray]:
    """`generate_tokens`' rows, `job.batch_size` at a time through re-prefilled windows."""
    j = job
    graphdef, params = nnx.split(j.model)
    out: list[np.ndarray] = []
    for start in range(0, len(j.prompts), j.batch_size):
        rows = slice(start, start + j.batch_size)
        out += _generate_batch(
            graphdef, params, j.model.cfg.max_len, j.vocab, j.prompts[rows], j.seeds[rows],
            j.max_events, j.max_steps, j.max_note_steps[rows], j.settings, j.tables, j.guidance,
            gaps=None if j.gaps is None else j.gaps[rows], hard_limits=j.hard_limits,
            controls=None if j.controls is None else j.controls[rows], steered_guidance=j.steered_guidance,
            contrast_style=j.contrast_style,
        )
    return out


def note_steps(vocab: Vocabulary, max_note_seconds) -> np.ndarray:
    """The note-length guard's limits (seconds, 0 = off) in time steps, int32. At least one
    step: a tiny positive limit must not round to 0, which means "off"."""
    seconds = np.asarray(max_note_seconds, np.float64)
    return np.where(seconds > 0, np.maximum(1, np.round(seconds * vocab.steps_per_second)), 0).astype(np.int32)


def budgets(vocab: Vocabulary, window: int, max_events: int | None, max_seconds: float | None) -> tuple[int, int]:
    """(max_events, max_steps) of a piece (see `generate_tokens`): with neither budget, one
    window of events; with only seconds, events capped at max(1024, 100 * seconds)."""
    if max_events is None:
        max_events = window if max_seconds is None else max(1024, math.ceil(100 * max_seconds))
    max_steps = np.iinfo(np.int32).max if max_seconds is None else int(round(max_seconds * vocab.steps_per_second))
    return max_events, max_steps


def window_prompt(row: list[int], window: int, vocab: Vocabulary) -> list[int]:
    """The prompt for a row's next window of `window` positions (see the module docstring).

    The whole row while it leaves room to grow; otherwise STYLE, the state carried at the
    first kept event (`Vocabulary.carried_state`: the VELOCITY in force and the notes
    still sounding) and the most recent events, at most window // 2 tokens in all: the
    training crops' shape. The kept events start as early as that room allows.
    """
    if len(row) < window:
        return list(row)
    room = window // 2 - 1  # tokens after STYLE
    start = len(row) - room
    while True:  # the carried state's length depends on the start; the start only moves later
        carried = vocab.carried_state(row, start, limit=window // 4)
        need = len(row) - room + len(carried)
        if need <= start:
            return [row[0], *carried, *row[start:]]
        start = need


def _generate_batch(graphdef, params, window, vocab, prompts, seeds, max_events, max_steps, max_note_steps,
                    settings, tables, guidance, gaps=None, hard_limits=None, controls=None, steered_guidance=None,
                    contrast_style=None):
    """One batch through as many windows as its longest row needs (see the module docstring).

    With `gaps` each window's prompt is the FIM prompt of its row (`mgpt.sample.fim.prompt`): the
    middle written so far joins the prefix, so a middle longer than a window goes on in a
    fresh one with the time it has left."""
    n = len(prompts)
    # At least 2 rows: XLA:CPU rewrites a 1-row cache scatter as a dynamic-update-slice and
    # then copies the whole cache into the attention read every step (2x slower than 2 rows).
    batch = _bucket(n, floor=2)
    pieces = [list(p) for p in prompts]
    state = RowState.start(vocab, prompts, batch)
    mask = None
    if hard_limits is not None:
        mask = hard_limits.arrays(vocab, batch)
        velocity_B = np.full(batch, limits_lib.velocity_in_force(vocab, []), np.int32)
        velocity_B[:n] = [limits_lib.velocity_in_force(vocab, p) for p in prompts]
        state = state.replace(velocity_B=velocity_B)
    plan = None
    if controls is not None:
        offsets = [int(round(vocab.seconds(p) * vocab.steps_per_second)) for p in prompts]
        budget = int(np.max(max_steps))  # one budget for all rows, or per row (then the largest)
        plan = controls_lib.plan(vocab, controls, offsets, batch, None if budget >= np.iinfo(np.int32).max
                                 else budget)
        if guidance is not None:
            plan = controls_lib.steered_twins(plan, vocab, prompts, controls, float(guidance), steered_guidance,
                                              contrast_style)
        state = state.replace(control_B=np.zeros(batch, np.int32))  # the first group: right after the prompt
        if plan.cap_BxS is not None:  # the guards count the primer's notes in its last segment
            notes_B, sum_B = np.zeros(batch, np.int32), np.zeros(batch, np.int32)
            for b, p in enumerate(prompts):
                notes_B[b], sum_B[b] = controls_lib.notes_in_last_segment(vocab, p)
            state = state.replace(segment_notes_B=notes_B,
                                  segment_pitch_sum_B=sum_B if plan.register_BxS is not None else None)
        if plan.mode_BxS is not None:  # the mode guard: what sounded in the primer's last segment
            time_Bx12 = np.zeros((batch, 12), np.float32)
            for b, p in enumerate(prompts):
                time_Bx12[b] = controls_lib.pitch_class_time_in_last_segment(vocab, p)
            state = state.replace(segment_pitch_time_Bx12=time_Bx12)
            if plan.scale_B is not None:  # the scale guard: the primer's notes, for the piece's scale
                notes_Bx12 = np.zeros((batch, 12), np.float32)
                for b, p in enumerate(prompts):
                    notes_Bx12[b] = controls_lib.pitch_classes_struck(vocab, p)
                state = state.replace(pitch_class_notes_Bx12=notes_Bx12)
        if plan.polyphony_BxS is not None:  # the polyphony guard: the primer's onsets in its last segment
            onsets_B, total_B = np.zeros(batch, np.int32), np.zeros(batch, np.int32)
            for b, p in enumerate(prompts):
                onsets_B[b], total_B[b] = controls_lib.onsets_in_last_segment(vocab, p)
            state = state.replace(segment_onsets_B=onsets_B, segment_polyphony_sum_B=total_B)
    seeds_B = np.zeros(batch, np.uint32)
    seeds_B[:n] = np.asarray(seeds, np.uint64).astype(np.uint32)
    # Budgets: one for all rows, or one per row (benchmarks/bench_sample.py --corpus).
    max_steps_B, max_events_B = np.zeros(batch, np.int32), np.zeros(batch, np.int32)
    max_steps_B[:n], max_events_B[:n] = max_steps, max_events
    state = state.replace(done_B=state.done_B | (max_events_B == 0))
    max_note_steps_B = np.zeros(batch, np.int32)
    max_note_steps_B[:n] = max_note_steps
    hold_BxP = fill_B = None
    if gaps is not None:
        from mgpt.sample import fim

        hold_BxP = np.zeros_like(state.open_BxP)
        fill_B = np.arange(batch) < n
        for b, g in enumerate(gaps):
            hold_BxP[b], max_steps_B[b] = g.hold_P, g.steps

        def window_of(b, r):
            left = int(max_steps_B[b] - state.steps_B[b])
            return fim.prompt(vocab, r[0], np.asarray(r[1:], np.int32), gaps[b], left, budget=window // 2)
    else:
        def window_of(b, r):
            return window_prompt(r, window, vocab)
    limits = jax.tree.map(jnp.asarray, RowLimits(max_events_B=max_events_B,
                                                 max_steps_B=max_steps_B, max_note_steps_B=max_note_steps_B,
                                                 fill_B=fill_B, hold_BxP=hold_BxP, mask=mask, controls=plan))
    while not np.all(state.done_B):
        windows = [window_of(b, r) for b, r in enumerate(pieces)]
        # Prefilling a few padding tokens costs less than compiling another prompt shape.
        prompt_len = _bucket(max(len(w) for w in windows), cap=window, floor=64)
        prompt_BxP = np.zeros((batch, prompt_len), np.int32)
        lengths_B = np.ones(batch, np.int32)
        for b, w in enumerate(windows):
            prompt_BxP[b, : len(w)] = w
            lengths_B[b] = len(w)
        tokens_BxW, end_B, new_state = jax.device_get(sample_window(
            graphdef, params, jnp.asarray(prompt_BxP), jnp.asarray(lengths_B), jnp.asarray(seeds_B),
            jax.tree.map(jnp.asarray, state), limits, settings, tables, guidance))
        for b in range(n):
            if not state.done_B[b]:
                pieces[b].extend(tokens_BxW[b, lengths_B[b] : end_B[b]].tolist())
        state = new_state
    return [np.asarray(r, np.int32) for r in pieces]
