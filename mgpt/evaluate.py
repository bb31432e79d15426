"""Evaluate a trained run: likelihood vs baselines, musical statistics, style fidelity, originality.

    python -m mgpt.evaluate --workdir=runs/demo --output_dir=out/eval [--num_samples=24 --style=all]
    python -m mgpt.evaluate --workdir=runs/demo --output_dir=out/eval --generated_dir=out/demo
    python -m mgpt.evaluate --workdir=runs/demo --output_dir=out/eval --lstm_workdir=runs/lstm
    python -m mgpt.evaluate --compare out/eval_a out/eval_b
    python -m mgpt.evaluate --workdir=runs/demo --output_dir=out/guidance --guidance_sweep=1,1.5,2,3
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
- features: per-piece musical statistics (mgpt.features) of generated pieces vs
  real test pieces (overlap area and KL, Yang & Lerch 2018), with train-vs-test as
  the ceiling, and a PNG per feature. Every piece is cut to its first
  --crop_seconds so that lengths match.
- style: a logistic-regression style classifier (mgpt.style_classifier) trained on
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

`--compare A B` prints the headline figures of two reports (folders or report.json
files) side by side.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_prep.vocab import UNKNOWN_STYLE, Vocabulary, normalize_label
from mgpt import features as F
from mgpt import ngram as ngram_lib
from mgpt import originality as orig
from mgpt import report as report_lib
from mgpt import style_classifier as sc
from mgpt.features import Notes

LN2 = math.log(2.0)


class UserError(ValueError):
    """A mistake in the flags or inputs; printed as one line."""


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Piece:
    """One real piece: its event ids (no STYLE/EOS) and labels ('' = none)."""

    tokens: np.ndarray
    style: str = ""
    composer: str = ""
    piece_id: str = ""

    @property
    def style_name(self) -> str:
        return normalize_label(self.style) if self.style else UNKNOWN_STYLE


def load_split(dataset_dir: str | os.PathLike, split: str) -> list[Piece]:
    """Every piece of one split of a data_prep dataset."""
    from mgpt import data as data_lib

    source = data_lib.open_source(dataset_dir, split)
    pieces = []
    for i in range(len(source)):
        r = source[i]
        text = data_lib.record_text
        pieces.append(Piece(np.asarray(r["tokens"], np.int32), text(r["style"]), text(r["composer"]), text(r["piece_id"])))
    return pieces


def crop(notes: Notes, seconds: float | None) -> Notes:
    """The notes starting in the first `seconds` (ends clipped there); None or 0 = all."""
    if not seconds:
        return notes
    pitch, velocity, start_s, end_s = notes
    keep = start_s < seconds
    return pitch[keep], velocity[keep], start_s[keep], np.minimum(end_s[keep], seconds)


def window_crop(notes: Notes, seconds: float, rng: np.random.Generator) -> Notes:
    """`seconds` of notes from a random offset, shifted to start at 0."""
    pitch, velocity, start_s, end_s = notes
    span = float(end_s.max()) if len(end_s) else 0.0
    if span <= seconds:
        return notes
    t0 = float(rng.uniform(0, span - seconds))
    keep = (start_s >= t0) & (start_s < t0 + seconds)
    return pitch[keep], velocity[keep], start_s[keep] - t0, np.minimum(end_s[keep], t0 + seconds) - t0


@dataclasses.dataclass
class Generated:
    """One generated piece read back from its MIDI file."""

    file: str
    style: str  # the style it was conditioned on ('unconditional' if none)
    notes: Notes
    valid: bool
    seconds: float


def read_generated(generated_dir: str | os.PathLike, vocab: Vocabulary) -> list[Generated]:
    """Pieces listed in generated_dir's manifest(s), read from their .mid files.

    Notes go through the vocabulary (encode, then decode_notes), so generated and
    real pieces are quantised identically. A file that does not parse or has no
    notes counts as invalid.
    """
    import note_seq

    from mgpt import generate

    generated_dir = pathlib.Path(generated_dir)
    entries = generate.read_all_manifests(generated_dir)
    if not entries:
        raise UserError(f"--generated_dir={generated_dir}: no manifest.jsonl with pieces there")
    out = []
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
    for e in entries:
        path = generated_dir / e["file"]
        try:
            ns = note_seq.midi_file_to_note_sequence(str(path))
            notes = vocab.decode_notes(vocab.encode(ns))
            valid = len(notes[0]) > 0
        except Exception:  # any parse failure means the same thing here: an invalid file
            notes, valid = empty, False
        seconds = float(notes[3].max()) if len(notes[3]) else 0.0
        out.append(Generated(e["file"], str(e.get("style", "unconditional")), notes, valid, seconds))
    return out


# ----------------------------------------------------------------------------- likelihood


def windows(pieces: Sequence[Piece], vocab: Vocabulary, seq_len: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(piece index, tokens, predicted) windows covering each piece's events + EOS once.

    The trainer's own eval cut (`mgpt.data.piece_segments`): each window starts with the
    piece's conditioning token, plus the VELOCITY in force when it starts mid-piece; those
    are given, never predicted. `predicted` is a bool per token.
    """
    from mgpt import data as data_lib

    out = []
    for i, p in enumerate(pieces):
        for seg in data_lib.piece_segments(np.asarray(p.tokens, np.int32), p.style, vocab, seq_len):
            out.append((i, seg["tokens"], seg["loss"].astype(bool)))
    return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _target_log_probs(graphdef, state, inputs_BxL, targets_BxL):
    """log P(target) at every position, float32 BxL."""
    logits_BxLxV = nnx.merge(graphdef, state)(inputs_BxL).astype(jnp.float32)
    log_p_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    return jnp.take_along_axis(log_p_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]


