"""Hard limits on a trained run, counted on the MIDI read back (docs/controls.md).

    python benchmarks/hard_limits.py runs/ctl_small          # 16 unconditional pieces of 20 s per setting

Per setting (no limits; pitch 55-76, at most 2 sounding, velocity 40-90; velocity 90-127 alone): the
notes, and those struck outside the pitch range, with more than 2 notes sounding (itself included),
or at a velocity outside the range asked for (40-90 where none is).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = [
    ("free", {}),
    ("limited", {"pitch_range": (55, 76), "max_polyphony": 2, "velocity_range": (40, 90)}),
    ("loud", {"velocity_range": (90, 127)}),
]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir")
    p.add_argument("--out", default=None, help="where the MIDI goes (default: WORKDIR/../hard_limits)")
    p.add_argument("--pieces", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0)
    a = p.parse_args(argv)

    import note_seq
    import numpy as np

    from mgpt.sample.run import load_run

    run = load_run(a.workdir)
    vocab = run.vocab
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.workdir)), "hard_limits")
    for name, limits in SETTINGS:
        ids = run.generate_ids("unconditional", a.pieces, seed=0, max_seconds=a.seconds, **limits)
        paths = run.write_midi(ids, os.path.join(out, name))
        pieces = [vocab.decode_notes(vocab.encode(note_seq.midi_file_to_note_sequence(str(x)))) for x in paths]
        lo, hi = limits.get("velocity_range", (40, 90))
        pitch = sum(int(np.sum((n.pitch < 55) | (n.pitch > 76))) for n in pieces)
        crowded = sum(int(np.sum((n.start_s <= s) & (n.end_s > s)) > 2) for n in pieces for s in n.start_s)
        velocity = sum(int(np.sum((n.velocity < lo) | (n.velocity > hi))) for n in pieces)
        print(f"{name}: {len(pieces)} pieces, {sum(len(n.pitch) for n in pieces)} notes; outside 55-76: {pitch}; "
              f"struck with more than 2 sounding: {crowded}; velocity outside {lo}-{hi}: {velocity}", flush=True)


if __name__ == "__main__":
    main()
