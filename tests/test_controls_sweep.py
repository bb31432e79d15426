"""mgpt/eval/controls_sweep.py: its figures, on pieces whose controls are known."""

import numpy as np
import pytest

from data_prep import controls as data_controls
from data_prep.notes import Notes
from data_prep.vocab import Vocabulary
from mgpt.eval import controls_sweep as sweep
from mgpt.sample.run import Sampling

SPEC = {"seconds": 1.0, "levels": 4, "edges": {n: [1.5, 2.5, 3.5] for n in data_controls.BINNED}}
VOCAB = Vocabulary(["bach"]).with_controls(SPEC)


def _notes_with_density(onsets_per_second: list[int]) -> Notes:
    """One C-major triad arpeggio per onset, `onsets_per_second[k]` onsets in second k."""
    start = [k + i / n for k, n in enumerate(onsets_per_second) for i in range(n)]
    pitch = [(60, 64, 67)[i % 3] for i in range(len(start))]
    return Notes(np.array(pitch), np.full(len(start), 80), np.array(start), np.array(start) + 0.1)


def test_sweep_figures_from_the_measured_notes(monkeypatch, tmp_path):
    def fake_generate(run, vocab, folder, controls, num_samples, seed, sampling, style):
        # The 'model' obeys density exactly (and never changes level in a timeline); the rest stays at 1 onset/s.
        if controls.startswith("density="):
            k = int(controls.split("=")[1])
            return [_notes_with_density([k] * 4)] * num_samples, None
        if controls.startswith("0:density="):
            a, b = (int(part.split("=")[1]) for part in controls.split(";"))
            return [_notes_with_density([a, a, b, b]), _notes_with_density([a] * 4)], None
        return [_notes_with_density([1] * 4)] * num_samples, None

    monkeypatch.setattr(sweep, "_generate", fake_generate)
    result = sweep.controls_sweep(run=None, vocab=VOCAB, num_samples=2, max_seconds=4.0, sampling=Sampling(),
                                  output_dir=tmp_path, style="bach", change_s=2.0, log=lambda *_: None)
    density = result["controls"]["density"]
    assert density["exact"] == 1.0 and density["within_1"] == 1.0 and abs(density["spearman"] - 1) < 1e-9
    assert density["segments"] == 4 * 2 * 4  # levels x pieces x whole segments
    # Register never moves with the request: exact only where the request happens to be what is played.
    register = result["controls"]["register"]
    assert abs(register["exact"] - 0.25) < 1e-9 and register["per_level"]["4"]["exact"] == 1.0
    assert abs(register["spearman"]) < 1e-9  # the same pieces whatever the request: no rank order
    timeline = result["timelines"]["0:density=1;2:density=4"]
    assert timeline["follow_s"] == [0.0, None] and timeline["follow_s_median"] == 0.0 and timeline["never"] == 1
    assert (tmp_path / "controls_sweep.png").is_file() and (tmp_path / "controls_sweep.json").is_file()
    assert "| density | 32 | 1.000 | 1.000 | 1.000 |" in sweep.write_controls_sweep(result)


def test_a_pieces_own_timeline_asks_for_what_each_of_its_segments_measures():
    from mgpt.sample import controls

    notes = _notes_with_density([1, 3, 2, 4, 1])  # the last note ends at 4.1 s: four whole segments
    text = sweep.timeline_of(notes, SPEC, 6)
    asked = controls.parse(VOCAB, text).segment_levels(VOCAB, 6)
    np.testing.assert_array_equal(asked[:4], data_controls.segment_levels(notes, SPEC, 4))
    assert not asked[4:].any()  # past the piece's end nothing is asked for (not silence)
    # A level the model's training split never has is left for the model to choose.
    seen = {**SPEC, "seen": {"density": [1, 2, 4], "polyphony": [1, 2, 3, 4], "register": [1, 2, 3, 4],
                             "loudness": [1, 2, 3, 4], "mode": [1, 2, 3]}}
    strict = Vocabulary(["bach"]).with_controls(seen)
    asked = controls.parse(strict, sweep.timeline_of(notes, seen, 4)).segment_levels(strict, 4)
    assert asked[:, 0].tolist() == [1, 0, 2, 4]  # density 3 (second 1) is free
    # One control alone (what that control costs by itself): the same levels, every other control free.
    density = data_controls.ATTRIBUTES.index("density")
    alone = controls.parse(VOCAB, sweep.timeline_of(notes, SPEC, 6, only="density")).segment_levels(VOCAB, 6)
    full = controls.parse(VOCAB, text).segment_levels(VOCAB, 6)
    np.testing.assert_array_equal(alone[:, density], full[:, density])
    assert not np.delete(alone, density, axis=1).any() and np.delete(full[:4], density, axis=1).all()