def model_nats(model, wins: Sequence[tuple[int, np.ndarray, np.ndarray]], seq_len: int, num_pieces: int,
               batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per piece (nats, predicted tokens) under a model called as model(tokens_BxL) -> logits_BxLxV."""
    graphdef, state = nnx.split(model)
    nats = np.zeros(num_pieces)
    count = np.zeros(num_pieces, np.int64)
    for b in range(0, len(wins), batch_size):
        chunk = wins[b : b + batch_size]
        rows_BxL1 = np.zeros((batch_size, seq_len + 1), np.int32)  # fixed shape: one compile
        mask_BxL = np.zeros((batch_size, seq_len), bool)
        for r, (_, w, predicted) in enumerate(chunk):
            rows_BxL1[r, : len(w)] = w
            mask_BxL[r, : len(w) - 1] = predicted[1:]
        lp_BxL = np.asarray(_target_log_probs(graphdef, state, rows_BxL1[:, :-1], rows_BxL1[:, 1:]))
        for r, (i, _, predicted) in enumerate(chunk):
            nats[i] -= float(lp_BxL[r][mask_BxL[r]].astype(np.float64).sum())
            count[i] += int(predicted.sum())
    return nats, count


def ngram_nats(lm: ngram_lib.KneserNey, wins: Sequence[tuple[int, np.ndarray, np.ndarray]], num_pieces: int):
    nats = np.zeros(num_pieces)
    count = np.zeros(num_pieces, np.int64)
    for i, w, predicted in wins:
        nats[i] -= float(lm.log_probs(w)[predicted[1:]].sum())
        count[i] += int(predicted.sum())
    return nats, count


def _rates(nats: float, count: int) -> dict:
    npe = nats / count if count else float("nan")
    return {"nats_per_event": npe, "bits_per_event": npe / LN2, "perplexity": math.exp(npe) if count else float("nan"),
            "events": int(count)}


def likelihood_summary(nats: np.ndarray, count: np.ndarray, pieces: Sequence[Piece]) -> dict:
    """Overall and per-style rates (events include the EOS that ends each piece)."""
    out = _rates(float(nats.sum()), int(count.sum()))
    per_style = {}
    for style in sorted({p.style_name for p in pieces}):
        idx = [i for i, p in enumerate(pieces) if p.style_name == style]
        per_style[style] = {**_rates(float(nats[idx].sum()), int(count[idx].sum())), "pieces": len(idx)}
    out["per_style"] = per_style
    return out


def training_tokens(config, step: int) -> int:
    """Tokens (rows x seq_len) a run's optimizer has seen by `step`."""
    return int(step) * int(config.train.batch_size) * int(config.data.seq_len)


# ----------------------------------------------------------------------------- the evaluation


@dataclasses.dataclass
class Options:
    ngram_order: int = 5
    crop_seconds: float = 30.0  # features/classifier compare every piece's first crop_seconds
    copy_threshold_s: float = 8.0
    ngram_sizes: tuple[int, ...] = (8, 16)
    max_train_notes: int = 2_000_000  # originality index: training pieces are subsampled beyond this
    max_feature_pieces: int = 1000  # train pieces in the feature ceiling (subsampled beyond this)
    batch_size: int = 16
    seed: int = 0


@dataclasses.dataclass
class Model:
    """A model to score: `model(tokens_BxL) -> logits_BxLxV`, with its training facts."""

    name: str
    model: object
    vocab: Vocabulary  # its own: style ids may differ between runs, event ids may not
    seq_len: int
    params: int
    tokens_seen: int | None = None
    step: int | None = None
    workdir: str = ""


def _count_params(model) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def model_from_run(name: str, workdir: str) -> tuple[Model, Vocabulary, object]:
    """(Model, its vocabulary, its config) of a trained run's latest checkpoint."""
    from mgpt.train import restore_model

    model, vocab, config, step = restore_model(workdir)
    return Model(name, model, vocab, int(config.data.seq_len), _count_params(model), training_tokens(config, step),
                 step, str(workdir)), vocab, config


@dataclasses.dataclass
class References:
    """What generated pieces are judged against, built once from the real pieces (`references`)."""

    train: Sequence[Piece]
    test: Sequence[Piece]
    train_notes: list
    test_notes: list
    tables: dict  # feature tables of the real 'test' and (subsampled) 'train' pieces
    train_vs_test: dict  # the features' ceiling
    classifier: object  # sc.StyleClassifier fitted on the labelled train pieces, or None
    labelled: int  # labelled train pieces it saw
    styles: list  # the labelled styles
    index: orig.CopyIndex
    used: list  # train pieces in the index
    total_notes: int
    notes: list  # remarks for the report


def references(vocab: Vocabulary, train: Sequence[Piece], test: Sequence[Piece], o: Options,
               rng: np.random.Generator, log=print) -> References:
    """The feature ceiling, the style classifier and the copy index (rng draws in that order)."""
    notes = []
    log("features: per-piece statistics")
    train_notes = [vocab.decode_notes(p.tokens) for p in train]
    test_notes = [vocab.decode_notes(p.tokens) for p in test]
    feat_train_idx = np.arange(len(train))
    if len(train) > o.max_feature_pieces:
        feat_train_idx = np.sort(rng.choice(len(train), o.max_feature_pieces, replace=False))
        notes.append(f"features: train ceiling uses {o.max_feature_pieces} of {len(train)} train pieces")
    tables = {
        "test": F.feature_table([crop(n, o.crop_seconds) for n in test_notes]),
        "train": F.feature_table([crop(train_notes[i], o.crop_seconds) for i in feat_train_idx]),
    }
    train_vs_test = F.compare_sets(tables["train"], tables["test"], seed=o.seed)

    labelled = [(n, p.style_name) for n, p in zip(train_notes, train) if p.style_name != UNKNOWN_STYLE]
    styles_known = sorted({s for _, s in labelled})
    clf = None
    if len(styles_known) >= 2:
        log(f"style: classifier on {len(labelled)} labelled train pieces, {len(styles_known)} styles")
        x = [crop(n, o.crop_seconds) for n, _ in labelled] + [window_crop(n, o.crop_seconds, rng) for n, _ in labelled]
        clf = sc.StyleClassifier(seed=o.seed).fit(x, [s for _, s in labelled] * 2)

    order = rng.permutation(len(train))
    used, total_notes = [], 0
    for i in order:
        if total_notes >= o.max_train_notes:
            break
        used.append(int(i))
        total_notes += len(train_notes[i][0])
    used.sort()
    if len(used) < len(train):
        notes.append(
            f"originality: searched {len(used)} of {len(train)} train pieces ({total_notes:,} notes; "
            f"--max_train_notes={o.max_train_notes:,}), so copies from the others are not found"
        )
    log(f"originality: suffix array over {total_notes:,} notes of {len(used)} train pieces")
    index = orig.CopyIndex([train_notes[i] for i in used], vocab.steps_per_second)
    return References(train, test, train_notes, test_notes, tables, train_vs_test, clf, len(labelled), styles_known,
                      index, used, total_notes, notes)


def _mean_of(cmp: dict, key: str) -> float:
    vals = [v[key] for v in cmp.values() if v.get(key) is not None and np.isfinite(v[key])]
    return float(np.mean(vals)) if vals else float("nan")


def feature_section(refs: References, valid_gen: Sequence[Generated], o: Options,
                    out_dir: pathlib.Path | None) -> dict:
    """Generated vs real test pieces, feature by feature, beside the train-vs-test ceiling
    (plots into out_dir unless None)."""
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
        "mean_overlap": {"generated_vs_test": _mean_of(gen_vs_test, "overlap"),
                         "train_vs_test": _mean_of(refs.train_vs_test, "overlap")},
        "mean_kl": {"generated_vs_test": _mean_of(gen_vs_test, "kl"), "train_vs_test": _mean_of(refs.train_vs_test, "kl")},
        "plots": plots,
    }


