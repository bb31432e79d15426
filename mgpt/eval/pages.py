"""Report pages of `mgpt.evaluate`: report.md / report.html from report.json.

The tables are built once (`report_tables`) and written both as Markdown and as an
HTML page that sits next to the generated pieces' gallery (embedded on the right).
"""

from __future__ import annotations

import html
import json
import os
import pathlib

from mgpt.music import features as F


def fmt(v, digits=3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def report_tables(report: dict) -> list[tuple[str, str, list[str], list[list], list[str]]]:
    """(section, caption, headers, rows, images) for report.md and report.html alike."""
    out = []
    lik = report["likelihood"]
    models = lik["models"]
    out_piece = lik.get("outlier")
    rows = [[name, m.get("params"), m.get("tokens_seen"), m.get("validation", {}).get("nats_per_event"),
             m["nats_per_event"], m.get("without_outlier", {}).get("nats_per_event"),
             m.get("outlier", {}).get("nats_per_event"), m["bits_per_event"], m["perplexity"]]
            for name, m in models.items()]
    caption = (f"Test split: {lik['pieces']} pieces, {next(iter(models.values()))['events']:,} events (incl. EOS), "
               "no transposition. n-gram 'training tokens' = train-split tokens it counted.")
    if out_piece:
        caption += (f" The outlier, chosen by the n-gram (the test piece holding most of its nats): "
                    f"{out_piece['piece_id']} ({out_piece['style']}, {out_piece['share_of_events']:.0%} of the "
                    f"split's events).")
    out.append(("Likelihood", caption,
                ["model", "params", "training tokens", "validation nats/event", "test nats/event",
                 "test without outlier", "outlier", "test bits/event", "test perplexity"], rows, []))
    rows = [[name, w["piece_id"], w["style"], w["events"], w["share_of_events"], w["nats_per_event"]]
            for name, m in models.items() for w in m.get("worst_pieces", [])]
    if rows:
        out.append(("Worst test pieces", "Each model's five test pieces with the highest nats/event.",
                    ["model", "piece", "style", "events", "share of events", "nats/event"], rows, []))
    styles = sorted({s for m in models.values() for s in m["per_style"]})
    rows = []
    for s in styles:
        first = next(m["per_style"][s] for m in models.values() if s in m["per_style"])
        rows.append([s, first["pieces"], first["events"]] +
                    [m["per_style"].get(s, {}).get("nats_per_event") for m in models.values()])
    out.append(("Likelihood per style", "nats/event on the test pieces of each style.",
                ["style", "pieces", "events"] + list(models), rows, []))

    f = report["features"]
    gvt, tvt = f["generated_vs_test"], f["train_vs_test"]
    rows = []
    for name in F.FEATURES:
        g, t = gvt.get(name, {}), tvt.get(name, {})
        gen_mean, test_mean = g.get("candidate_mean"), t.get("reference_mean")
        scalar = not isinstance(test_mean, list)
        rows.append([name, g.get("overlap"), g.get("kl"), t.get("overlap"), t.get("kl"),
                     gen_mean if scalar else "(histogram)", test_mean if scalar else "(histogram)"])
    rows.append(["**mean**", f["mean_overlap"]["generated_vs_test"], f["mean_kl"]["generated_vs_test"],
                 f["mean_overlap"]["train_vs_test"], f["mean_kl"]["train_vs_test"], "", ""])
    out.append(("Musical statistics",
                f"First {f['crop_seconds']:g} s of each piece; pieces: "
                + ", ".join(f"{k} {v}" for k, v in f["pieces"].items()) + ". Overlap area (1 = identical) and "
                "KL (nats) of inter-set vs the test set's intra-set distance distributions (Yang & Lerch 2018); "
                "train vs test is the ceiling.",
                ["feature", "generated OA", "generated KL", "train OA (ceiling)", "train KL", "generated mean",
                 "test mean"], rows, [f["plots"][k] for k in F.FEATURES if k in f["plots"]]))

    co = report.get("coherence", {})
    if co.get("per_style"):
        rows = []
        for style, v in co["per_style"].items():
            g, r, t = v["generated"], v["real"], v.get("train", {})
            rows.append([style, f"{g['pieces']} / {r['pieces']} / {t.get('pieces', '-')}", r["onset_polyphony"],
                         t.get("onset_polyphony"), g["onset_polyphony"], r["mean_note_s"], t.get("mean_note_s"),
                         g["mean_note_s"], r["share_notes_ge_4s"], t.get("share_notes_ge_4s"), g["share_notes_ge_4s"],
                         ", ".join(v["off"]) or "ok",
                         (", ".join(v["train_off"]) or "ok") if "train_off" in v else "-"])
        out.append(("Notes that hold together",
                    f"Per style, means over pieces (first {co['crop_seconds']:g} s): notes sounding at each onset, "
                    "mean note length and the share of notes >= 4 s: real test, real train and generated. A style "
                    f"is off when polyphony or note length differ from the test pieces' by more than "
                    f"{co['tolerance']:.0%}, or its long-note share exceeds theirs by more than "
                    f"{co['long_note_slack']:.0%}. A style with few test pieces can be off its own train split: "
                    "compare the train column before blaming the model. The last column applies the same rule to "
                    "the real train pieces: a flag they raise too is the split's, not the model's.",
                    ["style", "pieces (gen / test / train)", "polyphony test", "polyphony train", "polyphony gen",
                     "note s test", "note s train", "note s gen", ">= 4 s test", ">= 4 s train", ">= 4 s gen", "off",
                     "off (real train)"],
                    rows, []))

    st = report["style"]
    if "real_test" in st:
        rows = [["real test (ceiling)", st["real_test"]["count"], st["real_test"]["accuracy"]],
                ["generated (vs conditioned style)", st["generated"]["count"], st["generated"]["accuracy"]]]
        out.append(("Style fidelity", st["classifier"] + f"; trained on {st['train_pieces']} train pieces.",
                    ["pieces", "count", "accuracy"], rows, [st["plot"]]))
        rows = [[s, st["real_test"]["per_style"].get(s), st["generated"]["per_style"].get(s)] for s in st["styles"]]
        out.append(("Style recall per style", "", ["style", "real test", "generated"], rows, []))
    else:
        out.append(("Style fidelity", st.get("skipped", ""), [], [], []))

    og = report["originality"]
    rows = []
    for name in ("generated", "test"):
        r = og[name]
        rows.append([name, len(r["pieces"]), r["longest_copy_s_max"], r["longest_copy_s_median"],
                     r["longest_copy_notes_max"]] + [r["ngram_share"].get(str(n)) for n in sorted(map(int, r["ngram_share"]))]
                    + [len(r["flagged"])])
    sizes = sorted(map(int, og["generated"]["ngram_share"]))
    out.append(("Originality",
                f"{og['method']}. Searched {og['train_pieces_searched']} of {og['train_pieces_total']} train pieces "
                f"({og['train_notes_searched']:,} notes). Test pieces cut to {og['test_reference_seconds']:g} s as the "
                f"reference for normal reuse. Flagged: longest copy >= {og['generated']['threshold_s']:g} s.",
                ["set", "pieces", "longest copy max (s)", "median (s)", "longest copy (notes)"]
                + [f"{n}-note n-grams in train" for n in sizes] + ["flagged"], rows, []))
    if og["generated"]["flagged"]:
        rows = [[p["file"], p["seconds"], p["seconds_notes"], p["train_piece_id"]]
                for p in og["generated"]["pieces"] if p["seconds"] >= og["generated"]["threshold_s"]]
        out.append(("Flagged pieces", "", ["file", "copied seconds", "notes", "from train piece"], rows, []))

    v = report["validity"]
    out.append(("Validity", "", ["files", "valid", "share", "mean seconds", "mean notes"],
                [[v["files"], v["valid"], v["share"], v["mean_seconds"], v["mean_notes"]]], []))
    out.append(("Targets", "The issue's targets for the demo model.", ["target", "value", "goal", "met"],
                [[t["target"], t["value"], t["goal"], t["met"]] for t in report["targets"]], []))
    return out


def write_markdown(report: dict, path: pathlib.Path) -> None:
    lines = ["# mgpt evaluation report", ""]
    meta = report["meta"]
    if meta.get("workdir"):
        lines += [f"Run: `{meta['workdir']}` (step {meta.get('step')}); dataset: `{meta.get('dataset_dir')}`; "
                  f"generated: `{meta.get('generated_dir')}`.", ""]
    for section, caption, headers, rows, images in report_tables(report):
        lines += [f"## {section}", ""]
        if caption:
            lines += [caption, ""]
        if headers:
            lines.append("| " + " | ".join(headers) + " |")
            lines.append("|" + "---|" * len(headers))
            lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
            lines.append("")
        lines += [f"![{im}]({im})" for im in images]
        if images:
            lines.append("")
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    path.write_text("\n".join(lines))


def write_html(report: dict, path: pathlib.Path, gallery: str | None) -> None:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mgpt evaluation</title><style>",
             "body{font-family:sans-serif;margin:0;display:flex}main{flex:1;padding:1em 2em;max-width:60em}",
             "aside{width:40%;height:100vh;position:sticky;top:0;border-left:1px solid #ccc}",
             "aside iframe{width:100%;height:100%;border:0}table{border-collapse:collapse;margin:.5em 0}",
             "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}td:first-child{text-align:left}",
             ".no{color:#b00;font-weight:bold}img{max-width:48%;margin:.2em}</style></head><body><main>",
             "<h1>mgpt evaluation report</h1>"]
    meta = report["meta"]
    if meta.get("workdir"):
        parts.append(f"<p>Run <code>{html.escape(str(meta['workdir']))}</code> (step {meta.get('step')}), dataset "
                     f"<code>{html.escape(str(meta.get('dataset_dir')))}</code>.</p>")
    if gallery:
        parts.append(f"<p>Generated pieces: <a href='{html.escape(gallery)}'>gallery</a> (also on the right).</p>")
    for section, caption, headers, rows, images in report_tables(report):
        parts.append(f"<h2>{html.escape(section)}</h2>")
        if caption:
            parts.append(f"<p>{html.escape(caption)}</p>")
        if headers:
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>")
            for r in rows:
                cells = []
                for c in r:
                    cls = " class='no'" if c is False else ""
                    cells.append(f"<td{cls}>{html.escape(fmt(c).replace('**', ''))}</td>")
                parts.append("<tr>" + "".join(cells) + "</tr>")
            parts.append("</table>")
        parts += [f"<a href='{html.escape(im)}'><img src='{html.escape(im)}' alt='{html.escape(im)}'></a>"
                  for im in images]
    if report.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"]) + "</ul>")
    parts.append("<p>All figures: <a href='report.json'>report.json</a>.</p></main>")
    if gallery:
        parts.append(f"<aside><iframe src='{html.escape(gallery)}' title='generated pieces'></iframe></aside>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))


def write_report(report: dict, output_dir: str | os.PathLike, generated_dir: str | os.PathLike | None = None) -> None:
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, out / "report.md")
    gallery = None
    if generated_dir and (pathlib.Path(generated_dir) / "index.html").is_file():
        gallery = os.path.relpath(pathlib.Path(generated_dir) / "index.html", out)
    write_html(report, out / "report.html", gallery)


# ----------------------------------------------------------------------------- compare
