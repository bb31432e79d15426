"""GPT against the LSTM at equal tokens: validation, test, and test without its outlier piece, per seed.

    python -m mgpt.train --config=configs/small.py --workdir=runs/gpt_s0
    python -m mgpt.train --config=configs/small.py --workdir=runs/gpt_s1 --config.seed=1
    python -m mgpt.train --config=configs/lstm.py:small --workdir=runs/lstm_s0
    python -m mgpt.train --config=configs/lstm.py:small --workdir=runs/lstm_s1 --config.seed=1
    python benchmarks/recipe.py --gpt=runs/gpt_s0,runs/gpt_s1 --lstm=runs/lstm_s0,runs/lstm_s1

Every run is scored exactly as `mgpt.evaluate`'s likelihood section scores it (whole pieces,
cut into the model's windows, no transposition). The outlier is the test piece that holds most
of a train-fitted n-gram's nats (mgpt.eval.likelihood.outlier_index): the same piece for every
model. Each run's five worst test pieces are listed, so the next outlier is seen at once, and
its validation nats per event by what is predicted (NOTE_ON, NOTE_OFF, TIME_SHIFT, VELOCITY), so
a gap between two models shows where it is.

Last line, for scripts:
`recipe: GPT/LSTM validation R1 x, test without outlier R2 x, test R3 x (mean of N seeds)`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def score(workdirs: list[str], kind: str, dataset_dir: str | None) -> tuple[list[dict], dict]:
    from mgpt.eval.inputs import Options, load_split, model_from_run, resolve_dataset
    from mgpt.eval.likelihood import likelihood_section, model_nats, windows

    out = []
    outlier = None
    for w in workdirs:
        model, vocab, config = model_from_run(kind, w)
        dataset = resolve_dataset(dataset_dir or config.data.dataset_dir)
        train, test = load_split(dataset, "train"), load_split(dataset, "test")
        validation = load_split(dataset, "validation")
        lik = likelihood_section(vocab, train, test, [model], Options(), log=lambda *a: None,
                                 validation=validation)
        m = lik["models"][kind]
        outlier = lik.get("outlier")
        by_kind: dict = {}
        model_nats(model.model, windows(validation, vocab, model.seq_len), model.seq_len, len(validation),
                   by_kind=(vocab, by_kind))
        out.append({"workdir": w, "seed": int(config.seed), "params": m["params"], "tokens": m["tokens_seen"],
                    "validation": m["validation"]["nats_per_event"], "test": m["nats_per_event"],
                    "without_outlier": m["without_outlier"]["nats_per_event"],
                    "outlier": m["outlier"]["nats_per_event"], "worst": m["worst_pieces"],
                    "by_kind": {k: (n / c, c) for k, (n, c) in by_kind.items() if c}})
    return out, outlier


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpt", required=True, help="comma-separated GPT run folders (one per seed)")
    p.add_argument("--lstm", required=True, help="comma-separated LSTM run folders (one per seed)")
    p.add_argument("--dataset_dir", default=None, help="default: the runs' own dataset")
    a = p.parse_args(argv)
    gpt, outlier = score(a.gpt.split(","), "gpt", a.dataset_dir)
    lstm, _ = score(a.lstm.split(","), "lstm", a.dataset_dir)
    if outlier:
        print(f"outlier: {outlier['piece_id']} ({outlier['style']}, {outlier['share_of_events']:.0%} of the test "
              "split's events)")
    print(f"{'run':<28} {'seed':>4} {'params':>10} {'tokens':>11} {'valid':>7} {'test':>7} {'test-out':>8} "
          f"{'outlier':>7}")
    for r in gpt + lstm:
        print(f"{r['workdir']:<28} {r['seed']:>4} {r['params']:>10,} {r['tokens']:>11,} {r['validation']:>7.4f} "
              f"{r['test']:>7.4f} {r['without_outlier']:>8.4f} {r['outlier']:>7.4f}")
    kinds = [k for k in gpt[0]["by_kind"] if k != "other"]
    print("validation nats per event, by what is predicted: "
          + ", ".join(f"{k} {gpt[0]['by_kind'][k][1]:,}" for k in kinds) + " events")
    for r in gpt + lstm:
        print(f"{r['workdir']:<28} " + " ".join(f"{k} {r['by_kind'][k][0]:.3f}" for k in kinds))
    for r in gpt + lstm:
        worst = ", ".join(f"{w['piece_id']} {w['nats_per_event']:.2f}" for w in r["worst"])
        print(f"worst test pieces of {r['workdir']}: {worst}")
    if {r["tokens"] for r in gpt} != {r["tokens"] for r in lstm}:
        print("warning: the GPT and LSTM runs did not see equal training tokens")
    mean = lambda runs, k: sum(r[k] for r in runs) / len(runs)
    ratios = {k: mean(gpt, k) / mean(lstm, k) for k in ("validation", "without_outlier", "test")}
    print(f"recipe: GPT/LSTM validation {ratios['validation']:.3f} x, test without outlier "
          f"{ratios['without_outlier']:.3f} x, test {ratios['test']:.3f} x (mean of {min(len(gpt), len(lstm))} seeds)")


if __name__ == "__main__":
    main()