def style_section(refs: References, valid_gen: Sequence[Generated], o: Options, out_dir: pathlib.Path | None) -> dict:
    """The classifier's accuracy on real test pieces (the ceiling) and on generated pieces against
    the style each was conditioned on (confusion plot into out_dir unless None)."""
    clf = refs.classifier
    if clf is None:
        return {"skipped": f"needs >= 2 labelled styles in the train split, found {refs.styles}"}
    test_l = [(n, p.style_name) for n, p in zip(refs.test_notes, refs.test) if p.style_name in refs.styles]
    real = sc.score([s for _, s in test_l], clf.predict([crop(n, o.crop_seconds) for n, _ in test_l]), clf.labels)
    gen_l = [g for g in valid_gen if normalize_label(g.style) in refs.styles]
    gen_pred = clf.predict([crop(g.notes, o.crop_seconds) for g in gen_l])
    gen = sc.score([normalize_label(g.style) for g in gen_l], gen_pred, clf.labels)
    gen["verdicts"] = [{"file": g.file, "conditioned_on": g.style, "classified_as": p} for g, p in zip(gen_l, gen_pred)]
    if out_dir is not None:
        sc.plot_confusion({"real test": real, "generated": gen}, str(out_dir / "style_confusion.png"))
    return {
        "classifier": "logistic regression on musical features + pitch-class/interval n-gram histograms "
                      f"(first {o.crop_seconds:g} s of each piece; train pieces also as a transposed random window)",
        "styles": clf.labels,
        "train_pieces": refs.labelled,
        "real_test": real,
        "generated": gen,
        "plot": "style_confusion.png" if out_dir is not None else None,
    }


