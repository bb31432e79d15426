"""Hard limits: a pitch range, a maximum polyphony and a velocity range, held by masking.

They need no training: the sampler's grammar mask (`mgpt.sample.sampler.choose_event`) bans,
at every sampled event,
- a NOTE_ON outside the pitch range;
- any NOTE_ON while `max_polyphony` notes already sound (NOTE_OFFs, TIME_SHIFTs and EOS stay
  allowed, so a row can always go on);
- a VELOCITY token whose velocity (the one the decoder gives its notes, `bin_to_velocity`) lies
  outside the velocity range, and any NOTE_ON while the velocity in force lies outside it (a
  primer's, or the decoder's default 64 when nothing set one), so the model must first choose an
  allowed VELOCITY.
So every note the sampler strikes obeys all three. The note-length guard's forced NOTE_OFFs only
lower polyphony. The primer's (or the infilled file's) own events are the user's music and are
never rewritten; its notes still sounding count towards the polyphony of sampled notes.
"""

from __future__ import annotations

import dataclasses
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from data_prep.vocab import Vocabulary

NO_LIMIT = np.iinfo(np.int32).max


@flax.struct.dataclass
class MaskLimits:
    """The limits as arrays for the decode loop (B rows).

    banned_BxV: NOTE_ONs outside the pitch range and VELOCITY tokens outside the velocity range.
    max_polyphony_B: notes that may sound at once (NO_LIMIT = off).
    nearest_BxV: for a VELOCITY id, the allowed VELOCITY id nearest to it (see `velocity_mass`).
    """

    banned_BxV: jax.Array
    max_polyphony_B: jax.Array
    nearest_BxV: jax.Array


@dataclasses.dataclass(frozen=True)
class HardLimits:
    """What a user asks for: pitches lo..hi (MIDI numbers), at most `max_polyphony` notes sounding
    at once, velocities lo..hi (MIDI 1..127). None = no limit."""

    pitch_range: tuple[int, int] | None = None
    max_polyphony: int | None = None
    velocity_range: tuple[int, int] | None = None

    def __post_init__(self):
        for name in ("pitch_range", "velocity_range"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, (int(value[0]), int(value[1])))
        if self.pitch_range is not None:
            lo, hi = self.pitch_range
            if not 0 <= lo <= hi <= 127:
                raise ValueError(f"pitch_range must be LO-HI with 0 <= LO <= HI <= 127, got {lo}-{hi}")
        if self.velocity_range is not None:
            lo, hi = self.velocity_range
            if not 1 <= lo <= hi <= 127:
                raise ValueError(f"velocity_range must be LO-HI with 1 <= LO <= HI <= 127, got {lo}-{hi}")
        if self.max_polyphony is not None and (int(self.max_polyphony) != self.max_polyphony
                                               or self.max_polyphony < 1):
            raise ValueError(f"max_polyphony must be an integer >= 1, got {self.max_polyphony}")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.pitch_range, self.max_polyphony, self.velocity_range))

    def banned_V(self, vocab: Vocabulary) -> np.ndarray:
        """The tokens these limits ban outright (bool, one per token id). ValueError, naming the setting,
        when a range leaves nothing the vocabulary can play."""
        banned_V = np.zeros(vocab.size, bool)
        if self.pitch_range is not None:
            lo, hi = self.pitch_range
            pitch_P = np.arange(vocab.min_pitch, vocab.max_pitch + 1)
            outside_P = (pitch_P < lo) | (pitch_P > hi)
            if outside_P.all():
                raise ValueError(f"pitch_range {lo}-{hi} holds none of the model's pitches "
                                 f"{vocab.min_pitch}..{vocab.max_pitch}")
            banned_V[vocab.note_on_offset + np.flatnonzero(outside_P)] = True
        if self.velocity_range is not None:
            lo, hi = self.velocity_range
            velocity_K = vocab.bin_to_velocity(np.arange(1, vocab.num_velocity_bins + 1))
            outside_K = (velocity_K < lo) | (velocity_K > hi)
            if outside_K.all():
                raise ValueError(f"velocity_range {lo}-{hi} holds none of the model's velocities "
                                 f"({', '.join(map(str, velocity_K[:4]))}, ... in steps of {velocity_K[1] - velocity_K[0]})"
                                 if len(velocity_K) > 1 else f"velocity_range {lo}-{hi} excludes velocity {velocity_K[0]}")
            banned_V[vocab.velocity_offset + np.flatnonzero(outside_K)] = True
        return banned_V

    def arrays(self, vocab: Vocabulary, batch: int) -> MaskLimits:
        """The same limits on every one of `batch` rows, as the decode loop takes them."""
        banned_V = self.banned_V(vocab)
        nearest_V = np.arange(vocab.size)
        bins = np.arange(vocab.num_velocity_bins)
        allowed = bins[~banned_V[vocab.velocity_offset + bins]]
        nearest_V[vocab.velocity_offset + bins] = vocab.velocity_offset + allowed[
            np.argmin(np.abs(bins[:, None] - allowed[None, :]), axis=1)]
        return MaskLimits(
            banned_BxV=jnp.asarray(np.broadcast_to(banned_V, (batch, vocab.size))),
            max_polyphony_B=jnp.full(batch, NO_LIMIT if self.max_polyphony is None else self.max_polyphony,
                                     jnp.int32),
            nearest_BxV=jnp.asarray(np.broadcast_to(nearest_V, (batch, vocab.size)), jnp.int32))


