"""Evaluate a trained run: likelihood vs baselines, musical statistics, style fidelity, originality.

    python -m mgpt.evaluate --workdir=runs/demo --output_dir=out/eval [--num_samples=24 --style=all]
    python -m mgpt.evaluate --workdir=runs/demo --output_dir=out/eval --generated_dir=out/demo
    python -m mgpt.evaluate --workdir=runs/demo --output_dir=out/eval --lstm_workdir=runs/lstm
    python -m mgpt.evaluate --compare out/eval_a out/eval_b
    python -m mgpt.evaluate --workdir=runs/demo --output_dir=out/guidance --guidance_sweep=1,1.5,2,3
    python -m mgpt.evaluate --workdir=runs/ctl --output_dir=out/controls --controls_sweep --num_samples=8
    python -m mgpt.evaluate --workdir=runs/demo --finetuned_workdir=runs/bach --composer=bach --output_dir=out/bach

The first form generates pieces with `mgpt.generate` into OUTPUT_DIR/generated (with
its gallery), the second reads an existing generated folder (its manifest.jsonl).
Both write OUTPUT_DIR/report.json (every figure), report.md (tables), report.html
(tables and plots beside the gallery) and the PNGs. Sections:

- likelihood: nats/bits per event and perplexity on the test split (whole pieces,
  no transposition, cut into the run's seq_len windows that each start with the
  piece's conditioning token, exactly like the trainer's eval), overall and per
  style, for the GPT, an interpolated Kneser-Ney n-gram fitted on the train split
  and, with --lstm_workdir, an LSTM trained by the same trainer.
- features: per-piece musical statistics (mgpt.music.features) of generated pieces vs
  real test pieces (overlap area and KL, Yang & Lerch 2018), with train-vs-test as
  the ceiling, and a PNG per feature. Every piece is cut to its first
  --crop_seconds so that lengths match.
- style: a logistic-regression style classifier (mgpt.music.style_classifier) trained on
  the real train split; its accuracy on real test pieces (the ceiling) and on
  generated pieces against the style each was conditioned on; confusion matrices.
- originality: per generated piece the longest span copied from a training piece
  (notes and seconds; transposition-aware), the share of generated 8/16-note
  n-grams found in training next to the same share for real test pieces, and the
  pieces above --copy_threshold_s.
- validity: generated MIDI files that parse and contain notes.
- targets: the issue's targets, each with its value and whether it is met.

`--guidance_sweep=1,1.5,2,3` instead generates --num_samples pieces per style-guidance
value G (mgpt.sample) and reports, per G, the classifier's style accuracy, the mean
feature overlap (with its ceiling) and the longest copy, computed by the same sections,
with a plot of accuracy against overlap (guidance_sweep.md/.json/.png).

`--controls_sweep` (a model trained with data.control_seconds > 0) instead generates
--num_samples pieces of --max_seconds at each level of each control, the others left free, reads
them back as MIDI and reports per control the exact-bin and within-one-bin accuracy and Spearman's
rho between requested level and measured value, and, for timelines that change at
--controls_change_s, how many seconds the music takes to follow (mgpt/eval/controls_sweep.py;
controls_sweep.md/.json/.png).

`--compare A B` prints the headline figures of two reports (folders or report.json
files) side by side (as `python -m mgpt.eval.compare A B`).

This module is the command line only: the sections live in `mgpt.eval`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from collections.abc import Sequence

from mgpt.errors import UserError, reported
from mgpt.eval import compare, pages
from mgpt.eval.composer import composer_study, write_composer_study
from mgpt.eval.guidance import guidance_sweep, parse_guidances, write_guidance_sweep
from mgpt.eval.inputs import Options, check_same_events, load_split, model_from_run, read_generated, resolve_dataset
from mgpt.eval.report import evaluate


def define_flags(fv):
    """Flags on their own FlagValues: mgpt.generate, whose library this command uses, has
    flags of the same names."""
    from absl import flags

    from mgpt.sample import run as sample_run

    kw = {"flag_values": fv}
    flags.DEFINE_string("workdir", None, "The GPT run to evaluate.", **kw)
    flags.DEFINE_string("output_dir", None, "Where report.json/.md/.html and the PNGs go.", **kw)
    flags.DEFINE_string("generated_dir", None, "Evaluate these generated pieces (a mgpt.generate folder) "
                        "instead of generating into OUTPUT_DIR/generated.", **kw)
    flags.DEFINE_string("dataset_dir", None, "Dataset to evaluate on (default: the run's config.data.dataset_dir).", **kw)
    flags.DEFINE_string("lstm_workdir", None, "An LSTM baseline run (configs/lstm.py) to score beside the GPT.", **kw)
    flags.DEFINE_integer("num_samples", 24, "Pieces to generate (styles cycle over them).", **kw)
    flags.DEFINE_string("style", "all", "Styles to generate: a name, a comma list, 'all' or 'unconditional'.", **kw)
    flags.DEFINE_float("max_seconds", 30.0, "Seconds of music per generated piece.", **kw)
    flags.DEFINE_float("temperature", sample_run.Sampling.temperature, "Sampling temperature for generation.", **kw)
    flags.DEFINE_float("top_p", sample_run.Sampling.top_p, "Nucleus sampling for generation (1 = off).", **kw)
    flags.DEFINE_float("guidance", None, "Style guidance for generation (1 = off, the raw model; default: as "
                       "mgpt.generate, 1.5 for a model trained with style dropout).", **kw)
    flags.DEFINE_float("max_note_seconds", None, "Note-length guard for generation (0 = off, the raw model; "
                       "default: from the dataset, as mgpt.generate).", **kw)
    flags.DEFINE_string("controls", None, "Controls for generation, as mgpt.generate's --controls (a model trained "
                        "with control tokens): the report then measures what they cost.", **kw)
    flags.DEFINE_string("mood", None, "A mood for generation, as mgpt.generate's --mood.", **kw)
    sample_run.define_guard_flags(flags, kw)  # as mgpt.generate's, under --controls and in the controls sweep
    flags.DEFINE_integer("seed", 0, "Seed for generation and every subsample.", **kw)
    flags.DEFINE_integer("ngram_order", 5, "Order of the Kneser-Ney baseline.", **kw)
    flags.DEFINE_float("crop_seconds", 30.0, "Features and style use each piece's first this many seconds.", **kw)
    flags.DEFINE_float("copy_threshold_s", 8.0, "Flag generated pieces that copy at least this many seconds.", **kw)
    flags.DEFINE_integer("max_train_notes", 2_000_000, "Originality searches at most this many training notes.", **kw)
    flags.DEFINE_string("guidance_sweep", None, "Style guidance sweep, e.g. 1,1.5,2,3: per G, --num_samples pieces "
                        "and their style accuracy, feature overlap and longest copy (guidance_sweep.md/.json/.png).",
                        **kw)
    flags.DEFINE_bool("controls_sweep", False, "Controls sweep: per control and level, --num_samples pieces "
                      "of --max_seconds; adherence measured on the MIDI (mgpt/eval/controls_sweep.py).", **kw)
    flags.DEFINE_integer("controls_cost_samples", 48, "Controls sweep: pieces (styles cycling) generated plain and "
                         "asked for real test pieces' controls, for what controls cost in style accuracy and feature "
                         "overlap (0 = skip).", **kw)
    flags.DEFINE_bool("controls_cost_each", True, "Controls sweep: also generate the cost study's pieces asked for "
                      "each control alone, for what each costs by itself.", **kw)
    flags.DEFINE_enum("controls_cost_references", "test", ["test", "held_out"], "Controls sweep: whose controls "
                      "the cost study's steered pieces follow: the test split's pieces, or every held-out piece "
                      "(validation and test splits: more real timelines per style).", **kw)
    flags.DEFINE_float("controls_change_s", None, "Controls sweep: where its timelines change level (seconds; "
                       "default: half of --max_seconds).", **kw)
    flags.DEFINE_bool("compare", False, "Print two reports side by side: --compare RUN_A RUN_B.", **kw)
    flags.DEFINE_string("finetuned_workdir", None, "One-composer study: the fine-tuned run (with --composer).", **kw)
    flags.DEFINE_string("composer", None, "One-composer study: composer/style label of the fine-tune.", **kw)
    flags.DEFINE_bool("progress", True, "Progress bar while generating.", **kw)


def run_command(f, rest: Sequence[str]) -> str:
    from mgpt import render
    from mgpt.sample import corpus

    if f.compare:
        if len(rest) != 2:
            raise UserError("usage: python -m mgpt.evaluate --compare RUN_A RUN_B (report folders or report.json)")
        return compare.compare(*rest)
    if rest:
        raise UserError(f"unexpected arguments: {list(rest)}")
    if not f.workdir or not f.output_dir:
        raise UserError("usage: python -m mgpt.evaluate --workdir=RUN --output_dir=OUT [--generated_dir=DIR | "
                        "--num_samples=N --style=all] [--lstm_workdir=RUN]")
    corpus.check_output_dir(f.output_dir)  # before any model is loaded or piece generated
    options = Options(ngram_order=f.ngram_order, crop_seconds=f.crop_seconds, copy_threshold_s=f.copy_threshold_s,
                      max_train_notes=f.max_train_notes, seed=f.seed)
    if f.finetuned_workdir or f.composer:
        if not (f.finetuned_workdir and f.composer):
            raise UserError("the one-composer study needs both --finetuned_workdir and --composer")
        result = composer_study(base_workdir=f.workdir, finetuned_workdir=f.finetuned_workdir, composer=f.composer,
                                dataset_dir=f.dataset_dir, num_samples=f.num_samples, max_seconds=f.max_seconds,
                                options=options)
        return write_composer_study(result, f.output_dir)

    if f.guidance_sweep is not None:
        return _run_guidance_sweep(f, options)
    if f.controls_sweep:
        return _run_controls_sweep(f)
    if f.generated_dir and not render.read_all_manifests(f.generated_dir):  # fail before loading anything
        raise UserError(f"--generated_dir={f.generated_dir}: no manifest.jsonl with pieces there")
    start = time.perf_counter()
    gpt, vocab, config = model_from_run("gpt", f.workdir)
    models = [gpt]
    if f.lstm_workdir:
        lstm, lstm_vocab, _ = model_from_run("lstm", f.lstm_workdir)
        if lstm_vocab.tokens[: vocab.style_offset] != vocab.tokens[: vocab.style_offset]:
            raise UserError(f"--lstm_workdir={f.lstm_workdir}: its event vocabulary differs from the GPT run's")
        models.append(lstm)
    dataset_dir = resolve_dataset(f.dataset_dir or config.data.dataset_dir)
    _check_dataset_events(f, vocab, dataset_dir)
    if f.generated_dir:  # read first: unreadable pieces are refused before the dataset is loaded
        generated_dir = pathlib.Path(f.generated_dir)
        generated = _read_some_generated(generated_dir, vocab)
    train, test = load_split(dataset_dir, "train"), load_split(dataset_dir, "test")
    validation = load_split(dataset_dir, "validation")

    if not f.generated_dir:
        generated_dir = pathlib.Path(f.output_dir) / "generated"
        run, styles, sampling = _sampling_run(f, gpt, vocab, config, dataset_dir)
        print(f"generating {f.num_samples} pieces into {generated_dir}", flush=True)
        # The copy guard stays off: the report measures what the model copies by itself.
        corpus.generate_corpus(run, generated_dir, num_samples=f.num_samples, styles=styles, seed=f.seed,
                                 sampling=sampling, progress=f.progress, max_copy_seconds=0)
        render.write_folder_gallery(generated_dir)
        generated = _read_some_generated(generated_dir, vocab)

    report = evaluate(vocab=vocab, train=train, test=test, validation=validation, generated=generated, models=models,
                      options=options, output_dir=f.output_dir)
    report["meta"].update(workdir=str(f.workdir), step=gpt.step, dataset_dir=str(dataset_dir),
                          generated_dir=str(generated_dir), lstm_workdir=f.lstm_workdir,
                          total_seconds=time.perf_counter() - start)
    pages.write_report(report, f.output_dir, generated_dir)
    lines = [f"{t['target']}: {pages.fmt(t['value'])} ({'met' if t['met'] else 'NOT met'})" for t in report["targets"]]
    return "\n".join(lines + [str(pathlib.Path(f.output_dir) / "report.html")])


def _read_some_generated(generated_dir: pathlib.Path, vocab):
    generated = read_generated(generated_dir, vocab)
    if not any(g.valid for g in generated):  # the musical sections would have nothing to compare
        raise UserError(f"--generated_dir={generated_dir}: none of the {len(generated)} pieces its manifest lists "
                        "is a readable MIDI file with notes; regenerate them (python -m mgpt.generate)")
    return generated


def _check_dataset_events(f, vocab, dataset_dir) -> None:
    """The dataset's ids must mean the model's events, as the trainer insists: scored otherwise,
    a report is confidently wrong (a VELOCITY read as a TIME_SHIFT)."""
    field = "--dataset_dir" if f.dataset_dir else f"--workdir={f.workdir}'s config.data.dataset_dir"
    check_same_events(vocab, dataset_dir, f"the model in {f.workdir}", field)


def _sampling_run(f, gpt, vocab, config, dataset_dir):
    """(sample_run.Run, styles, Sampling) from the flags, for the pieces this command generates."""
    from mgpt.sample import run as sample_run

    # The guard's default is the training data's, as mgpt.generate's: the evaluation dataset's only
    # when the run's own is not on this machine or has no note-length table.
    note_seconds = (sample_run.dataset_note_seconds(config)
                    or sample_run.dataset_note_seconds({"data": {"dataset_dir": str(dataset_dir)}}))
    own = sample_run.local_dataset(config)  # the run's training split: --contrast_style's counts for older runs
    run = sample_run.Run(model=gpt.model, vocab=vocab, config=config, step=gpt.step, workdir=str(f.workdir),
                         note_seconds=note_seconds, dataset_dir=str(own) if own else None)
    styles = sample_run.resolve_styles(vocab, f.style)
    sampling = sample_run.Sampling(temperature=f.temperature, top_p=f.top_p, max_seconds=f.max_seconds,
                                 max_note_seconds=f.max_note_seconds, guidance=f.guidance,
                                 **sample_run.guard_settings(f))
    if f.controls or f.mood:
        sampling = dataclasses.replace(sampling, controls=f.controls, mood=f.mood)
        sampling.timeline(vocab)  # one line before anything is generated: an unknown control, a model without them
    return run, styles, sampling


def _run_guidance_sweep(f, options: Options) -> str:

    guidances = parse_guidances(f.guidance_sweep)
    if f.generated_dir:
        raise UserError("--guidance_sweep generates its own pieces; leave out --generated_dir")
    gpt, vocab, config = model_from_run("gpt", f.workdir)
    dataset_dir = resolve_dataset(f.dataset_dir or config.data.dataset_dir)
    _check_dataset_events(f, vocab, dataset_dir)
    train, test = load_split(dataset_dir, "train"), load_split(dataset_dir, "test")
    run, styles, sampling = _sampling_run(f, gpt, vocab, config, dataset_dir)
    result = guidance_sweep(run=run, vocab=vocab, train=train, test=test, guidances=guidances,
                            num_samples=f.num_samples, styles=styles, sampling=sampling, options=options,
                            output_dir=f.output_dir, progress=f.progress)
    text = write_guidance_sweep(result)
    (pathlib.Path(f.output_dir) / "guidance_sweep.md").write_text(text)
    return text + str(pathlib.Path(f.output_dir) / "guidance_sweep.png")


def _run_controls_sweep(f) -> str:
    from mgpt.eval.controls_sweep import controls_sweep, write_controls_sweep

    if f.generated_dir:
        raise UserError("--controls_sweep generates its own pieces; leave out --generated_dir")
    gpt, vocab, config = model_from_run("gpt", f.workdir)
    if vocab.controls is None:
        raise UserError(f"--controls_sweep: the model in {f.workdir} was trained without control tokens "
                        "(data.control_seconds = 0)")
    dataset_dir = resolve_dataset(f.dataset_dir or config.data.dataset_dir)
    run, styles, sampling = _sampling_run(f, gpt, vocab, config, dataset_dir)
    style = styles[0] if f.style != "all" else "unconditional"
    change = f.controls_change_s if f.controls_change_s is not None else f.max_seconds / 2
    try:
        result = controls_sweep(run=run, vocab=vocab, num_samples=f.num_samples, max_seconds=f.max_seconds,
                                sampling=sampling, output_dir=f.output_dir, style=style, seed=f.seed, change_s=change)
    except ValueError as e:
        raise UserError(str(e)) from None
    text = write_controls_sweep(result)
    if f.controls_cost_samples > 0:
        from mgpt.eval.controls_sweep import controls_cost, write_controls_cost

        _check_dataset_events(f, vocab, dataset_dir)
        train, test = load_split(dataset_dir, "train"), load_split(dataset_dir, "test")
        timelines_from = None if f.controls_cost_references == "test" else load_split(dataset_dir, "validation") + test
        cost_styles = [s for s in (styles if f.style != "unconditional" else run.styles) if s != "unconditional"]
        cost_seconds = max(f.max_seconds, 20.0)  # long enough for the style classifier and the features
        options = Options(crop_seconds=min(f.crop_seconds, cost_seconds), seed=f.seed)
        try:
            cost = controls_cost(run=run, vocab=vocab, train=train, test=test, num_samples=f.controls_cost_samples,
                                 styles=cost_styles, max_seconds=cost_seconds, sampling=sampling,
                                 options=options, output_dir=f.output_dir, each=f.controls_cost_each,
                                 timelines_from=timelines_from)
        except ValueError as e:
            raise UserError(str(e)) from None
        text += "\n" + write_controls_cost(cost)
    (pathlib.Path(f.output_dir) / "controls_sweep.md").write_text(text)
    return text + str(pathlib.Path(f.output_dir) / "controls_sweep.png")


@reported
def main(argv: Sequence[str] | None = None) -> None:
    from absl import flags, logging

    fv = flags.FlagValues()
    define_flags(fv)
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print("\n\n".join(__doc__.split("\n\n")[:2]) + "\n\n" + fv.module_help(fv.find_module_defining_flag("workdir")))
        return
    try:
        rest = fv(argv)[1:]
    except flags.Error as e:
        raise UserError(f"{e} (see python -m mgpt.evaluate --help)") from None
    logging.set_verbosity(logging.WARNING)
    print(run_command(fv, rest))


if __name__ == "__main__":
    main()