def originality_section(refs: References, valid_gen: Sequence[Generated], o: Options) -> dict:
    """Longest copies and n-gram reuse of the generated pieces, and of real test pieces (cut to
    the generated pieces' length) as the reference."""
    train, used = refs.train, refs.used
    gen_orig = orig.originality_report(refs.index, [g.notes for g in valid_gen], ngram_sizes=o.ngram_sizes,
                                       threshold_s=o.copy_threshold_s)
    for entry, g in zip(gen_orig["pieces"], valid_gen):
        entry["file"] = g.file
        tp = entry.pop("train_piece")
        entry["train_piece_id"] = train[used[tp]].piece_id if tp >= 0 else None
    gen_orig["flagged_files"] = [valid_gen[i].file for i in gen_orig["flagged"]]
    ref_seconds = max((g.seconds for g in valid_gen), default=o.crop_seconds) or o.crop_seconds
    test_orig = orig.originality_report(refs.index, [crop(n, ref_seconds) for n in refs.test_notes],
                                        ngram_sizes=o.ngram_sizes, threshold_s=o.copy_threshold_s)
    for entry, p in zip(test_orig["pieces"], refs.test):
        entry["piece_id"] = p.piece_id
        tp = entry.pop("train_piece")
        entry["train_piece_id"] = train[used[tp]].piece_id if tp >= 0 else None
    return {
        "method": "suffix array over (pitch interval, onset interval) steps of every train piece: transposition-aware, "
                  "same tempo; a span's seconds run from its first to its last onset",
        "train_pieces_searched": len(used),
        "train_pieces_total": len(train),
        "train_notes_searched": refs.total_notes,
        "test_reference_seconds": ref_seconds,
        "generated": gen_orig,
        "test": test_orig,
    }


