"""Style section: does a generated piece sound like the style it was conditioned on?

A logistic-regression classifier (mgpt.music.style_classifier, fitted by
mgpt.eval.references.fit_classifier) trained on the real train
split judges real test pieces (its ceiling) and generated pieces.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from data_prep.notes import crop
from data_prep.vocab import normalize_label
from mgpt.music import style_classifier as sc
from mgpt.eval.inputs import Generated, Options, valid
from mgpt.eval.references import References


def style_section(refs: References, generated: Sequence[Generated], o: Options,
                  out_dir: pathlib.Path | None = None) -> dict:
    """The classifier's accuracy on real test pieces (the ceiling) and on generated pieces against
    the style each was conditioned on (confusion plot into out_dir unless None)."""
    clf = refs.classifier
    valid_gen = valid(generated)
    if clf is None:
        return {"skipped": f"needs >= 2 labelled styles in the train split, found {refs.styles}"}
    test_l = [(n, p.style_name) for n, p in zip(refs.test_notes, refs.test) if p.style_name in refs.styles]
    real = sc.score([s for _, s in test_l], clf.predict([crop(n, o.crop_seconds) for n, _ in test_l]), clf.labels)
    gen_l = [g for g in valid_gen if normalize_label(g.style) in refs.styles]
    gen_pred = clf.predict([crop(g.notes, o.crop_seconds) for g in gen_l])
    gen = sc.score([normalize_label(g.style) for g in gen_l], gen_pred, clf.labels)
    gen["verdicts"] = [{"file": g.file, "conditioned_on": g.style, "classified_as": p} for g, p in zip(gen_l, gen_pred)]
    if out_dir is not None:
        sc.plot_confusion({"real test": real, "generated": gen}, str(out_dir / "style_confusion.png"))
    return {
        "classifier": "logistic regression on musical features + pitch-class/interval n-gram histograms "
                      f"(first {o.crop_seconds:g} s of each piece; train pieces also as a transposed random window)",
        "styles": clf.labels,
        "train_pieces": refs.labelled,
        "real_test": real,
        "generated": gen,
        "plot": "style_confusion.png" if out_dir is not None else None,
    }
