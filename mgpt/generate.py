"""Generate music from a trained run: MIDI, piano rolls, audio and an HTML gallery.

    python -m mgpt.generate --workdir=runs/demo --output_dir=out/demo --style=all --num_samples=8 --audio

Piece i of a command gets style `styles[i % len(styles)]` and seed `--seed + i`, so a
piece depends only on its index and the flags, never on batch size, device count or
how often the command was interrupted. Each piece is written as `NNNNN_STYLE.mid`
(+ `.png`, + `.wav` with --audio) and then one line is appended to `manifest.jsonl`;
re-running the same command skips pieces already listed there, so a killed job
resumes where it stopped. `index.html` is rewritten at the end.

`--guidance=G` strengthens the requested style by classifier-free guidance (mgpt.sample.sampler;
the model must have been trained with data.style_dropout > 0, and such a model samples with
G = 1.5 unless told otherwise; G = 1 is plain sampling). The copy guard
(`--max_copy_seconds=X`, default 8, 0 = off) searches each finished piece against the
training set (mgpt.music.originality, transposition-aware; the index is cached beside the
dataset) and re-draws a piece that copies X seconds or more with a new seed, up to
`--copy_tries` draws in all. Each manifest line records the piece's longest copied span
(seconds, notes, training piece) and whether it is still over the limit.

Hard limits hold on every sampled event, by masking (mgpt/sample/limits.py):
`--pitch_range=48-72` (MIDI pitches), `--max_polyphony=3` (notes sounding at once) and
`--velocity_range=40-90` (MIDI velocities). The primer's own notes are kept as they are; those
still sounding count towards the polyphony of the notes the model adds.

Controls (a model trained with data.control_seconds > 0): `--controls="density=6,register=low"`,
or a timeline that changes mid-piece, `--controls="0:density=2;20:density=6,loudness=7"`, and
`--mood=calm|happy|tense|sad` (mgpt/sample/controls.py has the table). The sampler writes the
control tokens at each segment's opening; controls not given are the model's to choose.

`--infill=FILE.mid --infill_start=S --infill_end=E` (seconds) keeps the file outside [S, E)
and fills the gap: the model (trained with data.fim_rate > 0) reads the music before S, the
music from E on and the gap's length, and writes a middle that lasts exactly E - S and
leaves sounding at E just the notes the file has sounding there (mgpt/sample/fim.py). Each sample
is the whole joined piece; the piano roll marks the gap.

Pieces run under continuous batching: a slot whose piece ends takes the next piece of the plan
inside the compiled loop, and pieces are written as they finish (a kill loses only those in
flight). `--context=reprefill` (the default) gives each piece whose window fills a re-prefilled
next window (STYLE, the notes still sounding, its latest events); `--context=rolling` decodes it
through a rolling KV cache whose sink is the STYLE token instead. Hard limits, `--controls`,
`--mood` and `--infill` run the windowed sampler, batch by batch, whatever `--context` says (the
continuous one does not have them yet).

Batches of `--batch_size` rows run on every local device at once (one sampler call
per device, from host threads: pieces are independent, so no device waits for
another). On a multi-host pod each host takes the piece indices i with
i % num_hosts == host and writes its own `manifest-HHHHH-of-NNNNN.jsonl`; host 0
writes the gallery over all shards it can see.

The work is done by mgpt.sample.corpus (plan, manifests, resume, copy guard) and
mgpt.sample.run (the model, the `Run` API); this module is the command line only.
Notebooks: `from mgpt.sample.run import load_run` (the old `mgpt.generate.load_run` still works).
"""

from __future__ import annotations

import pathlib
import sys
import warnings
from collections.abc import Sequence

from mgpt import render
from mgpt.errors import (ExitOnInterrupt, UserError, is_disk_full, parse_command_flags, quiet_after_disk_full,
                         reported)