def evaluate(
    *,
    vocab: Vocabulary,
    train: Sequence[Piece],
    test: Sequence[Piece],
    generated: Sequence[Generated],
    models: Sequence[Model],
    options: Options = Options(),
    output_dir: str | os.PathLike,
    log=print,
) -> dict:
    """Every section of the report (see the module docstring) as a JSON-ready dict; writes the PNGs."""
    o = options
    out_dir = pathlib.Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(o.seed)
    timings = {}
    report: dict = {"meta": {}, "likelihood": {}, "features": {}, "coherence": {}, "style": {}, "originality": {},
                    "validity": {}, "notes": []}
    if not test:
        raise UserError("the dataset has no test pieces: nothing to evaluate against")

    # ---- likelihood
    t0 = time.perf_counter()
    for m in models:
        if m.vocab.tokens[: vocab.style_offset] != vocab.tokens[: vocab.style_offset]:
            raise UserError(f"{m.workdir or m.name}: its event vocabulary differs from the dataset's")
    seq_len = models[0].seq_len if models else 512
    wins = windows(test, vocab, seq_len)
    lik = {}
    for m in models:
        mw = windows(test, m.vocab, m.seq_len)
        log(f"likelihood: {m.name} on {len(test)} test pieces")
        nats, count = model_nats(m.model, mw, m.seq_len, len(test), o.batch_size)
        lik[m.name] = {**likelihood_summary(nats, count, test), "params": m.params, "tokens_seen": m.tokens_seen,
                       "step": m.step, "seq_len": m.seq_len, "workdir": m.workdir}
    log(f"likelihood: {o.ngram_order}-gram Kneser-Ney fitted on {len(train)} train pieces")
    train_seqs = [np.concatenate([[vocab.style_id(p.style)], p.tokens, [vocab.eos_id]]) for p in train]
    lm = ngram_lib.KneserNey(o.ngram_order, vocab.size, pad_id=vocab.pad_id).fit(train_seqs)
    nats, count = ngram_nats(lm, wins, len(test))
    lik[f"ngram{o.ngram_order}"] = {**likelihood_summary(nats, count, test), "order": o.ngram_order,
                                    "discounts": lm.discounts, "seq_len": seq_len,
                                    "tokens_seen": int(sum(len(s) for s in train_seqs))}
    report["likelihood"] = {"split": "test", "pieces": len(test), "models": lik}
    timings["likelihood_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    refs = references(vocab, train, test, o, rng, log)
    report["notes"] += refs.notes
    timings["references_s"] = time.perf_counter() - t0

    # ---- musical features
    t0 = time.perf_counter()
    valid_gen = [g for g in generated if g.valid]
    report["features"] = feature_section(refs, valid_gen, o, out_dir)
    for name in F.SCALAR_FEATURES:
        if np.std(refs.tables["test"][name]) == 0:
            report["notes"].append(
                f"features: {name} is the same ({refs.tables['test'][name][0]:g}) in every real test piece (a property "
                "of the corpus, e.g. scores without dynamics), so its train-vs-test ceiling is trivially 1"
            )
    timings["features_s"] = time.perf_counter() - t0

    report["coherence"] = coherence_by_style(
        [(normalize_label(g.style), crop(g.notes, o.crop_seconds)) for g in valid_gen],
        [(p.style_name, crop(n, o.crop_seconds)) for n, p in zip(refs.test_notes, test)],
        o.crop_seconds,
    )

    # ---- style fidelity
    t0 = time.perf_counter()
    report["style"] = style_section(refs, valid_gen, o, out_dir)
    timings["style_s"] = time.perf_counter() - t0

    # ---- originality
    t0 = time.perf_counter()
    report["originality"] = originality_section(refs, valid_gen, o)
    timings["originality_s"] = time.perf_counter() - t0

    # ---- validity
    n_valid = sum(g.valid for g in generated)
    report["validity"] = {
        "files": len(generated),
        "valid": n_valid,
        "share": n_valid / len(generated) if generated else float("nan"),
        "invalid_files": [g.file for g in generated if not g.valid],
        "mean_seconds": float(np.mean([g.seconds for g in valid_gen])) if valid_gen else 0.0,
        "mean_notes": float(np.mean([len(g.notes[0]) for g in valid_gen])) if valid_gen else 0.0,
    }

    report["targets"] = targets(report)
    report["meta"].update(
        vocab_size=vocab.size, styles=vocab.styles, train_pieces=len(train), test_pieces=len(test),
        generated_pieces=len(generated), timings_s=timings, options=dataclasses.asdict(o),
    )
    return jsonable(report)


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
    from mgpt import generate

    o = options
    out_dir = pathlib.Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not test:
        raise UserError("the dataset has no test pieces: nothing to evaluate against")
    refs = references(vocab, train, test, o, np.random.default_rng(o.seed), log)
    ceiling = _mean_of(refs.train_vs_test, "overlap")
    rows, real_accuracy = [], None
    for g in guidances:
        folder = out_dir / f"guidance_{g:g}"
        log(f"guidance {g:g}: generating {num_samples} pieces into {folder}")
        generate.generate_corpus(run, folder, num_samples=num_samples, styles=styles, seed=o.seed,
                                 sampling=dataclasses.replace(sampling, guidance=float(g)), progress=progress,
                                 max_copy_seconds=0)  # measure the model, not the guard
        generate.write_gallery(folder)
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
             f"{report_lib.fmt(result['real_test_style_accuracy'])}; feature-overlap ceiling (train vs test): "
             f"{report_lib.fmt(result['overlap_ceiling'])}", "",
             "| guidance | pieces | style accuracy | mean overlap | overlap / ceiling | longest copy (max, median s) |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['guidance']:g} | {r['pieces']} | {report_lib.fmt(r['style_accuracy'])} | "
                     f"{report_lib.fmt(r['mean_overlap'])} | {report_lib.fmt(r['overlap_vs_ceiling'])} | "
                     f"{report_lib.fmt(r['longest_copy_s_max'])}, {report_lib.fmt(r['longest_copy_s_median'])} |")
    return "\n".join(lines) + "\n"


COHERENCE_TOLERANCE = 0.25  # a style is flagged when polyphony or mean note length is off by more
LONG_NOTE_SLACK = 0.03  # generated share of notes >= 4 s may exceed the real share by 3 points


def coherence_by_style(generated: Sequence[tuple[str, Notes]], real: Sequence[tuple[str, Notes]],
                       crop_seconds: float) -> dict:
    """Per style, the mean over pieces of F.note_coherence for generated and real test pieces,
    the generated/real ratios, and whether the style is off (by more than 25 % in polyphony or
    note length, or more than 3 points more notes >= 4 s)."""

    def means(pairs, style):
        rows = [F.note_coherence(n) for s, n in pairs if s == style and len(n[0])]
        return {"pieces": len(rows), **{k: float(np.mean([r[k] for r in rows])) if rows else None
                                          for k in F.COHERENCE}}

    per_style = {}
    for style in sorted({s for s, _ in generated} & {s for s, _ in real}):
        g, r = means(generated, style), means(real, style)
        if not g["pieces"] or not r["pieces"]:
            continue
        ratio = {k: g[k] / r[k] if r[k] else None for k in ("onset_polyphony", "mean_note_s")}
        off = [k for k, v in ratio.items() if v is None or abs(v - 1) > COHERENCE_TOLERANCE]
        if g["share_notes_ge_4s"] > r["share_notes_ge_4s"] + LONG_NOTE_SLACK:
            off.append("share_notes_ge_4s")
        per_style[style] = {"generated": g, "real": r, "ratio": ratio, "off": off}
    return {
        "crop_seconds": crop_seconds,
        "tolerance": COHERENCE_TOLERANCE,
        "long_note_slack": LONG_NOTE_SLACK,
        "per_style": per_style,
        "flagged_styles": [s for s, v in per_style.items() if v["off"]],
    }