def parse_range(flag: str, text: str | None) -> tuple[int, int] | None:
    """'48-72' (or '48..72', '48:72') -> (48, 72); None or '' -> None. ValueError naming the flag."""
    if text is None or not str(text).strip():
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:-|\.\.|:)\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"--{flag}={text}: expected LO-HI, two whole numbers such as 48-72")
    return int(m.group(1)), int(m.group(2))


def velocity_in_force(vocab: Vocabulary, prompt) -> int:
    """The VELOCITY id in force at the end of `prompt`: its last VELOCITY, else the decoder's default."""
    found = vocab.velocity_at(np.asarray(prompt), len(prompt))
    return found if found is not None else vocab.velocity_offset + int(vocab.velocity_to_bin(64)) - 1


def mask_rules(mask: MaskLimits, open_BxP, velocity_B, tables):
    """banned_BxV from the limits, given what sounds (open_BxP) and the VELOCITY id in force (velocity_B)."""
    is_on_V = tables["on_pitch_V"] < open_BxP.shape[1]
    full_B = jnp.sum(open_BxP, axis=-1) >= mask.max_polyphony_B
    muted_B = jnp.take_along_axis(mask.banned_BxV, velocity_B[:, None], axis=1)[:, 0]
    return mask.banned_BxV | ((full_B | muted_B)[:, None] & is_on_V[None, :])


def velocity_mass(logits_BxV, mask: MaskLimits, open_BxP, velocity_B, tables, banned_BxV=None):
    """Log-probabilities with the mass the velocity range masks handed to one allowed VELOCITY.

    A model that has learnt few loudnesses (the demo corpus plays nearly everything at 77) puts
    almost no probability on the VELOCITYs a range allows: masking alone then hands the mass of its
    masked VELOCITYs, and of every NOTE_ON while the velocity in force is outside the range, to
    TIME_SHIFTs and EOS, and the piece goes quiet (16 pieces of 20 s held 29 notes for
    --velocity_range=90-127). So that mass goes to the allowed VELOCITY nearest the one in force:
    the model's wish to change loudness, or to strike a note, becomes setting an allowed loudness
    first. The masked tokens themselves still get nothing (`mask_rules`). banned_BxV: everything
    masked (the controls' guards too): the VELOCITY the mass goes to is the nearest one none of
    them masks, and with none left nothing moves (else the mass would land on a masked token and
    be lost, and the piece go quiet again)."""
    is_on_V = tables["on_pitch_V"] < open_BxP.shape[1]
    logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    muted_B = jnp.take_along_axis(mask.banned_BxV, velocity_B[:, None], axis=1)[:, 0]
    full_B = jnp.sum(open_BxP, axis=-1) >= mask.max_polyphony_B
    moved_BxV = ((mask.banned_BxV & tables["is_velocity_V"][None, :])
                 | ((muted_B & ~full_B)[:, None] & is_on_V[None, :] & ~mask.banned_BxV))
    moved_B = jax.nn.logsumexp(jnp.where(moved_BxV, logp_BxV, -jnp.inf), axis=-1)
    if banned_BxV is None:
        target_B = jnp.take_along_axis(mask.nearest_BxV, velocity_B[:, None], axis=1)[:, 0]
        open_B = jnp.ones_like(moved_B, bool)
    else:  # VELOCITY ids are consecutive: the nearest id is the nearest velocity (ties: the lower)
        free_BxV = tables["is_velocity_V"][None, :] & ~banned_BxV
        ids_V = jnp.arange(logp_BxV.shape[1])
        target_B = jnp.argmin(jnp.where(free_BxV, jnp.abs(ids_V[None, :] - velocity_B[:, None]), ids_V.shape[0]),
                              axis=1)
        open_B = jnp.any(free_BxV, axis=1)
    rows_B = jnp.arange(logp_BxV.shape[0])
    raised_B = jnp.logaddexp(logp_BxV[rows_B, target_B], moved_B)
    return logp_BxV.at[rows_B, target_B].set(jnp.where(jnp.isfinite(moved_B) & open_B, raised_B,
                                                       logp_BxV[rows_B, target_B]))


def track_velocity(velocity_B, token_B, emit_B, tables):
    """The VELOCITY id in force after rows emit token_B (where emit_B); None stays None."""
    if velocity_B is None:
        return None
    return jnp.where(emit_B & tables["is_velocity_V"][token_B], token_B, velocity_B)