from mgpt.render import write_folder_gallery as write_gallery
from mgpt.sample.corpus import (DEFAULT_BATCH_SIZE, DEFAULT_COPY_TRIES, DEFAULT_MAX_COPY_SECONDS, check_output_dir,
                                check_copy_guard, generate_corpus)
from mgpt.sample.sampler import CONTEXTS
from mgpt.sample.run import (DEFAULT_CONTEXT, DEFAULT_GUIDANCE, DEFAULT_MAX_EVENTS, NOTE_GUARD_PERCENTILE, UNCONDITIONAL, Sampling,
                             check_infill_model, check_infill_times, define_guard_flags, guard_settings, load_infill,
                             keep_compiled, load_primer, load_run, _check_primer_seconds, read_run_info,
                             resolve_styles)

# Names notebooks and scripts imported from here before the library moved to mgpt.sample; kept so
# `from mgpt.generate import load_run` keeps working. New code imports mgpt.sample.run / .corpus.
from mgpt.render import read_all_manifests  # noqa: F401
from mgpt.sample.corpus import CopyGuard, Piece, _write_piece, manifest_name, plan, redraw_seed  # noqa: F401
from mgpt.sample.run import (ALL_STYLES, FALLBACK_MAX_NOTE_SECONDS, Infill, Run, dataset_note_seconds,  # noqa: F401
                             decode, local_dataset, style_token)

# ----------------------------------------------------------------------------- command line


