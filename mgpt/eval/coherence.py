"""Coherence section: do generated notes hold together as the real ones of their style do?

Per style, polyphony at onsets, mean note length and the share of notes of 4 s or
more (mgpt.music.features.note_coherence), generated against real test pieces.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

from data_prep.notes import Notes, crop
from data_prep.vocab import normalize_label
from mgpt.music import features as F
from mgpt.eval.inputs import Generated, Options, valid
from mgpt.eval.references import References

COHERENCE_TOLERANCE = 0.25  # a style is flagged when polyphony or mean note length is off by more
LONG_NOTE_SLACK = 0.03  # generated share of notes >= 4 s may exceed the real share by 3 points


def coherence_by_style(generated: Sequence[tuple[str, Notes]], real: Sequence[tuple[str, Notes]],
                       crop_seconds: float, train: Sequence[tuple[str, Notes]] = ()) -> dict:
    """Per style, the mean over pieces of F.note_coherence for generated and real test pieces,
    the generated/real ratios, and whether the style is off (by more than 25 % in polyphony or
    note length, or more than 3 points more notes >= 4 s).

    With `train` pieces, each style also gets the train split's means and the generated/train
    ratios. The flag stays against the test pieces; the train figures say whether a flag is
    the model's or the test split's: a style's few test pieces can themselves be off its train
    split by more than the tolerance (`test_vs_train`). `train_off` is the same rule applied to
    the real train pieces in place of the generated ones, a ceiling as train-vs-test is for the
    feature overlap: a flag that real pieces of the style also raise is the split's.
    """

    def means(pairs, style):
        rows = [F.note_coherence(n) for s, n in pairs if s == style and len(n[0])]
        return {"pieces": len(rows), **{k: float(np.mean([r[k] for r in rows])) if rows else None
                                          for k in F.COHERENCE}}

    def ratios(a, b):
        return {k: a[k] / b[k] if a[k] is not None and b[k] else None for k in ("onset_polyphony", "mean_note_s")}

    def off(a, r):  # what is off in a (generated or train means) against the real test pieces r
        out = [k for k, v in ratios(a, r).items() if v is None or abs(v - 1) > COHERENCE_TOLERANCE]
        return out + (["share_notes_ge_4s"] if a["share_notes_ge_4s"] > r["share_notes_ge_4s"] + LONG_NOTE_SLACK
                      else [])

    per_style = {}
    for style in sorted({s for s, _ in generated} & {s for s, _ in real}):
        g, r = means(generated, style), means(real, style)
        if not g["pieces"] or not r["pieces"]:
            continue
        per_style[style] = {"generated": g, "real": r, "ratio": ratios(g, r), "off": off(g, r)}
        t = means(train, style)
        if t["pieces"]:
            per_style[style].update(train=t, ratio_to_train=ratios(g, t), test_vs_train=ratios(r, t),
                                    train_off=off(t, r))
    return {
        "crop_seconds": crop_seconds,
        "tolerance": COHERENCE_TOLERANCE,
        "long_note_slack": LONG_NOTE_SLACK,
        "per_style": per_style,
        "flagged_styles": [s for s, v in per_style.items() if v["off"]],
        # Flags the real train pieces raise too: no model of the style could clear them on this split.
        "flagged_for_train": [s for s, v in per_style.items() if v.get("train_off")],
    }


def coherence_section(refs: References, generated: Sequence[Generated], o: Options,
                      out_dir: pathlib.Path | None = None) -> dict:
    """coherence_by_style over the valid generated pieces and the real test pieces, both cropped,
    with the train split (at most o.max_feature_pieces of it, evenly spaced) beside them."""
    every = max(1, -(-len(refs.train) // max(o.max_feature_pieces, 1)))
    return coherence_by_style(
        [(normalize_label(g.style), crop(g.notes, o.crop_seconds)) for g in valid(generated)],
        [(p.style_name, crop(n, o.crop_seconds)) for n, p in zip(refs.test_notes, refs.test)],
        o.crop_seconds,
        [(p.style_name, crop(n, o.crop_seconds))
         for n, p in zip(refs.train_notes[::every], refs.train[::every])],
    )
