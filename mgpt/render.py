"""Generated pieces as files people use: MIDI, a piano-roll PNG, a WAV, an HTML gallery.

Everything here takes a NoteSequence (from `Vocabulary.decode`, which already makes any
id sequence well formed) or paths, so notebooks and the command line share it.

- MIDI through note-seq (`sequence_proto_to_midi_file`);
- piano rolls through matplotlib's Agg canvas (no display, no pyplot global state);
- audio through the `fluidsynth` command line and a General MIDI soundfont;
- `index.html`: one self-contained page (inline CSS, relative links, no scripts or
  external resources), so the output folder can be zipped, served or opened as a file.
"""

from __future__ import annotations

import html
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from data_prep import notes as notes_lib
from mgpt.errors import UserError

# Debian's GM soundfonts, smallest (fastest to load per piece) first.
SOUNDFONT_PATHS = (
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
)
INSTALL_AUDIO = "sudo apt-get install -y fluidsynth timgm6mb-soundfont"
SAMPLE_RATE = 44_100


class AudioToolsMissing(UserError, RuntimeError):
    """fluidsynth or a soundfont is not installed; the message says how to install them. Also a
    RuntimeError, as every audio failure a corpus outlives (one warning per piece)."""


# ----------------------------------------------------------------------------- MIDI


def playable(ns):
    """A copy of `ns` in which no two notes of one pitch (and instrument) overlap.

    MIDI cannot say which of two sounding notes of the same key a note-off ends, so
    players disagree, and a pile of them on one tick (easy for an undertrained model)
    overflows FluidSynth's event queue. A note that is struck again while it sounds
    ends where the new one starts; notes struck together become one (the longest,
    loudest). Notes of other pitches are untouched.
    """
    out = type(ns)()
    out.CopyFrom(ns)
    del out.notes[:]
    groups: dict[tuple, list] = {}
    for note in ns.notes:
        groups.setdefault((note.instrument, note.program, note.is_drum, note.pitch), []).append(note)
    kept = []
    for notes in groups.values():
        notes.sort(key=lambda n: (n.start_time, -n.end_time))
        merged = []
        for note in notes:
            if merged and note.start_time <= merged[-1].start_time:  # struck together: one note
                prev = merged[-1]
                prev.end_time = max(prev.end_time, note.end_time)
                prev.velocity = max(prev.velocity, note.velocity)
                continue
            if merged and note.start_time < merged[-1].end_time:  # struck again while sounding
                merged[-1].end_time = note.start_time
            copy = type(note)()
            copy.CopyFrom(note)
            merged.append(copy)
        kept.extend(merged)
    kept.sort(key=lambda n: (n.start_time, n.pitch))
    out.notes.extend(kept)
    return out


def write_midi(ns, path: str | os.PathLike) -> pathlib.Path:
    """NoteSequence -> a standard MIDI file at `path`, made `playable` first."""
    import note_seq

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")  # whole or absent: a resumed job trusts what it finds
    note_seq.sequence_proto_to_midi_file(playable(ns), str(tmp))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- piano roll


def piano_roll(ns, path: str | os.PathLike, *, title: str = "", primer_seconds: float = 0.0,
               gap: tuple[float, float] | None = None) -> pathlib.Path:
    """A piano-roll PNG: time (s) across, MIDI pitch up, darker = louder.

    A primer (the user's music the piece continues) is shaded, so the generated
    part is easy to tell apart; so is an infilled gap (start, end seconds).
    """
    return piano_rolls([(ns, title)], path, primer_seconds=primer_seconds, gap=gap)


