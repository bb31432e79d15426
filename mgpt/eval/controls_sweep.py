"""The controls sweep: does the music follow the controls it is given? Measured on the MIDI.

For each control and each of its levels, `num_samples` pieces are generated with that control
alone asked for (the others left to the model), written as MIDI, read back as every generated
piece is (mgpt.eval.inputs: note-seq, then the vocabulary's quantisation), and measured by the
one rule training used (data_prep.controls.segment_levels), segment by segment. Per control:
- exact: the share of segments whose measured level is the requested one;
- within_1: the share within one level (binned controls; mode has no order);
- spearman: Spearman's rho between the requested level and the measured value (binned controls).
Timelines: pieces asked for a low level that turns high at `change_s` (and high that turns low)
report how many seconds after the change the first segment measures the new level (`follow_s`:
median over pieces; pieces that never do are counted in `never`).
Only whole segments before the piece's budget ends are measured; the last, cut one is not.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence

import numpy as np

from data_prep import controls as data_controls
from mgpt.eval.inputs import jsonable


def notes_of_midi(vocab, paths):
    """The notes of MIDI files as the report reads generated pieces (mgpt.eval.inputs.read_generated)."""
    import note_seq

    return [vocab.decode_notes(vocab.encode(note_seq.midi_file_to_note_sequence(str(p)))) for p in paths]


def _generate(run, vocab, folder: pathlib.Path, controls: str, num_samples: int, seed: int, sampling, style):
    s = dataclasses.replace(sampling, controls=controls, mood=None)
    prompts = run.prompts([style] * num_samples)
    rows = run.sample_ids(prompts, [seed + i for i in range(num_samples)], s)
    paths = run.write_midi(rows, folder)
    return notes_of_midi(vocab, paths), rows


def controls_sweep(*, run, vocab, num_samples: int, max_seconds: float, sampling, output_dir, style: str,
                   seed: int = 0, change_s: float | None = None, log=print) -> dict:
    """See the module docstring. Returns the figures (also written as controls_sweep.json and a plot)."""
    from scipy.stats import spearmanr

    spec = vocab.controls
    seconds, levels = spec["seconds"], spec["levels"]
    whole = int(math.floor(max_seconds / seconds + 1e-9))  # whole segments inside the budget
    if whole < 2:
        raise ValueError(f"--max_seconds={max_seconds:g} holds fewer than 2 whole {seconds:g} s control segments")
    sampling = dataclasses.replace(sampling, max_seconds=max_seconds, max_events=None)
    out_dir = pathlib.Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"seconds": seconds, "levels": levels, "num_samples": num_samples, "max_seconds": max_seconds,
              "style": style, "sampling": sampling.to_dict(), "controls": {}, "timelines": {}}
    points = {}
    for a, name in enumerate(data_controls.ATTRIBUTES):
        asked = range(1, levels + 1) if name != "mode" else range(1, len(data_controls.MODES) + 1)
        asked = spec.get("seen", {}).get(name, asked)  # levels the training split never has are refused
        req, got_level, got_value = [], [], []
        for level in asked:
            text = f"{name}={data_controls.MODES[level - 1] if name == 'mode' else level}"
            log(f"controls sweep: {text}")
            notes, _ = _generate(run, vocab, out_dir / f"{name}_{level}", text, num_samples, seed, sampling, style)
            for n in notes:
                values = data_controls.segment_values(n, seconds, whole)
                measured = data_controls.levels_of(values, spec)[:, a]
                req += [level] * whole
                got_level += measured.tolist()
                got_value += values[name].tolist()
        req, got_level, got_value = np.asarray(req), np.asarray(got_level), np.asarray(got_value, np.float64)
        row = {"segments": int(len(req)), "exact": float(np.mean(got_level == req))}
        if name != "mode":
            ok = ~np.isnan(got_value)
            row["within_1"] = float(np.mean(np.abs(got_level - req) <= 1))
            varies = ok.sum() > 2 and np.ptp(req[ok]) > 0 and np.ptp(got_value[ok]) > 0
            row["spearman"] = float(spearmanr(req[ok], got_value[ok]).statistic) if varies else None
            row["empty_segments"] = int((~ok).sum())
        row["per_level"] = {int(k): {"exact": float(np.mean(got_level[req == k] == k)),
                                     "measured_mean": float(np.nanmean(got_value[req == k]))
                                     if np.any(~np.isnan(got_value[req == k])) else None}
                            for k in np.unique(req)}
        result["controls"][name] = row
        points[name] = (req, got_value)
    if change_s is not None:
        for name in ("density", "loudness", "register"):
            low, high = data_controls_names(levels, spec.get("seen", {}).get(name))
            if low == high:
                continue  # one level in the training data: nothing to change to
            for a_level, b_level in ((low, high), (high, low)):
                text = f"0:{name}={a_level};{change_s:g}:{name}={b_level}"
                log(f"controls sweep: timeline {text}")
                notes, _ = _generate(run, vocab, out_dir / f"timeline_{name}_{a_level}_{b_level}", text, num_samples,
                                     seed, sampling, style)
                a = data_controls.ATTRIBUTES.index(name)
                first = math.ceil(change_s / seconds - 1e-9)  # the first segment asked for the new level
                follows = []
                for n in notes:
                    measured = data_controls.segment_levels(n, spec, whole)[:, a]
                    hit = [k for k in range(first, whole) if measured[k] == b_level]
                    follows.append((hit[0] * seconds - change_s) if hit else None)
                done = [f for f in follows if f is not None]
                result["timelines"][text] = {"follow_s_median": float(np.median(done)) if done else None,
                                             "follow_s": follows, "never": len(follows) - len(done)}
    result = jsonable(result)
    (out_dir / "controls_sweep.json").write_text(json.dumps(result, indent=1))
    _plot(points, levels, out_dir / "controls_sweep.png")
    return result


def data_controls_names(levels: int, seen: list[int] | None = None) -> tuple[int, int]:
    """The levels 'low' and 'high' ask for (the nearest the training split has, given `seen`)."""
    from mgpt.sample.controls import level_names

    names = level_names(levels)
    near = (lambda k: k) if not seen else (lambda k: min(seen, key=lambda s: (abs(s - k), s)))  # noqa: E731
    return near(names["low"]), near(names["high"])


def _plot(points: dict, levels: int, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(3.2 * len(points), 3.2))
    for ax, (name, (req, value)) in zip(np.atleast_1d(axes), points.items()):
        ok = ~np.isnan(value)
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, ok.sum())
        ax.plot(req[ok] + jitter, value[ok], ".", alpha=0.3, ms=3)
        ks = np.unique(req)
        ax.plot(ks, [np.nanmedian(value[req == k]) if np.any(~np.isnan(value[req == k])) else np.nan for k in ks],
                "o-", color="black", ms=4, label="median")
        ax.set_title(name)
        ax.set_xlabel("requested level" if name != "mode" else "requested (1 major, 2 minor, 3 none)")
        ax.set_ylabel({"density": "notes / s", "polyphony": "notes sounding per onset", "register": "mean pitch",
                       "loudness": "mean velocity", "mode": "measured (1 major, 2 minor, 3 none)"}[name])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_controls_sweep(result: dict) -> str:
    """The sweep as Markdown (also printed by the command)."""
    lines = [f"Controls over {result['seconds']:g} s segments, {result['levels']} levels; {result['num_samples']} "
             f"pieces of {result['max_seconds']:g} s per level, style {result['style']}, the others free.", "",
             "| control | segments | exact bin | within 1 bin | Spearman rho | empty segments |", "|---|---|---|---|---|---|"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)  # noqa: E731
    for name, r in result["controls"].items():
        lines.append(f"| {name} | {r['segments']} | {fmt(r['exact'])} | {fmt(r.get('within_1'))} | "
                     f"{fmt(r.get('spearman'))} | {fmt(r.get('empty_segments'))} |")
    if result["timelines"]:
        lines += ["", "| timeline | follow time, median s | never followed |", "|---|---|---|"]
        for text, r in result["timelines"].items():
            lines.append(f"| `{text}` | {fmt(r['follow_s_median'])} | {r['never']} of {len(r['follow_s'])} |")
    return "\n".join(lines) + "\n"


def reference_levels(notes, spec: dict, segments: int) -> np.ndarray:
    """int64[segments, A]: the levels a piece measures in each of its first `segments` segments, 0
    (free) in a segment that does not lie wholly within the piece (a shorter piece asks for nothing
    past its end, not for silence)."""
    levels_SxA = data_controls.segment_levels(notes, spec, segments)
    end = float(np.max(notes.end_s)) if len(notes) else 0.0
    inside_S = (np.arange(segments) + 1) * spec["seconds"] <= end + 1e-9
    return np.where(inside_S[:, None], levels_SxA, 0)


def timeline_of(notes, spec: dict, segments: int, only: str | None = None) -> str:
    """The --controls timeline a piece itself has: every control of each of its first `segments`
    segments at the level measured there (with `only`, that control alone, the others free). A
    control a segment has no level of (no note struck, or past the piece's end), or a level the
    model's training split never has (spec['seen']), is left free."""
    levels_SxA = reference_levels(notes, spec, segments)
    seen = spec.get("seen") or {}
    entries = []
    for k, levels_A in enumerate(levels_SxA):
        items = []
        for name, v in zip(data_controls.ATTRIBUTES, levels_A.tolist()):
            known = v > 0 and (name not in seen or v in seen[name]) and only in (None, name)
            items.append(f"{name}={(data_controls.MODES[v - 1] if name == 'mode' else v) if known else 'free'}")
        entries.append(f"{k * spec['seconds']:g}:" + ",".join(items))
    return ";".join(entries)


def misread_by_reference(verdicts: Sequence[dict], reference_of: dict) -> dict:
    """{reference piece: {"pieces": n, "misread": m}}: of the n judged pieces (style-section verdicts,
    each {"file", "conditioned_on", "classified_as"}) that followed that real piece's timeline
    (`reference_of`: file -> its piece id), the m the classifier reads as another style. Where a
    set's cost comes from: a few real timelines, or every piece a little."""
    tally: dict = {}
    for v in verdicts:
        t = tally.setdefault(reference_of[v["file"]], {"pieces": 0, "misread": 0})
        t["pieces"] += 1
        t["misread"] += int(v["classified_as"] != v["conditioned_on"])
    return tally


def controls_cost(*, run, vocab, train, test, num_samples: int, styles: Sequence[str], max_seconds: float, sampling,
                  options, output_dir, each: bool = False, timelines_from: Sequence | None = None,
                  log=print) -> dict:
    """What controls cost in style accuracy and feature overlap, against the same model without them.

    Piece i (style styles[i mod n], seed options.seed + i) is generated twice: plain, and asked for
    the controls a real test piece of its style has, segment by segment (`timeline_of`; the test
    pieces of each style in turn). Controls that real music of the style has are what a fair cost
    is measured with: fixed levels for every style (polyphony 5 for a folk tune) would measure a
    request against the style instead. Both sets are judged by the report's own sections (style
    classifier, feature overlap against the train-vs-test ceiling); the steered pieces' adherence
    to their timelines is measured too (exact and within-one-bin, per control). With `each`, the
    pieces are also generated asked for one control alone of the same timelines (rows
    'steered_<control>'): what each control costs by itself. `timelines_from`: the real pieces
    whose timelines are followed (default: `test`; the classifier and the ceiling use `test`)."""
    from mgpt.eval.features_section import feature_section
    from mgpt.eval.inputs import Generated
    from mgpt.eval.references import mean_of, references
    from mgpt.eval.style_section import style_section
    from mgpt.sample import run as sample_run

    spec = vocab.controls
    seconds = spec["seconds"]
    whole = int(math.floor(max_seconds / seconds + 1e-9))
    o = options
    out_dir = pathlib.Path(output_dir)
    # The real timelines first: a style without one fails before any work.
    by_style = {s: [p for p in (test if timelines_from is None else timelines_from) if p.style_name == s]
                for s in styles}
    missing = [s for s, ps in by_style.items() if not ps]
    if missing:
        raise ValueError(f"controls cost: no {'test' if timelines_from is None else 'reference'} piece of style "
                         f"{', '.join(missing)} to take a timeline from")
    refs = references(vocab, train, test, o, np.random.default_rng(o.seed), log)
    ceiling = mean_of(refs.train_vs_test, "overlap")
    sampling = dataclasses.replace(sampling, max_seconds=max_seconds, max_events=None, controls=None, mood=None)
    plan = []  # (style, seed, the notes of the real piece whose controls it is asked for)
    ref_ids = []  # that real piece's id
    for i in range(num_samples):
        style = styles[i % len(styles)]
        ref = by_style[style][(i // len(styles)) % len(by_style[style])]
        plan.append((style, o.seed + i, vocab.decode_notes(ref.tokens)))
        ref_ids.append(f"{style}/{ref.piece_id}")
    result = {"num_samples": num_samples, "max_seconds": max_seconds, "styles": list(styles),
              "sampling": sampling.to_dict(), "overlap_ceiling": ceiling, "rows": {},
              "control_tries": int(sampling.control_tries),  # the steered sets' (to_dict records 1: no controls)
              "prefer_style": bool(sampling.prefer_style),  # both sets' (rerank.py)
              "timelines_from": {s: len(ps) for s, ps in by_style.items()},  # real pieces per style
              "timelines_split": "test" if timelines_from is None else "held-out",
              "crop_seconds": o.crop_seconds}  # what the classifier and the features read of each piece
    prompts = run.prompts([s for s, _, _ in plan])
    seeds = [seed for _, seed, _ in plan]
    # The guidances the pieces are drawn with (the prompts have styles: the run's default G for both sets).
    result.update(guidance=run.sampling(sampling, prompts).guidance, steered_guidance=sampling.steered_guidance,
                  contrast_style=sampling.contrast_style.strip() or None)
    asked = np.concatenate([reference_levels(ref_notes, spec, whole) for _, _, ref_notes in plan])
    sets = {"plain": None, "steered": None}  # name -> the one control asked for (None: all of them)
    if each:
        sets.update({f"steered_{attr}": attr for attr in data_controls.ATTRIBUTES})
    for name, only in sets.items():
        log(f"controls cost: {num_samples} pieces, {name}")
        if name == "plain":
            rows = run.sample_ids(prompts, seeds, sampling)
        else:  # one timeline per piece, in one batch
            texts = [timeline_of(ref_notes, spec, whole, only) for _, _, ref_notes in plan]
            rows = run.sample_ids(prompts, seeds, sampling, timelines=texts)
        paths = run.write_midi(rows, out_dir / f"cost_{name}")
        notes = notes_of_midi(vocab, paths)
        generated = [Generated(str(p.name), style, n, len(n) > 0, n.seconds)
                     for p, n, (style, _, _) in zip(paths, notes, plan)]
        style = style_section(refs, generated, o, None)
        overlap = feature_section(refs, generated, o, None)["mean_overlap"]["generated_vs_test"]
        row = {"style_accuracy": style["generated"]["accuracy"] if "generated" in style else None,
               "style": style.get("generated"),
               "mean_overlap": overlap, "overlap_vs_ceiling": overlap / ceiling if ceiling else None}
        if "generated" in style:  # plain pieces too: the same seeds, no timeline followed (a baseline)
            reference_of = {p.name: r for p, r in zip(paths, ref_ids)}
            row["by_reference"] = misread_by_reference(style["generated"]["verdicts"], reference_of)
            for v in style["generated"]["verdicts"]:  # each piece's real timeline (benchmarks/style_push.py)
                v["reference"] = reference_of[v["file"]]
        if name != "plain":  # how closely the pieces follow the real pieces' timelines
            got = np.concatenate([data_controls.segment_levels(n, spec, whole) for n in notes])
            row["follow"] = {}
            for a, attr in enumerate(data_controls.ATTRIBUTES):
                if only not in (None, attr):
                    continue
                ok = asked[:, a] > 0
                row["follow"][attr] = {"segments": int(ok.sum()),
                                       "exact": float(np.mean(got[ok, a] == asked[ok, a])) if ok.any() else None,
                                       "within_1": (float(np.mean(np.abs(got[ok, a] - asked[ok, a]) <= 1))
                                                    if ok.any() and attr != "mode" else None)}
        result["rows"][name] = row
    result = jsonable(result)
    (out_dir / "controls_cost.json").write_text(json.dumps(result, indent=1))
    return result


def write_controls_cost(result: dict) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"What controls cost: {result['num_samples']} pieces of {result['max_seconds']:g} s over "
             f"{', '.join(result['styles'])}, each generated plain and asked for a real "
             f"{result.get('timelines_split', 'test')} piece's controls (its own style's), segment by segment"
             + (" (" + ", ".join(f"{n} {s}" for s, n in result["timelines_from"].items()) + " pieces)."
                if result.get("timelines_from") else ".")
             + (f" Guidance: plain {result['guidance']:g}, steered {result['steered_guidance']:g} (its twin reads "
                "the controls)." if result.get("steered_guidance") is not None else "")
             + (f" The steered pieces' twins read the controls and a contrast style (--contrast_style="
                f"{result['contrast_style']})." if result.get("contrast_style") else "")
             + (f" Each control segment drawn {result['control_tries']} times, the draw nearest the asked controls "
                "kept, of those the one the model reads most as its style (--prefer_style; the plain pieces "
                "chosen alike)." if result.get("prefer_style") else ""), "",
             "| pieces | style accuracy | mean overlap | overlap / ceiling | against plain: style, overlap / ceiling "
             "(points) |", "|---|---|---|---|---|"]
    plain = result["rows"].get("plain", {})

    def points(r, key):
        if r is plain or r.get(key) is None or plain.get(key) is None:
            return "-"
        return f"{100 * (r[key] - plain[key]):+.1f}"

    for name, r in result["rows"].items():
        asked = name.removeprefix("steered_") if name.startswith("steered_") else None
        label = f"{asked} alone (exact {fmt(r['follow'][asked]['exact'])})" if asked else name
        lines.append(f"| {label} | {fmt(r['style_accuracy'])} | {fmt(r['mean_overlap'])} | "
                     f"{fmt(r['overlap_vs_ceiling'])} | {points(r, 'style_accuracy')}, "
                     f"{points(r, 'overlap_vs_ceiling')} |")
    worst = _worst_references(result["rows"])
    if worst:
        lines += ["", "The real timelines whose steered pieces the classifier reads as another style most "
                  "(all five controls; the plain pieces of the same seeds beside them):", ""]
        lines += [f"- {ref}: {n} of {total} (plain {m} of {plain_total})" for ref, n, total, m, plain_total in worst]
    follow = result["rows"].get("steered", {}).get("follow")
    if follow:
        lines += ["", "Following the real pieces' timelines:", "", "| control | segments | exact bin | within 1 bin |",
                  "|---|---|---|---|"]
        for attr, r in follow.items():
            lines.append(f"| {attr} | {r['segments']} | {fmt(r['exact'])} | {fmt(r['within_1'])} |")
    return "\n".join(lines) + "\n"


def _worst_references(rows: dict, most: int = 3) -> list[tuple[str, int, int, int, int]]:
    """(reference, steered misread, steered pieces, plain misread, plain pieces) of the `most` real
    timelines whose steered pieces are misread most beyond the plain pieces of the same seeds."""
    steered = rows.get("steered", {}).get("by_reference") or {}
    plain = rows.get("plain", {}).get("by_reference") or {}
    base = {ref: plain.get(ref, {"pieces": 0, "misread": 0}) for ref in steered}
    worse = [(ref, t["misread"], t["pieces"], base[ref]["misread"], base[ref]["pieces"]) for ref, t in steered.items()
             if t["misread"] > base[ref]["misread"]]
    return sorted(worse, key=lambda w: (w[3] - w[1], w[0]))[:most]
