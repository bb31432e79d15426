"""Infilling, measured: does the suffix help, and does the joined piece hold together at E?

    python -m mgpt.eval.infill --workdir=RUN --output_dir=OUT [--gaps_per_piece=2 --seed=0]

On the test split (no transposition), each piece long enough gets `--gaps_per_piece` gaps
of `--min_gap`..`--max_gap` seconds (uniform, on the 10 ms grid), at least `--margin`
seconds from either end, drawn from a seed of its own. For each gap:

- likelihood: the nats per event of the real middle (its events, not FIM_END) given the
  prefix and the suffix (the FIM prompt `mgpt.sample.fim.prompt`, exactly what the sampler reads),
  and given the same prefix tokens only (a plain continuation row: STYLE + the same prefix
  part). The suffix helps when the first is lower. A gap whose middle leaves less than
  `MIN_PROMPT` tokens of the model's context for the prompt is skipped and counted;
- sampling: one middle per gap with the default settings, joined (`mgpt.sample.fim.close`), then:
  notes dangling across E (`mgpt.sample.fim.dangling`), notes outside the gap not kept within
  10 ms (`mgpt.sample.fim.kept_outside`), and how often the model's own middle left E in another
  state than the suffix states (the notes the sampler had to release or strike there).

Writes infill.json (every figure, per gap too), infill.md, and before_after.png: the first
gap of `--figure_piece` (default: the first Bach piece with a gap) before and after.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from mgpt.sample import fim
from mgpt.errors import UserError, reported

MIN_PROMPT = 32  # tokens of prefix + suffix context at the least


def draw_gaps(pieces, vocab, per_piece: int, min_s: float, max_s: float, margin_s: float, seed: int):
    """[(piece index, start_step, end_step)]: per piece, `per_piece` gaps drawn from rng([seed, piece])."""
    sps = vocab.steps_per_second
    out = []
    for i, p in enumerate(pieces):
        total = vocab.seconds(p.tokens)
        rng = np.random.default_rng([seed, i])
        for _ in range(per_piece):
            length = float(rng.uniform(min_s, max_s))
            if total < length + 2 * margin_s:
                continue
            start = float(rng.uniform(margin_s, total - margin_s - length))
            out.append((i, int(round(start * sps)), int(round((start + length) * sps))))
    return out


def scoring_rows(vocab, style: int, gap: fim.Gap, window: int):
    """(FIM row, prefix-only row), each ending with the real middle, or None when the middle
    leaves the prompt less than MIN_PROMPT tokens of the window."""
    budget = window - len(gap.middle)
    if budget < MIN_PROMPT:
        return None
    prompt = fim.prompt(vocab, style, gap.prefix, gap, gap.steps, budget=budget)
    head = prompt[2:prompt.index(vocab.fim_suffix_id)]  # the same prefix tokens, without the suffix
    middle = [int(t) for t in gap.middle]
    return prompt + middle, [style, *head, *middle]


def evaluate(run, pieces, *, gaps_per_piece: int = 2, min_gap: float = 2.0, max_gap: float = 8.0,
             margin: float = 1.0, seed: int = 0, batch_size: int = 16, sample: bool = True, log=print) -> dict:
    from mgpt.eval.likelihood import model_nats
    from mgpt.sample.run import Sampling

    vocab = run.vocab
    if not vocab.fim:
        raise ValueError(f"{run.workdir}: the model has no FIM tokens (trained with data.fim_rate = 0)")
    window = run.model.cfg.max_len
    drawn = draw_gaps(pieces, vocab, gaps_per_piece, min_gap, max_gap, margin, seed)
    gaps, wins_fim, wins_plain, skipped = [], [], [], 0
    for i, s, e in drawn:
        gap = fim.Gap.cut(vocab, pieces[i].tokens, s, e)
        style = vocab.style_id(pieces[i].style)
        rows = scoring_rows(vocab, style, gap, window)
        if rows is None or not len(gap.middle):
            skipped += 1
            continue
        k = len(gaps)
        for wins, row in zip((wins_fim, wins_plain), rows):
            predicted = np.zeros(len(row), bool)
            predicted[len(row) - len(gap.middle):] = True
            wins.append((k, np.asarray(row, np.int32), predicted))
        gaps.append((i, s, e, style, gap))
    log(f"infill: {len(gaps)} gaps of {min_gap:g}-{max_gap:g} s in {len(pieces)} test pieces ({skipped} skipped: "
        f"middle too long for the {window}-token context, or empty)")
    nats_fim, count = model_nats(run.model, wins_fim, window, len(gaps), batch_size)
    nats_plain, _ = model_nats(run.model, wins_plain, window, len(gaps), batch_size)
    per_gap = [{"piece": pieces[i].piece_id, "style": pieces[i].style_name, "start_s": s / vocab.steps_per_second,
                "end_s": e / vocab.steps_per_second, "middle_events": int(count[k]),
                "nats_per_event_fim": float(nats_fim[k] / count[k]),
                "nats_per_event_prefix_only": float(nats_plain[k] / count[k])}
               for k, (i, s, e, _, _) in enumerate(gaps)]
    events = int(count.sum())
    out = {
        "split": "test", "pieces": len(pieces), "gaps": len(gaps), "skipped": skipped, "seed": seed,
        "gap_seconds": [min_gap, max_gap], "middle_events": events,
        "nats_per_event": {"prefix_and_suffix": float(nats_fim.sum() / events),
                           "prefix_only": float(nats_plain.sum() / events)},
        "suffix_helps_share": float(np.mean(nats_fim < nats_plain)),
    }
    by_style = {}
    for style in sorted({g["style"] for g in per_gap}):
        idx = [k for k, g in enumerate(per_gap) if g["style"] == style]
        c = count[idx].sum()
        by_style[style] = {"gaps": len(idx), "prefix_and_suffix": float(nats_fim[idx].sum() / c),
                           "prefix_only": float(nats_plain[idx].sum() / c)}
    out["per_style"] = by_style
    if sample:
        log(f"infill: sampling one middle per gap ({len(gaps)})")
        prompts = [np.concatenate([[style], g.prefix]).astype(np.int32) for _, _, _, style, g in gaps]
        sampling = run.sampling(Sampling(), prompts)  # the defaults as resolved, so the report says the G used
        rows = run.sample_ids(prompts, [seed + k for k in range(len(gaps))], sampling, batch_size=batch_size,
                              gaps=[g for *_, g in gaps])
        joined_rows, stats = [], {"dangling": 0, "missing": 0, "not_kept": 0, "notes_checked": 0,
                                  "pieces_dangling": 0, "middles_released": 0, "middles_struck": 0,
                                  "middles_short": 0, "notes_released": 0, "notes_struck": 0}
        for k, ((i, s, e, _, g), row) in enumerate(zip(gaps, rows)):
            tail, c = fim.close(vocab, g, row[1:])
            joined = np.concatenate([row[1:], tail, g.suffix]).astype(np.int32)
            joined_rows.append(joined)
            dangling, missing = fim.dangling(vocab, pieces[i].tokens, joined, e)
            before, after = vocab.decode_notes(pieces[i].tokens), vocab.decode_notes(joined)
            lost = fim.kept_outside(before, after, s / vocab.steps_per_second, e / vocab.steps_per_second)
            checked = len(before.pitch)
            stats["dangling"] += dangling
            stats["missing"] += missing
            stats["pieces_dangling"] += int(dangling > 0)
            stats["not_kept"] += len(lost)
            stats["notes_checked"] += checked
            stats["middles_released"] += int(c["released"] > 0)
            stats["middles_struck"] += int(c["struck"] > 0)
            stats["middles_short"] += int(c["short_steps"] > 0)
            stats["notes_released"] += c["released"]
            stats["notes_struck"] += c["struck"]
            per_gap[k].update({"sampled_middle_events": int(len(row) - 1 - len(g.prefix)), "dangling": dangling,
                               "missing": missing, "not_kept": len(lost), **c})
        stats["pieces_dangling_share"] = stats["pieces_dangling"] / max(1, len(gaps))
        out["sampling"] = {"settings": sampling.to_dict(), **stats}
        out["_joined"] = joined_rows
    out["per_gap"] = per_gap
    out["_gaps"] = gaps
    return out


def write(result: dict, pieces, vocab, output_dir, figure_piece: str | None = None) -> pathlib.Path:
    from mgpt import render

    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    tmp = out / "infill.json.part"
    tmp.write_text(json.dumps(public, indent=1))
    os.replace(tmp, out / "infill.json")
    n = public["nats_per_event"]
    lines = [
        "# Infilling", "",
        f"{public['gaps']} gaps of {public['gap_seconds'][0]:g}-{public['gap_seconds'][1]:g} s in "
        f"{public['pieces']} test pieces ({public['skipped']} skipped), {public['middle_events']:,} middle events.", "",
        "| middle given | nats/event |", "|---|---|",
        f"| prefix and suffix (FIM) | {n['prefix_and_suffix']:.3f} |",
        f"| prefix only | {n['prefix_only']:.3f} |", "",
        f"The suffix lowers the middle's NLL in {public['suffix_helps_share']:.0%} of the gaps.", "",
        "| style | gaps | prefix and suffix | prefix only |", "|---|---|---|---|",
        *[f"| {s} | {v['gaps']} | {v['prefix_and_suffix']:.3f} | {v['prefix_only']:.3f} |"
          for s, v in public["per_style"].items()],
    ]
    if "sampling" in public:
        s = public["sampling"]
        g = max(1, public["gaps"])
        lines += [
            "", "One sampled middle per gap (default settings):", "",
            f"- joined pieces with a note dangling across E: {s['pieces_dangling']} of {public['gaps']} "
            f"({s['dangling']} notes; {s['missing']} stated notes missing)",
            f"- notes outside the gap not kept within 10 ms: {s['not_kept']} of {s['notes_checked']}",
            f"- middles that left notes at E the suffix does not state (released there by the sampler): "
            f"{s['middles_released']} of {g} ({s['notes_released']} notes)",
            f"- middles missing a note the suffix states (struck at E by the sampler): {s['middles_struck']} of {g} "
            f"({s['notes_struck']} notes)",
            f"- middles that ran out of events before E (padded with silence): {s['middles_short']} of {g}",
        ]
    (out / "infill.md").write_text("\n".join(lines) + "\n")
    if "_joined" in result and result["_gaps"]:
        gaps = result["_gaps"]
        pick = next((k for k, (i, *_) in enumerate(gaps)
                     if (pieces[i].piece_id == figure_piece if figure_piece else pieces[i].style_name == "bach")), 0)
        i, s, e, _, _ = gaps[pick]
        span = (s / vocab.steps_per_second, e / vocab.steps_per_second)
        render.piano_rolls([(vocab.decode(pieces[i].tokens), f"before: {pieces[i].piece_id}, gap {span[0]:.2f}-"
                                                               f"{span[1]:.2f} s"),
                            (vocab.decode(result["_joined"][pick]), "after: the gap filled by the model")],
                           out / "before_after.png", gap=span)
    return out / "infill.md"


@reported
def main(argv: Sequence[str] | None = None) -> None:
    from absl import flags, logging

    fv = flags.FlagValues()
    kw = {"flag_values": fv}
    flags.DEFINE_string("workdir", None, "A run trained with data.fim_rate > 0.", **kw)
    flags.DEFINE_string("output_dir", None, "Where infill.json, infill.md and before_after.png go.", **kw)
    flags.DEFINE_string("dataset_dir", None, "Test pieces from this dataset (default: the run's).", **kw)
    flags.DEFINE_integer("gaps_per_piece", 2, "Gaps drawn per test piece.", **kw)
    flags.DEFINE_float("min_gap", 2.0, "Shortest gap, seconds.", **kw)
    flags.DEFINE_float("max_gap", 8.0, "Longest gap, seconds.", **kw)
    flags.DEFINE_float("margin", 1.0, "Seconds of music kept at least before and after each gap.", **kw)
    flags.DEFINE_integer("seed", 0, "Seed of the gaps and of the sampled middles.", **kw)
    flags.DEFINE_bool("sample", True, "Also sample a middle per gap and check the joined pieces.", **kw)
    flags.DEFINE_string("figure_piece", None, "piece_id of the before/after figure (default: first Bach gap).", **kw)
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print("\n\n".join(__doc__.split("\n\n")[:2]) + "\n\nFlags:\n" + fv.get_help(include_special_flags=False))
        return
    try:
        fv(argv)
    except flags.Error as e:
        raise UserError(f"{e} (see python -m mgpt.eval.infill --help)") from None
    if not fv.workdir or not fv.output_dir:
        raise UserError("usage: python -m mgpt.eval.infill --workdir=RUN --output_dir=OUT")
    if not fv.min_gap > 0 or fv.max_gap < fv.min_gap:
        raise UserError(f"--min_gap/--max_gap: need 0 < min <= max, got {fv.min_gap}, {fv.max_gap}")
    if fv.gaps_per_piece < 1:
        raise UserError(f"--gaps_per_piece must be >= 1, got {fv.gaps_per_piece}")
    if not fv.margin >= 0:
        raise UserError(f"--margin must be >= 0 seconds, got {fv.margin}")
    logging.set_verbosity(logging.ERROR)
    from mgpt.sample import run as run_lib
    from mgpt.eval.inputs import load_split

    run = run_lib.load_run(fv.workdir)
    run_lib.check_infill_model(run.vocab, fv.workdir, flag="--workdir")
    dataset = fv.dataset_dir or run.dataset_dir
    if not dataset:
        raise UserError(f"{fv.workdir}: its dataset is not on this machine; pass --dataset_dir")
    pieces = load_split(dataset, "test")
    result = evaluate(run, pieces, gaps_per_piece=fv.gaps_per_piece, min_gap=fv.min_gap, max_gap=fv.max_gap,
                      margin=fv.margin, seed=fv.seed, sample=fv.sample)
    path = write(result, pieces, run.vocab, fv.output_dir, fv.figure_piece)
    print(path.read_text(), end="")
    print(path)


if __name__ == "__main__":
    main()
