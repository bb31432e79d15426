"""Originality section: how much of each generated piece is copied from a training piece.

Per piece, the longest span copied from training (notes and seconds;
transposition-aware), the share of its 8/16-note n-grams found in training next to
the same share for real test pieces, and the pieces above copy_threshold_s.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from data_prep.notes import crop
from mgpt.music import originality as orig
from mgpt.eval.inputs import Generated, Options, valid
from mgpt.eval.references import References


def originality_section(refs: References, generated: Sequence[Generated], o: Options,
                        out_dir: pathlib.Path | None = None) -> dict:
    """Longest copies and n-gram reuse of the generated pieces, and of real test pieces (cut to
    the generated pieces' length) as the reference."""
    valid_gen = valid(generated)
    train, used = refs.train, refs.used
    gen_orig = orig.originality_report(refs.index, [g.notes for g in valid_gen], ngram_sizes=o.ngram_sizes,
                                       threshold_s=o.copy_threshold_s)
    for entry, g in zip(gen_orig["pieces"], valid_gen):
        entry["file"] = g.file
        tp = entry.pop("train_piece")
        entry["train_piece_id"] = train[used[tp]].piece_id if tp >= 0 else None
    gen_orig["flagged_files"] = [valid_gen[i].file for i in gen_orig["flagged"]]
    ref_seconds = max((g.seconds for g in valid_gen), default=o.crop_seconds) or o.crop_seconds
    test_orig = orig.originality_report(refs.index, [crop(n, ref_seconds) for n in refs.test_notes],
                                        ngram_sizes=o.ngram_sizes, threshold_s=o.copy_threshold_s)
    for entry, p in zip(test_orig["pieces"], refs.test):
        entry["piece_id"] = p.piece_id
        tp = entry.pop("train_piece")
        entry["train_piece_id"] = train[used[tp]].piece_id if tp >= 0 else None
    return {
        "method": "suffix array over (pitch interval, onset interval) steps of every train piece: transposition-aware, "
                  "same tempo; a span's seconds run from its first to its last onset",
        "train_pieces_searched": len(used),
        "train_pieces_total": len(train),
        "train_notes_searched": refs.total_notes,
        "test_reference_seconds": ref_seconds,
        "generated": gen_orig,
        "test": test_orig,
    }