def piano_rolls(panels, path: str | os.PathLike, *, primer_seconds: float = 0.0,
                gap: tuple[float, float] | None = None) -> pathlib.Path:
    """Piano rolls of [(NoteSequence, title), ...] stacked on one time axis, one PNG (e.g. before/after)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3 * len(panels)), dpi=100)
    FigureCanvasAgg(fig)
    # Everything the files hold, drums and undamped notes included: the picture is of the file.
    notes = [notes_lib.from_sequence(ns, apply_sustain=False, drop_drums=False) for ns, _ in panels]
    total_s = max([1.0] + [float(n.end_s.max()) for n in notes if len(n.end_s)])
    pitches = np.concatenate([n.pitch for n in notes])
    lo, hi = (int(pitches.min()), int(pitches.max())) if len(pitches) else (60, 72)
    for k, ((_, title), note) in enumerate(zip(panels, notes)):
        ax = fig.add_subplot(len(panels), 1, k + 1)
        _draw_roll(ax, note, lo, hi, total_s, primer_seconds, gap)
        if title:
            ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")  # a killed job never leaves half a PNG under the real name
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _draw_roll(ax, notes, lo: int, hi: int, total_s: float, primer_seconds: float, gap) -> None:
    from matplotlib.collections import PolyCollection

    pitch, velocity, start_s, end_s = notes
    if primer_seconds > 0:
        ax.axvspan(0, primer_seconds, color="#cfe3ff", zorder=0, label="primer")
    if gap is not None:
        ax.axvspan(gap[0], gap[1], color="#ffe2b8", zorder=0, label="infilled")
        for x in gap:
            ax.axvline(x, color="#d08000", lw=1.0, ls="--", zorder=1)
    if len(pitch):
        # One polygon per note: far faster than one patch per note for long pieces.
        verts_Nx4x2 = np.stack(
            [
                np.stack([start_s, pitch - 0.4], -1),
                np.stack([end_s, pitch - 0.4], -1),
                np.stack([end_s, pitch + 0.4], -1),
                np.stack([start_s, pitch + 0.4], -1),
            ],
            axis=1,
        )
        shade_N = 0.35 + 0.65 * np.clip(velocity / 127.0, 0, 1)
        colors = [(0.10 * (1 - s), 0.20 * (1 - s), 0.55 + 0.3 * (1 - s), 1.0) for s in shade_N.tolist()]
        ax.add_collection(PolyCollection(verts_Nx4x2, facecolors=colors, edgecolors="none", zorder=2))
    ax.set_xlim(0, total_s)
    ax.set_ylim(lo - 2, hi + 2)
    ax.set_xlabel("seconds")
    ax.set_ylabel("MIDI pitch")
    for c in range(0, 128, 12):  # octave lines at every C
        if lo - 2 <= c <= hi + 2:
            ax.axhline(c, color="#dddddd", lw=0.6, zorder=1)


# ----------------------------------------------------------------------------- audio


def find_audio_tools(soundfont: str | os.PathLike | None = None) -> tuple[str, pathlib.Path]:
    """(fluidsynth executable, soundfont path); raises AudioToolsMissing with the install line.

    `soundfont` picks a file; otherwise the Debian GM soundfonts are tried in order.
    """
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise AudioToolsMissing(f"--audio needs the fluidsynth program, which is not installed: {INSTALL_AUDIO}")
    if soundfont:
        sf = pathlib.Path(soundfont)
        if not sf.is_file():
            raise AudioToolsMissing(f"--soundfont={soundfont}: no such file")
        return exe, sf
    for candidate in SOUNDFONT_PATHS:
        if os.path.isfile(candidate):
            return exe, pathlib.Path(candidate)
    raise AudioToolsMissing(
        f"--audio needs a General MIDI soundfont (looked in {', '.join(SOUNDFONT_PATHS)}): "
        f"{INSTALL_AUDIO}, or pass --soundfont=FILE.sf2"
    )


def render_audio(
    midi_path: str | os.PathLike,
    wav_path: str | os.PathLike,
    *,
    soundfont: str | os.PathLike | None = None,
    sample_rate: int = SAMPLE_RATE,
    gain: float = 0.8,
    timeout_s: float = 600,
) -> pathlib.Path:
    """MIDI file -> 16-bit stereo WAV via `fluidsynth -F` (faster than real time, no sound card)."""
    exe, sf = find_audio_tools(soundfont)
    wav_path = pathlib.Path(wav_path)
    wav_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = wav_path.with_name(wav_path.name + ".part")
    # FluidSynth can keep rendering silence forever on pathological files: stop it once the
    # WAV is well past the MIDI file's own length.
    import mido

    try:
        midi_seconds = mido.MidiFile(midi_path).length
    except Exception as e:  # mido raises several types on unreadable files
        raise RuntimeError(f"{midi_path}: not a readable MIDI file ({e})") from None
    max_bytes = 44 + int((midi_seconds + 30) * sample_rate) * 4  # 16-bit stereo, 30 s of release
    cmd = [exe, "-n", "-i", "-q", "-g", str(gain), "-r", str(sample_rate), "-T", "wav", "-F", str(tmp), str(sf),
           str(midi_path)]
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: FluidSynth can print megabytes of warnings
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline or (tmp.is_file() and tmp.stat().st_size > max_bytes):
                    proc.kill()
                    proc.wait()
                    tmp.unlink(missing_ok=True)
                    raise RuntimeError(f"fluidsynth did not finish rendering {midi_path} "
                                       f"({midi_seconds:.0f} s of music); killed it")
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.seek(0)
        detail = [line for line in log.read().splitlines() if line.strip()]
    if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size <= 44:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"fluidsynth could not render {midi_path}: {detail[-1] if detail else 'no output'}")
    _trim_silence(tmp)
    os.replace(tmp, wav_path)  # a killed render never leaves a truncated WAV under the final name
    return wav_path


def _trim_silence(path: pathlib.Path, *, threshold: int = 3, keep_s: float = 0.5) -> None:
    """Cut the WAV's silent end: `fluidsynth -F` renders several seconds of it after the last note."""
    import wave

    with wave.open(str(path), "rb") as w:
        params = w.getparams()
        frames = w.readframes(params.nframes)
    if params.sampwidth != 2:
        return
    samples_TxC = np.frombuffer(frames, np.int16).reshape(-1, params.nchannels)
    audible_T = np.flatnonzero(np.abs(samples_TxC).max(axis=1) > threshold)
    last = int(audible_T[-1]) + 1 if len(audible_T) else 0
    keep = min(params.nframes, last + int(keep_s * params.framerate))
    if keep >= params.nframes:
        return
    with wave.open(str(path), "wb") as w:
        w.setparams(params)
        w.writeframes(samples_TxC[:keep].tobytes())