def test_the_cost_study_names_the_real_timelines_whose_pieces_lose_their_style():
    refs = {"piece_0.mid": "folk/a", "piece_1.mid": "folk/b", "piece_2.mid": "folk/a", "piece_3.mid": "folk/b"}
    verdict = lambda f, got: {"file": f, "conditioned_on": "folk", "classified_as": got}  # noqa: E731
    steered = sweep.misread_by_reference([verdict("piece_0.mid", "bach"), verdict("piece_1.mid", "folk"),
                                          verdict("piece_2.mid", "bach"), verdict("piece_3.mid", "bach")], refs)
    assert steered == {"folk/a": {"pieces": 2, "misread": 2}, "folk/b": {"pieces": 2, "misread": 1}}
    plain = sweep.misread_by_reference([verdict("piece_0.mid", "folk"), verdict("piece_2.mid", "folk"),
                                        verdict("piece_3.mid", "bach")], refs)  # piece_1 had no notes
    assert plain == {"folk/a": {"pieces": 2, "misread": 0}, "folk/b": {"pieces": 1, "misread": 1}}
    text = sweep.write_controls_cost({
        "num_samples": 4, "max_seconds": 20, "styles": ["folk"],
        "rows": {"plain": {"style_accuracy": 0.75, "mean_overlap": 0.9, "overlap_vs_ceiling": 0.95,
                           "by_reference": plain},
                 "steered": {"style_accuracy": 0.25, "mean_overlap": 0.9, "overlap_vs_ceiling": 0.95,
                             "by_reference": steered}}})
    # folk/a loses its style in both steered pieces and neither plain one; folk/b no more than plain.
    assert "- folk/a: 2 of 2 (plain 0 of 2)" in text and "folk/b:" not in text
    # With folk/b's plain piece read right, it is named too, after the worse one.
    plain["folk/b"]["misread"] = 0
    text = sweep.write_controls_cost({"num_samples": 4, "max_seconds": 20, "styles": ["folk"],
                                      "rows": {"plain": {"style_accuracy": 1.0, "mean_overlap": 0.9,
                                                         "overlap_vs_ceiling": 0.95, "by_reference": plain},
                                               "steered": {"style_accuracy": 0.25, "mean_overlap": 0.9,
                                                           "overlap_vs_ceiling": 0.95, "by_reference": steered}}})
    assert text.index("- folk/a: 2 of 2 (plain 0 of 2)") < text.index("- folk/b: 1 of 2 (plain 0 of 1)")


def test_the_cost_study_refuses_a_style_with_no_real_timeline_before_any_work():
    from mgpt.eval.inputs import Options, Piece

    folk = Piece(np.zeros(4, np.int32), "folk", "", "folk/1")
    with pytest.raises(ValueError, match="no reference piece of style bach to take a timeline from"):
        # run=None: nothing may be generated (or the reference features computed) before the check.
        sweep.controls_cost(run=None, vocab=VOCAB, train=[folk], test=[folk], num_samples=4, styles=["folk", "bach"],
                            max_seconds=4.0, sampling=Sampling(), options=Options(), output_dir="unused",
                            timelines_from=[folk])