def define_flags(fv):
    """The command's flags, on their own FlagValues `fv`: mgpt.evaluate, which imports this
    module, defines flags of the same names for itself."""
    from absl import flags

    kw = {"flag_values": fv}
    flags.DEFINE_string("workdir", None, "Training run directory (or its checkpoints/ or one step dir).", **kw)
    flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step to load (default: the latest).", **kw)
    flags.DEFINE_string("output_dir", None, "Where the .mid/.png/.wav files, manifest.jsonl and index.html go.", **kw)
    flags.DEFINE_integer("num_samples", 4, "Pieces to generate (in total, over all hosts).", **kw)
    flags.DEFINE_string("style", UNCONDITIONAL,
                        "A style name, a comma list (cycled over pieces), 'all' (every style) or 'unconditional'.", **kw)
    flags.DEFINE_string("primer", None, "A MIDI file to continue; it is kept at the start of every piece.", **kw)
    flags.DEFINE_float("primer_seconds", 10.0, "Seconds of the primer to keep (0 = all of it).", **kw)
    flags.DEFINE_string("infill", None, "A MIDI file whose gap [--infill_start, --infill_end) the model fills; "
                        "everything outside the gap is kept. Needs a model trained with data.fim_rate > 0.", **kw)
    flags.DEFINE_float("infill_start", None, "--infill: where the gap starts, in seconds of the file.", **kw)
    flags.DEFINE_float("infill_end", None, "--infill: where the gap ends, in seconds of the file (after the start, "
                       "at most where its music ends).", **kw)
    flags.DEFINE_float("temperature", Sampling.temperature, "Softmax temperature (> 0).", **kw)
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely events (0 = off).", **kw)
    flags.DEFINE_float("top_p", Sampling.top_p,
                       "Nucleus sampling: the smallest set with this much probability (1 = off).", **kw)
    flags.DEFINE_float("min_p", 0.0, "Drop events less likely than min_p * the most likely one (0 = off).", **kw)
    flags.DEFINE_bool("greedy", False, "Always take the most likely event (after the filters).", **kw)
    flags.DEFINE_integer("seed", 0, "Piece i uses seed + i.", **kw)
    flags.DEFINE_integer("max_events", None,
                         f"New events per piece (default {DEFAULT_MAX_EVENTS} if no --max_seconds).", **kw)
    flags.DEFINE_float("max_seconds", None,
                       "Seconds of new music per piece (with --max_events: whichever ends first).", **kw)
    flags.DEFINE_float("max_note_seconds", None,
                       "Close any note that has sounded this long, at the next event (0 = off; default: the "
                       f"{NOTE_GUARD_PERCENTILE} note length of the style's training pieces, from the dataset's "
                       "build.json).", **kw)
    flags.DEFINE_float("guidance", None, "Classifier-free style guidance G >= 0: l_uncond + G (l_cond - l_uncond); "
                       f"1 = off. Default: {DEFAULT_GUIDANCE:g} for a model trained with data.style_dropout > 0 "
                       "(configs/small.py), else 1.", **kw)
    flags.DEFINE_string("pitch_range", None, "Hard limit: sampled notes only in pitches LO-HI (MIDI numbers, e.g. "
                        "48-72); held on every event by masking. The primer's notes are kept as they are.", **kw)
    flags.DEFINE_integer("max_polyphony", None, "Hard limit: at most this many notes sounding when a note is struck "
                         "(the primer's sounding notes count); held on every event by masking.", **kw)
    flags.DEFINE_string("velocity_range", None, "Hard limit: sampled notes only at velocities LO-HI (MIDI 1..127, "
                        "e.g. 40-90); held on every event by masking.", **kw)
    flags.DEFINE_string("controls", None, "Controls for a model trained with data.control_seconds > 0: "
                        "'density=6,register=low' for the whole piece, or a timeline '0:density=2;20:density=6,"
                        "loudness=7' (seconds). Controls: density, polyphony, register, loudness (levels 1..K, "
                        "low, mid, high or free), mode (major, minor, none or free).", **kw)
    flags.DEFINE_string("mood", None, "calm, happy, tense or sad, as controls (mgpt/sample/controls.py MOODS: "
                        "arousal -> density and loudness, valence -> mode); --controls overrides it.", **kw)
    define_guard_flags(flags, kw)
    flags.DEFINE_float("max_copy_seconds", DEFAULT_MAX_COPY_SECONDS,
                       "Copy guard: re-draw a piece that shares this many seconds with a training piece "
                       "(transposition-aware; 0 = off).", **kw)
    flags.DEFINE_integer("copy_tries", DEFAULT_COPY_TRIES,
                         "Copy guard: draws per piece before it is kept and marked copy_over_limit.", **kw)
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Pieces decoded at once per device.", **kw)
    flags.DEFINE_enum("context", DEFAULT_CONTEXT, list(CONTEXTS),
                      "What a piece reads past the model's window: 'rolling' (a rolling KV cache, and continuous "
                      "batching: a finished piece's slot takes the next one at once) or 'reprefill' (re-prefilled "
                      "windows, under the same continuous batching). docs/sampling.md compares them.", **kw)
    flags.DEFINE_bool("audio", False,
                      f"Render a WAV per piece with FluidSynth ({render.INSTALL_AUDIO}).", **kw)
    flags.DEFINE_string("soundfont", None, "A .sf2 soundfont for --audio (default: Debian's GM soundfonts).", **kw)
    flags.DEFINE_bool("progress", True, "Show a progress bar.", **kw)
    flags.DEFINE_enum("distributed", "auto", ["auto", "no"],
                      "Multi-host pods: 'auto' initialises jax.distributed when a cluster is detected.", **kw)


