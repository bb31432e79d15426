"""Events per second per core: MIDI files -> event ids. Ours vs symusic vs plain note-seq vs MidiTok.

    python benchmarks/bench_tokenize.py                    # generated piano performances + music21 scores
    python benchmarks/bench_tokenize.py --midi_dir=/data/maestro-v3.0.0 --max_files=200

Systems, each over the same files, in one process (so per core), file reading included:
- ours: `data_prep.midi.read_midi` (the fast reader, note-seq's notes exactly, sustain
  applied) + `Vocabulary.encode_notes`: what `python -m data_prep.build` runs per piece;
- symusic: `symusic.Score` (a maintained C++ MIDI parser) used only as a parser, its
  non-drum notes fed to the same `Vocabulary.encode_notes`: the row that says whether
  our own reader (`data_prep.fastmidi`) still earns its place. symusic does not apply
  the sustain pedal as note-seq does, so on pedalled pieces its notes (and events)
  differ from ours; the figure is its parse speed, not a drop-in replacement;
- note-seq: `note_seq.midi_to_note_sequence` (pretty_midi) + `Vocabulary.encode`
  (note-seq's sustain): the same ids, the library way;
- MidiTok: `miditok.MIDILike` (symusic's C++ MIDI parser), 32 velocities, its default
  pitch range 21..108, one token stream per track.

Events are the ids (tokens) each system produces. Rates are CPU seconds of this
process (process_time), so other load on the machine does not distort them; the
wall-clock figure is printed beside. Folders:
- piano: generated piano performances, pedal and tempo changes (MAESTRO-like);
- scores: music21 corpus pieces written to MIDI by music21 (several tracks, no pedal);
- or --midi_dir: every *.mid/*.midi below a folder of your own.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from data_prep import midi, sources, synthetic  # noqa: E402
from data_prep.vocab import Vocabulary  # noqa: E402

warnings.filterwarnings("ignore")  # pretty_midi warns about tempo events off track 0


def make_piano_folder(folder: str, num_files: int, notes_per_file: int) -> list[str]:
    paths = []
    for seed in range(num_files):
        path = os.path.join(folder, f"piano{seed:03d}.mid")
        with open(path, "wb") as f:
            f.write(synthetic.piano_midi(seed, num_notes=notes_per_file))
        paths.append(path)
    return paths


def make_score_folder(folder: str, num_files: int) -> list[str]:
    """music21 corpus pieces as music21 writes them to MIDI (takes ~0.3 s per piece)."""
    from music21 import converter

    per = max(1, num_files // 3)
    items = sources.list_items(f"music21:bach:{per},palestrina:{per},ryansMammoth:{num_files - 2 * per}")
    paths = []
    for item in items:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            score = converter.parse(os.path.join(item.root, item.path), forceSource=True)
            data = sources.score_to_midi(score)
        path = os.path.join(folder, item.piece_id.replace("/", "_") + ".mid")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def ours(vocab: Vocabulary):
    def run(path: str) -> int:
        with open(path, "rb") as f:
            notes = midi.read_midi(f.read())
        return len(vocab.encode_notes(notes.pitch, notes.velocity, notes.start_s, notes.end_s))

    return run


def symusic_parser(vocab: Vocabulary):
    import numpy as np
    import symusic

    def run(path: str) -> int:
        score = symusic.Score(path, ttype="second")
        tracks = [t.notes.numpy() for t in score.tracks if not t.is_drum]
        if not tracks:
            return 0
        pitch = np.concatenate([t["pitch"] for t in tracks])
        velocity = np.concatenate([t["velocity"] for t in tracks])
        start_s = np.concatenate([t["time"] for t in tracks])
        end_s = start_s + np.concatenate([t["duration"] for t in tracks])
        return len(vocab.encode_notes(pitch, velocity, start_s, end_s))

    return run


def plain_note_seq(vocab: Vocabulary):
    import note_seq

    def run(path: str) -> int:
        with open(path, "rb") as f:
            return len(vocab.encode(note_seq.midi_to_note_sequence(f.read())))

    return run


def miditok_midilike():
    import miditok
    import symusic

    tokenizer = miditok.MIDILike(miditok.TokenizerConfig(num_velocities=32, pitch_range=(21, 109)))

    def run(path: str) -> int:
        seqs = tokenizer.encode(symusic.Score(path))
        return sum(len(s.ids) for s in seqs) if isinstance(seqs, list) else len(seqs.ids)

    return run


def measure(run, paths: list[str], repeats: int) -> tuple[float, float, int]:
    """Best of `repeats` passes: (events per CPU second, events per wall second, events)."""
    run(paths[0])  # warm up: imports, caches
    best = None
    for _ in range(repeats):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        events = sum(run(p) for p in paths)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        if best is None or cpu < best[0]:
            best = (cpu, wall, events)
    cpu, wall, events = best
    return events / cpu, events / wall, events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--midi_dir", help="benchmark on the MIDI files below this folder instead")
    parser.add_argument("--max_files", type=int, default=0, help="with --midi_dir: at most this many files")
    parser.add_argument("--num_piano", type=int, default=40, help="generated piano performances")
    parser.add_argument("--notes_per_file", type=int, default=3000)
    parser.add_argument("--num_scores", type=int, default=30, help="music21 scores (0: none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_note_seq", action="store_true", help="leave out plain note-seq (slow)")
    args = parser.parse_args()

    vocab = Vocabulary()
    systems = {"ours": ours(vocab), "symusic + ours": symusic_parser(vocab), "note-seq": plain_note_seq(vocab),
               "MidiTok MIDILike": miditok_midilike()}
    if args.skip_note_seq:
        del systems["note-seq"]

    with tempfile.TemporaryDirectory() as tmp:
        if args.midi_dir:
            paths = sorted(
                p
                for p in glob.glob(os.path.join(args.midi_dir, "**", "*"), recursive=True)
                if p.lower().endswith((".mid", ".midi"))
            )
            paths = [p for p in paths if _readable(p)]
            folders = {args.midi_dir: paths[: args.max_files] if args.max_files else paths}
        else:
            os.makedirs(os.path.join(tmp, "piano"))
            folders = {"piano": make_piano_folder(os.path.join(tmp, "piano"), args.num_piano, args.notes_per_file)}
            if args.num_scores:
                os.makedirs(os.path.join(tmp, "scores"))
                folders["scores"] = make_score_folder(os.path.join(tmp, "scores"), args.num_scores)

        print(f"{'folder':<10} {'files':>5} {'system':<18} {'events':>10} {'events/s/core':>14} {'wall events/s':>14}")
        for name, paths in folders.items():
            rates = {}
            for system, run in systems.items():
                cpu_rate, wall_rate, events = measure(run, paths, args.repeats)
                rates[system] = cpu_rate
                print(f"{name:<10} {len(paths):>5} {system:<18} {events:>10,} {cpu_rate:>14,.0f} {wall_rate:>14,.0f}")
            ratio = rates["ours"] / rates["MidiTok MIDILike"]
            line = (f"{name}: ours / MidiTok = {ratio:.2f}x per core; "
                    f"ours / (symusic + ours) = {rates['ours'] / rates['symusic + ours']:.2f}x")
            if "note-seq" in rates:
                line += f"; ours / plain note-seq = {rates['ours'] / rates['note-seq']:.1f}x"
            print(line)


def _readable(path: str) -> bool:
    """Only files both sides can read: junk is the build's business, not the benchmark's."""
    try:
        with open(path, "rb") as f:
            midi.read_midi(f.read())
        return True
    except midi.SkipPiece:
        return False


if __name__ == "__main__":
    main()