def targets(report: dict) -> list[dict]:
    """The issue's targets for the demo model, each with its value and whether it is met."""
    out = []
    lik = report["likelihood"]["models"]
    gpt = lik.get("gpt", {}).get("nats_per_event")
    ng = next((v["nats_per_event"] for k, v in lik.items() if k.startswith("ngram")), None)
    if gpt is not None and ng:
        out.append({"target": "GPT NLL <= 0.75 x n-gram NLL", "value": gpt / ng, "goal": 0.75, "met": gpt / ng <= 0.75})
    if gpt is not None and "lstm" in lik:
        ratio = gpt / lik["lstm"]["nats_per_event"]
        a, b = lik["gpt"].get("tokens_seen"), lik["lstm"].get("tokens_seen")
        name = "GPT NLL <= 0.95 x LSTM NLL at equal training tokens"
        if a != b:  # still reported, but the comparison is not the one the target asks for
            name += f" (UNEQUAL: GPT {a:,} vs LSTM {b:,} tokens)"
        out.append({"target": name, "value": ratio, "goal": 0.95, "met": ratio <= 0.95 and a == b,
                    "equal_tokens": a == b})
    co = report.get("coherence", {}).get("per_style")
    if co:
        worst = max(abs(v - 1) for s in co.values() for v in s["ratio"].values() if v is not None)
        out.append({"target": "every style: polyphony and mean note length within 25% of real test pieces, "
                              "notes >= 4 s at most the real share + 3 points",
                    "value": worst, "goal": COHERENCE_TOLERANCE, "met": not report["coherence"]["flagged_styles"]})
    st = report.get("style", {})
    if "generated" in st and st["generated"]["count"]:
        acc, ceil = st["generated"]["accuracy"], st["real_test"]["accuracy"]
        out.append({"target": "style accuracy of conditioned samples >= 0.90", "value": acc, "goal": 0.9,
                    "met": acc >= 0.9})
        if ceil and np.isfinite(ceil):
            out.append({"target": "style accuracy >= 0.9 x classifier's real-test accuracy", "value": acc / ceil,
                        "goal": 0.9, "met": acc / ceil >= 0.9})
    og = report["originality"].get("generated")
    if og and og["pieces"]:
        out.append({"target": f"no generated piece copies more than {og['threshold_s']:g} s",
                    "value": og["longest_copy_s_max"], "goal": og["threshold_s"],
                    "met": og["longest_copy_s_max"] <= og["threshold_s"]})
    mo = report["features"].get("mean_overlap", {})
    g, c = mo.get("generated_vs_test"), mo.get("train_vs_test")
    if g is not None and c and np.isfinite(g):
        out.append({"target": "mean overlap area >= 0.85 x the train-vs-test ceiling", "value": g / c, "goal": 0.85,
                    "met": g / c >= 0.85})
    v = report["validity"]
    if v["files"]:
        out.append({"target": "100% of generated files valid", "value": v["share"], "goal": 1.0,
                    "met": v["share"] == 1.0})
    return out