def run_command(f) -> pathlib.Path:
    """The command line's work, given parsed flags `f` (anything with the flag attributes)."""
    if not f.workdir or not f.output_dir:
        raise UserError("usage: python -m mgpt.generate --workdir=RUN --output_dir=OUT [--style=NAME|all] "
                        "[--num_samples=N] [--primer=FILE.mid | --infill=FILE.mid --infill_start=S --infill_end=E] [--audio]")
    sampling = Sampling(temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, min_p=f.min_p, greedy=f.greedy,
                        max_events=f.max_events, max_seconds=f.max_seconds, max_note_seconds=f.max_note_seconds,
                        guidance=f.guidance, pitch_range=f.pitch_range, max_polyphony=f.max_polyphony,
                        velocity_range=f.velocity_range, controls=f.controls, mood=f.mood,
                        context=f.context, **guard_settings(f))
    _check_primer_seconds(f.primer_seconds)
    check_copy_guard(f.max_copy_seconds, f.copy_tries)
    if f.audio:
        render.find_audio_tools(f.soundfont)
    # Everything a user can get wrong is checked before the weights are loaded.
    vocab, config, _ = read_run_info(f.workdir, f.checkpoint_step)
    styles = resolve_styles(vocab, f.style)
    sampling.check_limits(vocab)
    sampling.timeline(vocab)
    if f.primer:
        load_primer(f.primer, vocab, f.primer_seconds)
    infill = None
    if f.infill is not None or f.infill_start is not None or f.infill_end is not None:
        if not f.infill:
            raise UserError("--infill_start/--infill_end need --infill=FILE.mid")
        if f.primer:
            raise UserError("--infill and --primer cannot be combined: the file around the gap is the primer")
        check_infill_times(f.infill_start, f.infill_end)
        infill = load_infill(f.infill, vocab, f.infill_start, f.infill_end)
        check_infill_model(vocab, f.workdir)
        if not sampling.timeline(vocab).empty:
            raise UserError("--controls/--mood and --infill cannot be combined yet")
    check_output_dir(f.output_dir)
    import jax

    from mgpt.train import mesh

    mesh.maybe_initialize_distributed(f.distributed)
    keep_compiled(f.workdir, config)  # a second run on this model loads its sampler, not compiles it
    run = load_run(f.workdir, f.checkpoint_step)
    generate_corpus(
        run, f.output_dir, num_samples=f.num_samples, styles=styles, seed=f.seed, sampling=sampling,
        primer=f.primer, primer_seconds=f.primer_seconds, batch_size=f.batch_size, audio=f.audio,
        soundfont=f.soundfont, progress=f.progress, max_copy_seconds=f.max_copy_seconds, copy_tries=f.copy_tries,
        infill=infill,
    )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mgpt.generate: all pieces written")
    if jax.process_index() == 0:
        return write_gallery(f.output_dir)
    return pathlib.Path(f.output_dir)


@reported
def main(argv: Sequence[str] | None = None) -> None:
    from absl import flags, logging

    fv = flags.FlagValues()
    define_flags(fv)
    argv = list(sys.argv if argv is None else argv)
    if not parse_command_flags(fv, argv, "mgpt.generate", "\n\n".join(__doc__.split("\n\n")[:2])):
        return
    logging.set_verbosity(logging.ERROR)  # orbax logs every file it reads, and warns that a restore is read-only
    # pydub (imported by note-seq) warns about ffmpeg, which only its audio export needs.
    warnings.filterwarnings("ignore", "Couldn't find ffmpeg", RuntimeWarning)
    try:
        # Every piece its manifest lists is complete at any instant, so a Ctrl-C just ends the command.
        with ExitOnInterrupt(lambda: _interrupted_line(fv.output_dir, fv.num_samples), after_progress_bar=fv.progress):
            print(run_command(fv))
    except Exception as e:
        if not is_disk_full(e):
            raise
        quiet_after_disk_full()
        raise SystemExit(f"disk full writing {fv.output_dir}: every piece its manifest.jsonl lists is complete; "
                         "free some space and re-run the same command to write the rest") from None


def _interrupted_line(output_dir: str, num_samples: int) -> str:
    done = len(render.read_all_manifests(output_dir)) if pathlib.Path(output_dir).is_dir() else 0
    if not done:
        return f"interrupted: no piece was complete yet in {output_dir}; re-run the same command to start again"
    return (f"interrupted: {done} of {num_samples} pieces are complete in {output_dir} (its manifest lists them); "
            "re-run the same command to write the rest")


if __name__ == "__main__":
    main()
