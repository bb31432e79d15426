"""The style-guidance sweep: per guidance value G, style accuracy against feature overlap.

For each G, num_samples pieces are generated with that guidance (mgpt.sample) and
judged by the report's own sections, against references built once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from data_prep.vocab import Vocabulary
from mgpt.errors import UserError
from mgpt.eval import pages
from mgpt.eval.features_section import feature_section
from mgpt.eval.inputs import Options, Piece, jsonable, read_generated
from mgpt.eval.originality_section import originality_section
from mgpt.eval.references import mean_of, references
from mgpt.eval.style_section import style_section


def parse_guidances(spec: str) -> list[float]:
    try:
        values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(np.isfinite(v) and v >= 0 for v in values):
        raise UserError(f"--guidance_sweep={spec}: expected comma-separated guidance values >= 0, e.g. 1,1.5,2,3")
    return values


def guidance_sweep(
    *,
    run,
    vocab: Vocabulary,
    train: Sequence[Piece],
    test: Sequence[Piece],
    guidances: Sequence[float],
    num_samples: int,
    styles: Sequence[str],
    sampling,
    options: Options = Options(),
    output_dir: str | os.PathLike,
    progress: bool = True,
    log=print,
) -> dict:
    """Per guidance G: style accuracy by the classifier, feature overlap and the longest copy of
    `num_samples` pieces generated with G (into output_dir/guidance_G), plus a plot of accuracy
    against overlap. The figures come from the report's own sections (`references` once, then
    `style_section`, `feature_section` and `originality_section` per G)."""
    from mgpt import render
    from mgpt.sample import corpus

    o = options
    out_dir = pathlib.Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not test:
        raise UserError("the dataset has no test pieces: nothing to evaluate against")
    refs = references(vocab, train, test, o, np.random.default_rng(o.seed), log)
    ceiling = mean_of(refs.train_vs_test, "overlap")
    rows, real_accuracy = [], None
    def steered(g):  # a steered G is swept with the plain one; at G = 1 (no guidance) it is off
        return None if sampling.steered_guidance is None or g == 1 else float(g)

    for g in guidances:
        folder = out_dir / f"guidance_{g:g}"
        log(f"guidance {g:g}: generating {num_samples} pieces into {folder}")
        corpus.generate_corpus(run, folder, num_samples=num_samples, styles=styles, seed=o.seed,
                                 sampling=dataclasses.replace(sampling, guidance=float(g), steered_guidance=steered(g)),
                                 progress=progress,
                                 max_copy_seconds=0)  # measure the model, not the guard
        render.write_folder_gallery(folder)
        valid = [p for p in read_generated(folder, vocab) if p.valid]
        style = style_section(refs, valid, o, None)
        real_accuracy = style.get("real_test", {}).get("accuracy")
        overlap = feature_section(refs, valid, o, None)["mean_overlap"]["generated_vs_test"]
        copies = originality_section(refs, valid, o)["generated"]
        rows.append({
            "guidance": float(g),
            "pieces": len(valid),
            "style_accuracy": style["generated"]["accuracy"] if "generated" in style else None,
            "mean_overlap": overlap,
            "overlap_vs_ceiling": overlap / ceiling if ceiling else None,
            "longest_copy_s_max": copies["longest_copy_s_max"],
            "longest_copy_s_median": copies["longest_copy_s_median"],
            "generated_dir": folder.name,
        })
    result = jsonable({
        "sampling": sampling.to_dict(),
        "styles": list(styles),
        "real_test_style_accuracy": real_accuracy,
        "overlap_ceiling": ceiling,
        "rows": rows,
        "plot": "guidance_sweep.png",
    })
    _plot_guidance_sweep(result, out_dir / "guidance_sweep.png")
    (out_dir / "guidance_sweep.json").write_text(json.dumps(result, indent=1))
    return result


def _plot_guidance_sweep(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    pts = [(r["overlap_vs_ceiling"], r["style_accuracy"], r["guidance"]) for r in result["rows"]
           if r["overlap_vs_ceiling"] is not None and r["style_accuracy"] is not None]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        for x, y, g in pts:
            ax.annotate(f"G={g:g}", (x, y), textcoords="offset points", xytext=(5, 5))
    if result.get("real_test_style_accuracy") is not None:
        ax.axhline(result["real_test_style_accuracy"], color="grey", ls="--", lw=1, label="real test pieces")
        ax.legend(loc="best")
    ax.set_xlabel("feature overlap / train-vs-test ceiling")
    ax.set_ylabel("style accuracy (independent classifier)")
    ax.set_title("classifier-free style guidance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_guidance_sweep(result: dict) -> str:
    """The sweep as a Markdown table (also printed by the command)."""
    lines = [f"Style accuracy of real test pieces (the classifier's ceiling): "
             f"{pages.fmt(result['real_test_style_accuracy'])}; feature-overlap ceiling (train vs test): "
             f"{pages.fmt(result['overlap_ceiling'])}", "",
             "| guidance | pieces | style accuracy | mean overlap | overlap / ceiling | longest copy (max, median s) |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['guidance']:g} | {r['pieces']} | {pages.fmt(r['style_accuracy'])} | "
                     f"{pages.fmt(r['mean_overlap'])} | {pages.fmt(r['overlap_vs_ceiling'])} | "
                     f"{pages.fmt(r['longest_copy_s_max'])}, {pages.fmt(r['longest_copy_s_median'])} |")
    return "\n".join(lines) + "\n"
