"""Two evaluation reports side by side: the headline figures of each and the change.

    python -m mgpt.eval.compare out/eval_a out/eval_b    # report folders or report.json files

(`python -m mgpt.evaluate --compare A B` runs the same.)
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence

from mgpt.errors import UserError, reported
from mgpt.eval.pages import fmt


def headline(report: dict) -> dict[str, float | None]:
    """The figures worth comparing between runs, flat."""
    out = {}
    for name, m in report["likelihood"]["models"].items():
        out[f"likelihood.{name}.nats_per_event"] = m["nats_per_event"]
        for s, v in m["per_style"].items():
            out[f"likelihood.{name}.{s}"] = v["nats_per_event"]
    f = report["features"]
    out["features.mean_overlap"] = f["mean_overlap"]["generated_vs_test"]
    out["features.mean_overlap_ceiling"] = f["mean_overlap"]["train_vs_test"]
    out["features.mean_kl"] = f["mean_kl"]["generated_vs_test"]
    for k, v in f["generated_vs_test"].items():
        out[f"features.{k}.overlap"] = v.get("overlap")
    for style, v in report.get("coherence", {}).get("per_style", {}).items():
        for k in ("onset_polyphony", "mean_note_s", "share_notes_ge_4s"):
            out[f"coherence.{style}.{k}"] = v["generated"][k]
    st = report["style"]
    if "real_test" in st:
        out["style.real_test_accuracy"] = st["real_test"]["accuracy"]
        out["style.generated_accuracy"] = st["generated"]["accuracy"]
    og = report["originality"]
    for name in ("generated", "test"):
        out[f"originality.{name}.longest_copy_s_max"] = og[name]["longest_copy_s_max"]
        out[f"originality.{name}.longest_copy_s_median"] = og[name]["longest_copy_s_median"]
        for n, v in og[name]["ngram_share"].items():
            out[f"originality.{name}.ngram{n}_share"] = v
        out[f"originality.{name}.flagged"] = len(og[name]["flagged"])
    out["validity.share"] = report["validity"]["share"]
    return out


def load_report(path: str) -> dict:
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / "report.json"
    try:
        report = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{p}: no report.json (run python -m mgpt.evaluate --output_dir=... first)") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a text file, so not a report.json of mgpt.evaluate") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read it ({e.strerror or e})") from None
    if not isinstance(report, dict):
        raise UserError(f"{p}: holds a JSON {type(report).__name__}, not a report of mgpt.evaluate")
    return report


def _headline_of(path: str) -> dict[str, float | None]:
    report = load_report(path)
    try:
        return headline(report)
    except (KeyError, TypeError, AttributeError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        file = pathlib.Path(path) / "report.json" if pathlib.Path(path).is_dir() else path
        raise UserError(f"{file}: not a complete report of mgpt.evaluate ({what}); re-run the evaluation") from None


def compare(path_a: str, path_b: str) -> str:
    """A text table of two reports' headline figures, with the change."""
    a, b = _headline_of(path_a), _headline_of(path_b)
    keys = list(a) + [k for k in b if k not in a]
    width = max(len(k) for k in keys) + 2
    lines = [f"A = {path_a}", f"B = {path_b}", "", f"{'figure':<{width}}{'A':>12}{'B':>12}{'B - A':>12}"]
    for k in keys:
        va, vb = a.get(k), b.get(k)
        d = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
        lines.append(f"{k:<{width}}{fmt(va, 4):>12}{fmt(vb, 4):>12}{fmt(d, 4) if d is not None else '':>12}")
    return "\n".join(lines)


@reported
def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv if argv is None else argv)[1:]
    if len(args) != 2:
        raise UserError("usage: python -m mgpt.eval.compare RUN_A RUN_B (report folders or report.json)")
    print(compare(*args))


if __name__ == "__main__":
    main()
