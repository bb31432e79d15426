"""Does the style classifier read register? Pieces moved whole to another register (docs/controls.md).

    python benchmarks/register_check.py runs/controls out/cost_s0 --seed=0

COST_DIR is a `--controls_sweep` output folder with its cost study's plain pieces (cost_plain/).
The style classifier of the cost study with the same --seed judges its plain pieces of --style, as
they are and moved whole (every pitch by the same interval) so that the mean pitch of their first
--seconds lies at --mean_pitch (67.4: register level 5 of the demo controls model, where steered
British/Irish tunes turn German). The real test pieces of the style are judged the same way. If
moving them changes little, the classifier does not tell the styles apart by register.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir")
    p.add_argument("cost_dir")
    p.add_argument("--seed", type=int, default=0, help="the cost study's --seed (it fits the classifier)")
    p.add_argument("--style", default="folk_british_irish")
    p.add_argument("--mean_pitch", type=float, default=67.4)
    p.add_argument("--seconds", type=float, default=20.0, help="the cost study's crop (20 s)")
    a = p.parse_args(argv)

    import pathlib

    import numpy as np

    from data_prep.notes import Notes, crop
    from mgpt.eval.controls_sweep import notes_of_midi
    from mgpt.eval.inputs import Options, load_split, resolve_dataset
    from mgpt.eval.references import references
    from mgpt.sample.run import load_run

    run = load_run(a.workdir)
    vocab = run.vocab
    folder = pathlib.Path(a.cost_dir) / "cost_plain"
    paths = sorted(folder.glob("piece_*.mid"))
    if not paths:
        sys.exit(f"register_check: no cost_plain/piece_*.mid in {a.cost_dir} (run --controls_sweep with "
                 "--controls_cost_samples > 0 first)")
    if run.dataset_dir is None:
        sys.exit(f"register_check: the dataset of {a.workdir} is not on this machine")
    dataset = resolve_dataset(run.dataset_dir)
    train, test = load_split(dataset, "train"), load_split(dataset, "test")
    refs = references(vocab, train, test, Options(crop_seconds=a.seconds, seed=a.seed),
                      np.random.default_rng(a.seed), log=lambda *_: None)
    # The cost study (--style=unconditional) cycles the model's styles over its pieces, in this order.
    styles = [s for s in run.styles if s != "unconditional"]
    generated = [n for i, n in enumerate(notes_of_midi(vocab, paths))
                 if styles[i % len(styles)] == a.style and len(n)]
    real = [vocab.decode_notes(p.tokens) for p in test if p.style_name == a.style]

    def moved(notes):
        k = int(round(a.mean_pitch - float(np.mean(crop(notes, a.seconds).pitch))))
        return Notes(np.clip(notes.pitch + k, 0, 127), notes.velocity, notes.start_s, notes.end_s)

    def read_as_style(pieces) -> float:
        return float(np.mean([got == a.style for got in refs.classifier.predict([crop(n, a.seconds) for n in pieces])]))

    print(f"{a.style}, read as such: plain pieces {read_as_style(generated):.2f} -> moved to mean pitch "
          f"{a.mean_pitch:g} {read_as_style([moved(n) for n in generated]):.2f} ({len(generated)} pieces); "
          f"real test pieces {read_as_style(real):.2f} -> {read_as_style([moved(n) for n in real]):.2f} "
          f"({len(real)} pieces)")


if __name__ == "__main__":
    main()