# ----------------------------------------------------------------------------- gallery

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem;background:#fafafa;color:#222}
h1{font-size:1.4rem;margin:0 0 .3rem} p.sub{color:#666;margin:0 0 1.5rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:1.2rem}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:1rem}
.card h2{font-size:1rem;margin:0 0 .5rem} .card img{width:100%;height:auto;display:block}
.card audio{width:100%;margin:.5rem 0}
.card table{font-size:.8rem;color:#444;border-collapse:collapse;margin-top:.4rem}
.card td{padding:.1rem .6rem .1rem 0;vertical-align:top} .card td:first-child{color:#888}
a.dl{font-size:.9rem}
"""

_SETTING_ORDER = ("style", "seed", "drawn_seed", "events", "seconds", "notes", "primer", "infill", "checkpoint_step")


def _copy_line(e: dict) -> str | None:
    """The copy guard's verdict on a manifest line, in words (None when it was not searched)."""
    c = e.get("copy")
    if not c:
        return None
    source = f" of training piece {c['train_piece_id']}" if c.get("train_piece_id") else ""
    line = f"{c['seconds']:.2f} s, {c['notes']} notes{source}"
    draws = len(e.get("copy_tries") or ())
    if draws > 1:
        line += f" (after {draws} draws)"
    return line + (" - OVER THE LIMIT" if e.get("copy_over_limit") else "")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items() if x is not None)
    return str(v)


def write_gallery(output_dir: str | os.PathLike, entries: Sequence[dict], *, title: str = "mgpt samples") -> pathlib.Path:
    """`output_dir/index.html` listing `entries` (manifest lines) in order.

    Each card shows the piano roll, an <audio> player when the piece's WAV exists,
    a download link for the MIDI file and the piece's settings. Paths in entries
    are relative to output_dir.
    """
    output_dir = pathlib.Path(output_dir)
    cards = []
    for e in entries:
        name = html.escape(e["file"])
        parts = [f'<div class="card" id="{html.escape(pathlib.Path(e["file"]).stem)}">', f"<h2>{name}</h2>"]
        if e.get("image") and (output_dir / e["image"]).is_file():
            alt = f"piano roll of {e['file']}"
            parts.append(f'<img src="{html.escape(e["image"])}" alt="{html.escape(alt)}" loading="lazy">')
        wav = e.get("audio") or str(pathlib.Path(e["file"]).with_suffix(".wav"))
        if (output_dir / wav).is_file():
            parts.append(f'<audio controls preload="none" src="{html.escape(wav)}"></audio>')
        parts.append(f'<a class="dl" href="{name}" download>download MIDI</a>')
        rows = [(k, e[k]) for k in _SETTING_ORDER if e.get(k) not in (None, "")]
        if _copy_line(e):
            rows.append(("longest copy", _copy_line(e)))
        rows.append(("sampling", e.get("settings", {})))
        parts.append("<table>" + "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows
        ) + "</table>")
        parts.append("</div>")
        cards.append("\n".join(parts))
    page = "\n".join([
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # Inline icon: otherwise browsers request /favicon.ico, which 404s (a console error).
        '<link rel="icon" href="data:,">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="sub">{len(entries)} pieces. Click a file name to download the MIDI.</p>',
        '<div class="grid">',
        *cards,
        "</div></body></html>",
        "",
    ])
    path = output_dir / "index.html"
    tmp = path.with_name("index.html.part")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Lines of a manifest.jsonl; a final line cut short by a kill is ignored."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def read_all_manifests(output_dir: str | os.PathLike) -> list[dict]:
    """Every host's manifest lines, one per piece index, in index order."""
    by_index = {}
    for path in sorted(pathlib.Path(output_dir).glob("manifest*.jsonl")):
        for entry in read_manifest(path):
            by_index.setdefault(entry["index"], entry)
    return [by_index[i] for i in sorted(by_index)]


def write_folder_gallery(output_dir: str | os.PathLike, title: str | None = None) -> pathlib.Path:
    """index.html over every manifest shard in output_dir (a mgpt.generate folder)."""
    entries = read_all_manifests(output_dir)
    return write_gallery(output_dir, entries, title=title or f"mgpt: {len(entries)} generated pieces")