def jsonable(x):
    """numpy scalars/arrays -> Python; NaN/inf -> None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# ----------------------------------------------------------------------------- one-composer study


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
    from mgpt import generate

    target = normalize_label(composer)
    base_model, vocab, base_config = model_from_run("base", base_workdir)
    ft_model, ft_vocab, ft_config = model_from_run("finetuned", finetuned_workdir)
    if ft_vocab.tokens[: vocab.style_offset] != vocab.tokens[: vocab.style_offset]:
        raise UserError(f"--finetuned_workdir={finetuned_workdir}: its event vocabulary differs from the base run's")
    dataset_dir = _resolve_dataset(dataset_dir or base_config.data.dataset_dir)
    train, test = load_split(dataset_dir, "train"), load_split(dataset_dir, "test")
    is_mine = [target in (normalize_label(p.composer) if p.composer else "", p.style_name) for p in test]
    mine = [p for p, m in zip(test, is_mine) if m]
    others = [p for p, m in zip(test, is_mine) if not m]
    if not mine:
        raise UserError(f"--composer={composer}: no test pieces with that composer or style in {dataset_dir}")
    style = next(p.style_name for p in mine)
    labelled = [(vocab.decode_notes(p.tokens), p.style_name) for p in train if p.style_name != UNKNOWN_STYLE]
    rng = np.random.default_rng(options.seed)
    x = [crop(n, options.crop_seconds) for n, _ in labelled] + [window_crop(n, options.crop_seconds, rng) for n, _ in labelled]
    clf = sc.StyleClassifier(seed=options.seed).fit(x, [s for _, s in labelled] * 2)

    real_pred = clf.predict([crop(vocab.decode_notes(p.tokens), options.crop_seconds) for p in mine])
    result = {"composer": target, "style": style, "test_pieces": len(mine), "dataset_dir": str(dataset_dir),
              "real_test_classified_as_composer": float(np.mean([p == style for p in real_pred]))}
    for name, (m, v, wd) in {"before": (base_model, vocab, base_workdir), "after": (ft_model, ft_vocab, finetuned_workdir)}.items():
        log(f"composer study: {name} ({wd})")
        w = windows(mine, v, m.seq_len)
        nats, count = model_nats(m.model, w, m.seq_len, len(mine), options.batch_size)
        w_o = windows(others, v, m.seq_len)
        nats_o, count_o = model_nats(m.model, w_o, m.seq_len, len(others), options.batch_size) if others else (np.zeros(0), np.zeros(0, int))
        run = generate.Run(model=m.model, vocab=v, step=m.step or 0, workdir=wd)
        rows = run.generate_ids(style if style in run.styles else "unconditional", num_samples, seed=options.seed,
                                max_seconds=max_seconds)
        pred = clf.predict([crop(v.decode_notes(r), options.crop_seconds) for r in rows])
        result[name] = {
            "workdir": wd, "step": m.step, "tokens_seen": m.tokens_seen,
            "composer_test": _rates(float(nats.sum()), int(count.sum())),
            "other_test": _rates(float(nats_o.sum()), int(np.sum(count_o))),
            "samples": num_samples,
            "classified_as_composer": float(np.mean([p == style for p in pred])),
            "verdicts": {s: int(sum(p == s for p in pred)) for s in sorted(set(pred))},
        }
    return jsonable(result)


def write_composer_study(result: dict, output_dir: str | os.PathLike) -> str:
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "composer_study.json").write_text(json.dumps(result, indent=1))
    b, a = result["before"], result["after"]
    lines = [f"# One-composer fine-tune: {result['composer']}", "",
             f"{result['test_pieces']} test pieces of {result['composer']} (style {result['style']}) in "
             f"`{result['dataset_dir']}`; {b['samples']} samples per run conditioned on that style. The classifier "
             f"recognises {100 * result['real_test_classified_as_composer']:.0f}% of the composer's real test pieces "
             "(its ceiling).", "",
             "| run | step | nats/event on composer's test pieces | nats/event on other test pieces | "
             "samples classified as the composer | classifier verdicts |", "|---|---|---|---|---|---|"]
    for name, r in (("before (base)", b), ("after (fine-tuned)", a)):
        lines.append(f"| {name} | {r['step']} | {report_lib.fmt(r['composer_test']['nats_per_event'])} | "
                     f"{report_lib.fmt(r['other_test']['nats_per_event'])} | {100 * r['classified_as_composer']:.0f}% | "
                     f"{r['verdicts']} |")
    text = "\n".join(lines) + "\n"
    (out / "composer_study.md").write_text(text)
    return text


# ----------------------------------------------------------------------------- command line


def _resolve_dataset(dataset_dir: str) -> pathlib.Path:
    from mgpt.train import ConfigError, resolve_dataset

    try:
        return pathlib.Path(str(resolve_dataset(dataset_dir)))
    except ConfigError as e:
        raise UserError(f"--dataset_dir: {e}") from None


def define_flags(fv):
    """Flags on their own FlagValues: mgpt.train defines --workdir on absl's global FLAGS."""
    from absl import flags

    from mgpt import generate

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
    flags.DEFINE_float("temperature", generate.Sampling.temperature, "Sampling temperature for generation.", **kw)
    flags.DEFINE_float("top_p", generate.Sampling.top_p, "Nucleus sampling for generation (1 = off).", **kw)
    flags.DEFINE_float("max_note_seconds", None, "Note-length guard for generation (0 = off, the raw model; "
                       "default: from the dataset, as mgpt.generate).", **kw)
    flags.DEFINE_integer("seed", 0, "Seed for generation and every subsample.", **kw)
    flags.DEFINE_integer("ngram_order", 5, "Order of the Kneser-Ney baseline.", **kw)
    flags.DEFINE_float("crop_seconds", 30.0, "Features and style use each piece's first this many seconds.", **kw)
    flags.DEFINE_float("copy_threshold_s", 8.0, "Flag generated pieces that copy at least this many seconds.", **kw)
    flags.DEFINE_integer("max_train_notes", 2_000_000, "Originality searches at most this many training notes.", **kw)
    flags.DEFINE_string("guidance_sweep", None, "Style guidance sweep, e.g. 1,1.5,2,3: per G, --num_samples pieces "
                        "and their style accuracy, feature overlap and longest copy (guidance_sweep.md/.json/.png).",
                        **kw)
    flags.DEFINE_bool("compare", False, "Print two reports side by side: --compare RUN_A RUN_B.", **kw)
    flags.DEFINE_string("finetuned_workdir", None, "One-composer study: the fine-tuned run (with --composer).", **kw)
    flags.DEFINE_string("composer", None, "One-composer study: composer/style label of the fine-tune.", **kw)
    flags.DEFINE_bool("progress", True, "Progress bar while generating.", **kw)


