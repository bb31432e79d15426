"""What turns a steered piece into another style? The classifier's reasons, feature by feature.

    python benchmarks/style_push.py runs/controls out/cost_s0 --seed=0 \\
        --reference=folk_british_irish/oneills1850/0951-0981.abc#25

COST_DIR is a `--controls_sweep` output folder with its cost study (controls_cost.json, cost_plain/,
cost_steered/); --seed is that study's, so the style classifier is fitted as it was. The steered
pieces that followed --reference's timeline and were read as another style are set beside the
plain pieces of the same asked style read right. The classifier is a logistic regression on
standardised features (mgpt.music.style_classifier), so the pull of one piece towards the style it
was read as, rather than the asked one, is a sum over features of (standardised value) x (the
difference of the two styles' weights), plus the difference of the two intercepts, which is the
same for every piece and printed once. The script prints that sum for each group, the features
whose mean pull differs most between the groups, and a few plain measures (pitch range, note
density, mean note length) of each group and of the real piece.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def feature_names() -> list[str]:
    """A name for each entry of `style_classifier.style_vector`, in its order."""
    from mgpt.music import features as F
    from mgpt.music import style_classifier as SC

    bins = len(F.TIME_BIN_EDGES_S) - 1
    nu, nb = 2 * SC._MAX_INTERVAL + 1, 2 * SC._MAX_BIGRAM_INTERVAL + 1
    pc = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
    return ([*F.SCALAR_FEATURES, "pitch mean", "pitch spread"] + [f"pitch class {c}" for c in pc]
            + [f"onset gap bin {i}" for i in range(bins)] + [f"duration bin {i}" for i in range(bins)]
            + [f"octave {i}" for i in range(11)] + [f"interval {i - SC._MAX_INTERVAL:+d}" for i in range(nu)]
            + [f"intervals {i // nb - SC._MAX_BIGRAM_INTERVAL:+d} then {i % nb - SC._MAX_BIGRAM_INTERVAL:+d}"
               for i in range(nb * nb)]
            + [f"pitch classes {pc[i // 12]} then {pc[i % 12]}" for i in range(144)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir")
    p.add_argument("cost_dir")
    p.add_argument("--reference", required=True, help="the real piece whose timeline was followed (its id, as "
                   "controls_sweep.md names it)")
    p.add_argument("--seed", type=int, default=0, help="the cost study's --seed (it fits the classifier)")
    p.add_argument("--top", type=int, default=8, help="how many features to list")
    a = p.parse_args(argv)

    cost_dir = pathlib.Path(a.cost_dir)
    try:
        study = json.loads((cost_dir / "controls_cost.json").read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"style_push: {cost_dir / 'controls_cost.json'}: {e}")
    verdicts = {name: study["rows"][name]["style"]["verdicts"] for name in ("plain", "steered")}
    if any("reference" not in v for v in verdicts["steered"]):
        sys.exit(f"style_push: {cost_dir}: the study does not record each piece's timeline; run it again")
    followed = [v for v in verdicts["steered"] if v["reference"] == a.reference]
    if not followed:
        known = sorted({v["reference"] for v in verdicts["steered"]})
        sys.exit(f"style_push: no steered piece followed {a.reference!r}; the study's timelines: {', '.join(known)}")
    asked = followed[0]["conditioned_on"]
    misread = [v for v in followed if v["classified_as"] != asked]
    if not misread:
        sys.exit(f"style_push: every piece that followed {a.reference} was read as {asked}")
    other = collections.Counter(v["classified_as"] for v in misread).most_common(1)[0][0]

    import numpy as np

    from data_prep.notes import crop
    from mgpt.eval.controls_sweep import notes_of_midi
    from mgpt.eval.inputs import Options, load_split, resolve_dataset
    from mgpt.eval.references import references
    from mgpt.music import features as F
    from mgpt.music import style_classifier as SC
    from mgpt.sample.run import load_run

    run = load_run(a.workdir)
    vocab = run.vocab
    if run.dataset_dir is None:
        sys.exit(f"style_push: the dataset of {a.workdir} is not on this machine")
    dataset = resolve_dataset(run.dataset_dir)
    train, test = load_split(dataset, "train"), load_split(dataset, "test")
    # The study's crop (older studies did not record it: mgpt.evaluate's default, 30 s, or the pieces' length).
    seconds = float(study.get("crop_seconds", min(30.0, float(study["max_seconds"]))))
    refs = references(vocab, train, test, Options(crop_seconds=seconds, seed=a.seed),
                      np.random.default_rng(a.seed), log=lambda *_: None)
    scaler, model = refs.classifier.pipeline[0], refs.classifier.pipeline[-1]
    labels = list(model.classes_)
    if len(labels) == 2:  # one row of weights, for the second class over the first
        sign = 1.0 if other == labels[1] else -1.0
        towards_F, intercept = sign * model.coef_[0], sign * float(model.intercept_[0])
    else:
        i, j = labels.index(other), labels.index(asked)
        towards_F, intercept = model.coef_[i] - model.coef_[j], float(model.intercept_[i] - model.intercept_[j])

    def notes(row, vs):
        return notes_of_midi(vocab, [cost_dir / f"cost_{row}" / v["file"] for v in vs])

    groups = {
        f"steered, followed it, read as {other}": notes("steered", [v for v in misread if v["classified_as"] == other]),
        f"steered, followed it, read as {asked}": notes("steered", [v for v in followed if v["classified_as"] == asked]),
        f"plain {asked}, read as {asked}": notes("plain", [v for v in verdicts["plain"]
                                                           if v["conditioned_on"] == asked == v["classified_as"]]),
    }
    real = [q for q in load_split(dataset, "validation") + test if f"{q.style_name}/{q.piece_id}" == a.reference]
    if real:
        groups["the real piece"] = [vocab.decode_notes(real[0].tokens)]

    def pull(pieces):  # pieces x features: each feature's push towards `other` over `asked`
        X = np.stack([SC.style_vector(crop(n, seconds)) for n in pieces])
        return scaler.transform(X) * towards_F

    pulls = {g: pull(ps) for g, ps in groups.items() if ps}
    print(f"{a.reference}: {len(misread)} of {len(followed)} steered pieces read as another style "
          f"({other} {sum(v['classified_as'] == other for v in misread)}); asked {asked}; the intercepts add "
          f"{intercept:+.1f} towards {other}")
    for g, P in pulls.items():
        ns = [crop(n, seconds) for n in groups[g]]
        feats = [(n, F.piece_features(n)) for n in ns if len(n)]
        measures = np.mean([[float(n.pitch.max() - n.pitch.min()), f["note_density"], f["duration_mean_s"]]
                            for n, f in feats], axis=0)
        print(f"  {g} ({len(P)}): pull towards {other} {P.sum(1).mean():+.1f}; pitch range "
              f"{measures[0]:.1f} semitones, {measures[1]:.2f} notes/s, notes {measures[2]:.2f} s")
    names = feature_names()
    first = list(pulls)[0]
    for base, what in ((f"plain {asked}, read as {asked}", "the plain pieces"), ("the real piece", "the real piece")):
        if base in pulls:
            gap_F = pulls[first].mean(0) - pulls[base].mean(0)
            print(f"features that pull the first group towards {other} more than {what}:")
            for i in np.argsort(-gap_F)[:a.top]:
                print(f"  {names[i]}: {gap_F[i]:+.2f}")


if __name__ == "__main__":
    main()
