"""Features section: musical statistics of generated vs real test pieces (Yang & Lerch 2018).

Overlap area and KL per feature (mgpt.music.features), with train-vs-test as the ceiling,
and a PNG per feature. Every piece is cut to its first crop_seconds so that lengths match.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from data_prep.notes import crop
from mgpt.music import features as F
from mgpt.eval.inputs import Generated, Options, valid
from mgpt.eval.references import References, mean_of


def feature_section(refs: References, generated: Sequence[Generated], o: Options,
                    out_dir: pathlib.Path | None = None) -> dict:
    """Generated vs real test pieces, feature by feature, beside the train-vs-test ceiling
    (plots into out_dir unless None)."""
    valid_gen = valid(generated)
    tables = {"generated": F.feature_table([crop(g.notes, o.crop_seconds) for g in valid_gen]), **refs.tables}
    gen_vs_test = F.compare_sets(tables["generated"], tables["test"], seed=o.seed) if valid_gen else {}
    plots = {}
    for name in F.FEATURES if out_dir is not None else ():
        path = out_dir / f"feature_{name}.png"
        F.plot_feature(name, {k: v[name] for k, v in tables.items()}, str(path))
        plots[name] = path.name
    return {
        "crop_seconds": o.crop_seconds,
        "pieces": {k: int(len(next(iter(v.values())))) for k, v in tables.items()},
        "generated_vs_test": gen_vs_test,
        "train_vs_test": refs.train_vs_test,
        "mean_overlap": {"generated_vs_test": mean_of(gen_vs_test, "overlap"),
                         "train_vs_test": mean_of(refs.train_vs_test, "overlap")},
        "mean_kl": {"generated_vs_test": mean_of(gen_vs_test, "kl"), "train_vs_test": mean_of(refs.train_vs_test, "kl")},
        "plots": plots,
    }
