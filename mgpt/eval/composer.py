"""The one-composer study: a base run against its fine-tune on one composer's pieces.

NLL on that composer's test pieces (and on the others) and the style classifier's
verdict on pieces each run generates conditioned on that composer's style.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from data_prep.notes import crop
from data_prep.vocab import UNKNOWN_STYLE, normalize_label
from mgpt.errors import UserError
from mgpt.eval import pages
from mgpt.eval.inputs import Options, check_same_events, jsonable, load_split, model_from_run, resolve_dataset
from mgpt.eval.likelihood import model_nats, rates, windows
from mgpt.eval.references import fit_classifier


def composer_study(
    *,
    base_workdir: str,
    finetuned_workdir: str,
    composer: str,
    dataset_dir: str | None = None,
    num_samples: int = 8,
    max_seconds: float = 30.0,
    options: Options = Options(),
    log=print,
) -> dict:
    """Before/after a one-composer fine-tune: NLL on that composer's test pieces and the classifier's verdict.

    The composer's pieces are the test pieces whose composer or style label
    normalises to `composer`. Both runs generate `num_samples` pieces conditioned on
    that style; the classifier (trained on the base run's dataset, all styles)
    says which style each piece sounds like.
    """
    from mgpt.sample.run import Run

    target = normalize_label(composer)
    base_model, vocab, base_config = model_from_run("base", base_workdir)
    ft_model, ft_vocab, ft_config = model_from_run("finetuned", finetuned_workdir)
    if ft_vocab.tokens[: vocab.style_offset] != vocab.tokens[: vocab.style_offset]:
        raise UserError(f"--finetuned_workdir={finetuned_workdir}: its event vocabulary differs from the base run's")
    given = dataset_dir
    dataset_dir = resolve_dataset(dataset_dir or base_config.data.dataset_dir)
    check_same_events(vocab, dataset_dir, f"the model in {base_workdir}",
                               "--dataset_dir" if given else f"--workdir={base_workdir}'s config.data.dataset_dir")
    train, test = load_split(dataset_dir, "train"), load_split(dataset_dir, "test")
    is_mine = [target in (normalize_label(p.composer) if p.composer else "", p.style_name) for p in test]
    mine = [p for p, m in zip(test, is_mine) if m]
    others = [p for p, m in zip(test, is_mine) if not m]
    if not mine:
        raise UserError(f"--composer={composer}: no test pieces with that composer or style in {dataset_dir}")
    style = next(p.style_name for p in mine)
    labelled = [(vocab.decode_notes(p.tokens), p.style_name) for p in train if p.style_name != UNKNOWN_STYLE]
    # The classifier needs two labelled styles to tell apart; with fewer, only the NLL is measured.
    clf = fit_classifier(labelled, options, np.random.default_rng(options.seed)) \
        if len({s for _, s in labelled}) >= 2 else None

    result = {"composer": target, "style": style, "test_pieces": len(mine), "dataset_dir": str(dataset_dir),
              "real_test_classified_as_composer": None}
    if clf is not None:
        real_pred = clf.predict([crop(vocab.decode_notes(p.tokens), options.crop_seconds) for p in mine])
        result["real_test_classified_as_composer"] = float(np.mean([p == style for p in real_pred]))
    for name, (m, v, wd, config) in {"before": (base_model, vocab, base_workdir, base_config),
                                     "after": (ft_model, ft_vocab, finetuned_workdir, ft_config)}.items():
        log(f"composer study: {name} ({wd})")
        w = windows(mine, v, m.seq_len)
        nats, count = model_nats(m.model, w, m.seq_len, len(mine), options.batch_size)
        w_o = windows(others, v, m.seq_len)
        nats_o, count_o = model_nats(m.model, w_o, m.seq_len, len(others), options.batch_size) if others else (np.zeros(0), np.zeros(0, int))
        run = Run(model=m.model, vocab=v, config=config, step=m.step or 0, workdir=wd)
        rows = run.generate_ids(style if style in run.styles else "unconditional", num_samples, seed=options.seed,
                                max_seconds=max_seconds)
        pred = clf.predict([crop(v.decode_notes(r), options.crop_seconds) for r in rows]) if clf is not None else None
        result[name] = {
            "workdir": wd, "step": m.step, "tokens_seen": m.tokens_seen,
            "composer_test": rates(float(nats.sum()), int(count.sum())),
            "other_test": rates(float(nats_o.sum()), int(np.sum(count_o))),
            "samples": num_samples,
            "classified_as_composer": float(np.mean([p == style for p in pred])) if pred is not None else None,
            "verdicts": {s: int(sum(p == s for p in pred)) for s in sorted(set(pred))} if pred is not None else None,
        }
    return jsonable(result)


def write_composer_study(result: dict, output_dir: str | os.PathLike) -> str:
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "composer_study.json").write_text(json.dumps(result, indent=1))
    b, a = result["before"], result["after"]
    lines = [f"# One-composer fine-tune: {result['composer']}", "",
             f"{result['test_pieces']} test pieces of {result['composer']} (style {result['style']}) in "
             f"`{result['dataset_dir']}`; {b['samples']} samples per run conditioned on that style. "
             + (f"The classifier recognises {100 * result['real_test_classified_as_composer']:.0f}% of the composer's "
                "real test pieces (its ceiling)." if result["real_test_classified_as_composer"] is not None else
                "The dataset has fewer than two labelled styles, so no style classifier was fitted."), "",
             "| run | step | nats/event on composer's test pieces | nats/event on other test pieces | "
             "samples classified as the composer | classifier verdicts |", "|---|---|---|---|---|---|"]
    for name, r in (("before (base)", b), ("after (fine-tuned)", a)):
        lines.append(f"| {name} | {r['step']} | {pages.fmt(r['composer_test']['nats_per_event'])} | "
                     f"{pages.fmt(r['other_test']['nats_per_event'])} | "
                     + (f"{100 * r['classified_as_composer']:.0f}% | {r['verdicts']} |"
                        if r["classified_as_composer"] is not None else "- | - |"))
    text = "\n".join(lines) + "\n"
    (out / "composer_study.md").write_text(text)
    return text