def run_command(f, rest: Sequence[str]) -> str:
    from mgpt import generate

    if f.compare:
        if len(rest) != 2:
            raise UserError("usage: python -m mgpt.evaluate --compare RUN_A RUN_B (report folders or report.json)")
        return report_lib.compare(*rest)
    if rest:
        raise UserError(f"unexpected arguments: {list(rest)}")
    if not f.workdir or not f.output_dir:
        raise UserError("usage: python -m mgpt.evaluate --workdir=RUN --output_dir=OUT [--generated_dir=DIR | "
                        "--num_samples=N --style=all] [--lstm_workdir=RUN]")
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
    if f.generated_dir and not generate.read_all_manifests(f.generated_dir):  # fail before loading anything
        raise UserError(f"--generated_dir={f.generated_dir}: no manifest.jsonl with pieces there")
    start = time.perf_counter()
    gpt, vocab, config = model_from_run("gpt", f.workdir)
    models = [gpt]
    if f.lstm_workdir:
        lstm, lstm_vocab, _ = model_from_run("lstm", f.lstm_workdir)
        if lstm_vocab.tokens[: vocab.style_offset] != vocab.tokens[: vocab.style_offset]:
            raise UserError(f"--lstm_workdir={f.lstm_workdir}: its event vocabulary differs from the GPT run's")
        models.append(lstm)
    dataset_dir = _resolve_dataset(f.dataset_dir or config.data.dataset_dir)
    train, test = load_split(dataset_dir, "train"), load_split(dataset_dir, "test")

    if f.generated_dir:
        generated_dir = pathlib.Path(f.generated_dir)
    else:
        generated_dir = pathlib.Path(f.output_dir) / "generated"
        run = generate.Run(model=gpt.model, vocab=vocab, config=config, step=gpt.step, workdir=str(f.workdir),
                           note_seconds=generate.dataset_note_seconds({"data": {"dataset_dir": str(dataset_dir)}}))
        try:
            styles = generate.resolve_styles(vocab, f.style)
            sampling = generate.Sampling(temperature=f.temperature, top_p=f.top_p, max_seconds=f.max_seconds,
                                         max_note_seconds=f.max_note_seconds)
        except generate.UserError as e:
            raise UserError(str(e)) from None
        print(f"generating {f.num_samples} pieces into {generated_dir}", flush=True)
        # The copy guard stays off: the report measures what the model copies by itself.
        generate.generate_corpus(run, generated_dir, num_samples=f.num_samples, styles=styles, seed=f.seed,
                                 sampling=sampling, progress=f.progress, max_copy_seconds=0)
        generate.write_gallery(generated_dir)
    generated = read_generated(generated_dir, vocab)

    report = evaluate(vocab=vocab, train=train, test=test, generated=generated, models=models, options=options,
                      output_dir=f.output_dir)
    report["meta"].update(workdir=str(f.workdir), step=gpt.step, dataset_dir=str(dataset_dir),
                          generated_dir=str(generated_dir), lstm_workdir=f.lstm_workdir,
                          total_seconds=time.perf_counter() - start)
    report_lib.write_report(report, f.output_dir, generated_dir)
    lines = [f"{t['target']}: {report_lib.fmt(t['value'])} ({'met' if t['met'] else 'NOT met'})" for t in report["targets"]]
    return "\n".join(lines + [str(pathlib.Path(f.output_dir) / "report.html")])


def parse_guidances(spec: str) -> list[float]:
    try:
        values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(np.isfinite(v) and v >= 0 for v in values):
        raise UserError(f"--guidance_sweep={spec}: expected comma-separated guidance values >= 0, e.g. 1,1.5,2,3")
    return values


def _run_guidance_sweep(f, options: Options) -> str:
    from mgpt import generate

    guidances = parse_guidances(f.guidance_sweep)
    if f.generated_dir:
        raise UserError("--guidance_sweep generates its own pieces; leave out --generated_dir")
    gpt, vocab, config = model_from_run("gpt", f.workdir)
    dataset_dir = _resolve_dataset(f.dataset_dir or config.data.dataset_dir)
    train, test = load_split(dataset_dir, "train"), load_split(dataset_dir, "test")
    run = generate.Run(model=gpt.model, vocab=vocab, config=config, step=gpt.step, workdir=str(f.workdir),
                       note_seconds=generate.dataset_note_seconds({"data": {"dataset_dir": str(dataset_dir)}}))
    try:
        styles = generate.resolve_styles(vocab, f.style)
        sampling = generate.Sampling(temperature=f.temperature, top_p=f.top_p, max_seconds=f.max_seconds,
                                     max_note_seconds=f.max_note_seconds)
    except generate.UserError as e:
        raise UserError(str(e)) from None
    result = guidance_sweep(run=run, vocab=vocab, train=train, test=test, guidances=guidances,
                            num_samples=f.num_samples, styles=styles, sampling=sampling, options=options,
                            output_dir=f.output_dir, progress=f.progress)
    text = write_guidance_sweep(result)
    (pathlib.Path(f.output_dir) / "guidance_sweep.md").write_text(text)
    return text + str(pathlib.Path(f.output_dir) / "guidance_sweep.png")


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
        raise SystemExit(f"{e} (see python -m mgpt.evaluate --help)") from None
    logging.set_verbosity(logging.WARNING)
    from mgpt import generate

    try:
        print(run_command(fv, rest))
    except (UserError, generate.UserError, report_lib.ReportError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
