"""Evaluation: n-gram baseline, musical features, originality search, style classifier, LSTM, report."""

import math

import numpy as np
import pytest

from mgpt.music import features as F
from mgpt.music import ngram
from mgpt.music import originality
from mgpt import eval as ev
from mgpt.music import style_classifier as sc


def notes_of(rows):
    """[(pitch, velocity, start_s, end_s), ...] -> the parallel arrays decode_notes gives."""
    a = np.asarray(rows, np.float64).reshape(-1, 4)
    return a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2], a[:, 3]


# ----------------------------------------------------------------------------- n-gram


def test_kneser_ney_matches_hand_computed_bigram_probabilities():
    # Vocabulary {0: PAD, 1, 2, 3}; one training piece [1, 2, 1, 2, 3]; D = 0.5 at both orders.
    # Bigrams: (1,2) x2, (2,1), (2,3). Unigram continuation counts: 1 each for 1, 2, 3 (3 types).
    # P1(w) = (1 - .5)/3 + .5 * 3/3 * 1/4 = 7/24 for w in {1,2,3}.
    # P(2|1) = (2 - .5)/2 + .5 * 1/2 * 7/24 = 79/96 ; P(3|2) = (1 - .5)/2 + .5 * 2/2 * 7/24 = 19/48.
    lm = ngram.KneserNey(2, 4, discounts=[0.5, 0.5]).fit([np.array([1, 2, 1, 2, 3])])
    lp = lm.log_probs(np.array([1, 2, 3]))
    np.testing.assert_allclose(lp, [math.log(79 / 96), math.log(19 / 48)], rtol=1e-12)
    nats, count = lm.nll([np.array([1, 2, 3])])
    assert count == 2 and nats == pytest.approx(-math.log(79 / 96) - math.log(19 / 48))


def test_kneser_ney_distributions_sum_to_one_in_seen_and_unseen_contexts():
    rng = np.random.default_rng(0)
    v = 12
    train = [rng.integers(1, v, size=rng.integers(5, 40)) for _ in range(30)]
    lm = ngram.KneserNey(5, v).fit(train)
    for context in (train[0][:6], np.array([3, 3, 3, 3, 3, 3]), np.array([11, 1, 2])):
        total = sum(math.exp(lm.log_probs(np.append(context, w))[-1]) for w in range(v))
        assert total == pytest.approx(1.0, abs=1e-9)


def test_kneser_ney_prefers_the_training_pattern():
    train = [np.array([5] + [1, 2, 3, 4] * 20)] * 3
    lm = ngram.KneserNey(5, 8).fit(train)
    seen, _ = lm.nll([np.array([5, 1, 2, 3, 4, 1, 2, 3, 4])])
    shuffled, _ = lm.nll([np.array([5, 4, 3, 2, 1, 4, 3, 2, 1])])
    assert seen < 0.1 * shuffled


# ----------------------------------------------------------------------------- features

C_MAJOR_SCALE = notes_of([(p, 80, 0.5 * i, 0.5 * (i + 1)) for i, p in enumerate([60, 62, 64, 65, 67, 69, 71, 72])])


def test_features_of_a_c_major_scale():
    f = F.piece_features(C_MAJOR_SCALE)
    assert f["pitch_range"] == 12
    assert f["used_pitches"] == 8
    assert f["used_pitch_classes"] == 7
    np.testing.assert_allclose(f["pitch_class_histogram"], np.array([2, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1]) / 8)
    assert f["pitch_class_entropy"] == pytest.approx(2.75)  # -(1/4 log2 1/4 + 6 * 1/8 log2 1/8)
    assert f["polyphony"] == pytest.approx(1.0)
    assert f["note_density"] == pytest.approx(2.0)  # 8 notes in 4 s
    assert f["ioi_mean_s"] == pytest.approx(0.5)
    assert f["duration_mean_s"] == pytest.approx(0.5)
    assert f["velocity_mean"] == 80 and f["velocity_std"] == 0
    assert f["scale_consistency"] == 1.0
    ioi_bin = np.searchsorted(F.TIME_BIN_EDGES_S, 0.5, side="right") - 1
    assert f["ioi_histogram"][ioi_bin] == 1.0 and f["duration_histogram"][ioi_bin] == 1.0


def test_features_of_a_chord_then_a_note():
    # C-E-G for 1 s (velocities 40, 60, 80), then D alone for 1 s (velocity 100).
    piece = notes_of([(60, 40, 0, 1), (64, 60, 0, 1), (67, 80, 0, 1), (62, 100, 1, 2)])
    f = F.piece_features(piece)
    assert f["polyphony"] == pytest.approx(2.0)  # 3 sounding for 1 s, 1 for 1 s
    assert f["ioi_mean_s"] == pytest.approx(1.0)  # the chord is one onset
    assert f["note_density"] == pytest.approx(2.0)
    assert f["velocity_mean"] == pytest.approx(70.0)
    assert f["velocity_std"] == pytest.approx(np.std([40, 60, 80, 100]))
    assert f["pitch_range"] == 7


def test_chromatic_cluster_has_maximal_entropy_and_low_scale_consistency():
    piece = notes_of([(60 + i, 64, 0.25 * i, 0.25 * i + 0.2) for i in range(12)])
    f = F.piece_features(piece)
    assert f["pitch_class_entropy"] == pytest.approx(math.log2(12))
    assert f["scale_consistency"] == pytest.approx(7 / 12)
    assert f["used_pitch_classes"] == 12


def test_overlap_is_high_for_the_same_distribution_and_low_for_a_different_one():
    rng = np.random.default_rng(0)
    real = {k: rng.normal(5, 1, 60) if k in F.SCALAR_FEATURES else rng.dirichlet(np.ones(12), 60)
            for k in F.FEATURES}
    same = {k: rng.normal(5, 1, 60) if k in F.SCALAR_FEATURES else rng.dirichlet(np.ones(12), 60)
            for k in F.FEATURES}
    far = {k: rng.normal(15, 1, 60) if k in F.SCALAR_FEATURES else rng.dirichlet(np.ones(12) * 0.05, 60)
           for k in F.FEATURES}
    close, apart = F.compare_sets(same, real), F.compare_sets(far, real)
    for k in F.FEATURES:
        assert close[k]["overlap"] > 0.8, k
        assert apart[k]["overlap"] < close[k]["overlap"] - 0.3, k
        assert apart[k]["kl"] > close[k]["kl"], k


# ----------------------------------------------------------------------------- originality


def random_piece(rng, n, t0=0.0):
    pitch = rng.integers(48, 84, n)
    onset = t0 + np.cumsum(rng.choice([0.0, 0.12, 0.25, 0.37, 0.5, 0.75], n))
    return pitch, np.full(n, 64), onset, onset + 0.3


def test_originality_finds_a_planted_transposed_copy_and_none_elsewhere():
    rng = np.random.default_rng(1)
    train = [random_piece(rng, 300) for _ in range(5)]
    # 24 notes of training piece 3 (notes 100..123), transposed up 3 and moved in time, inside new material.
    p, v, s, e = train[3]
    span = slice(100, 124)
    cp, cs = p[span] + 3, s[span] - s[100] + 40.0
    a, b = random_piece(rng, 60), random_piece(rng, 60, t0=60.0)
    piece = (np.concatenate([a[0], cp, b[0]]), np.full(144, 64), np.concatenate([a[2], cs, b[2]]),
             np.concatenate([a[2], cs, b[2]]) + 0.3)
    index = originality.CopyIndex(train)
    copy, _ = index.longest_copy(piece)
    assert copy.notes >= 24 and copy.notes <= 26
    assert copy.train_piece == 3
    assert copy.seconds == pytest.approx(s[123] - s[100], abs=0.011)

    unrelated, _ = index.longest_copy(random_piece(rng, 200))
    assert unrelated.notes < 7

    report = originality.originality_report(index, [piece, random_piece(rng, 200)], threshold_s=5.0)
    assert report["flagged"] == [0]
    # A training piece is all copied: every 8- and 16-note window is found.
    self_report = originality.originality_report(index, [train[2]])
    assert self_report["ngram_share"] == {"8": 1.0, "16": 1.0}


def test_suffix_array_sorts_suffixes():
    codes = np.array([3, 1, 2, 3, 1, 2, 0, 3, 1], np.int64)
    sa = originality.suffix_array(codes)
    assert [tuple(codes[i:]) for i in sa] == sorted(tuple(codes[i:]) for i in range(len(codes)))


# ----------------------------------------------------------------------------- style classifier


def synthetic_style_piece(rng, style):
    n = int(rng.integers(30, 60))
    if style == "hymn":  # low, diatonic, slow, stepwise
        scale = np.array([0, 2, 4, 5, 7, 9, 11])
        pitch = 48 + scale[np.clip(np.cumsum(rng.integers(-1, 2, n)) % 7, 0, 6)] + 12 * rng.integers(0, 2, n)
        ioi = rng.choice([0.5, 1.0], n)
    else:  # "jig": high, chromatic leaps, fast
        pitch = rng.integers(66, 90, n)
        ioi = rng.choice([0.125, 0.25], n)
    onset = np.cumsum(ioi)
    return pitch, np.full(n, 70), onset, onset + 0.9 * ioi


def test_style_classifier_beats_chance_on_two_synthetic_styles():
    rng = np.random.default_rng(0)
    labels = ["hymn", "jig"] * 15
    clf = sc.StyleClassifier().fit([synthetic_style_piece(rng, s) for s in labels], labels)
    test_labels = ["hymn", "jig"] * 10
    predicted = clf.predict([synthetic_style_piece(rng, s) for s in test_labels])
    result = sc.score(test_labels, predicted, clf.labels)
    assert result["accuracy"] >= 0.9
    assert np.asarray(result["confusion"]).sum() == 20


# ----------------------------------------------------------------------------- LSTM baseline


def test_lstm_gives_logits_of_every_position_and_learns_a_pattern():
    import jax
    import optax
    from flax import nnx

    from mgpt.model import lstm

    cfg = lstm.LSTMConfig(vocab_size=11, num_layers=2, d_model=16)
    model = nnx.jit(lambda: lstm.LSTMLM(cfg, rngs=nnx.Rngs(0)))()
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    graphdef, params = nnx.split(model, nnx.Param)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    tokens_BxL = np.tile(np.arange(1, 11, dtype=np.int32), (4, 3))[:, :21]
    changed = tokens_BxL.copy()
    changed[:, 10] = 3
    logits_2BxLxV = np.asarray(forward(params, np.concatenate([tokens_BxL, changed])))
    assert logits_2BxLxV.shape == (8, 21, 11) and logits_2BxLxV.dtype == np.float32
    # Causal: changing a later token leaves earlier logits unchanged.
    np.testing.assert_allclose(logits_2BxLxV[4:, :10], logits_2BxLxV[:4, :10], atol=1e-5)
    assert not np.allclose(logits_2BxLxV[4:, 10:], logits_2BxLxV[:4, 10:])

    tx = optax.adam(3e-2)
    opt = tx.init(params)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(tokens_BxL[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxL[:, 1:]).mean()

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    losses = []
    for _ in range(15):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_lstm_config_comes_from_the_shared_config_file():
    from configs import lstm as lstm_config
    from configs import small
    from mgpt.model import lstm
    from mgpt.model import kinds as models

    c = lstm_config.get_config()
    assert c.model.kind == "lstm"
    # Same data and schedule as the GPT it is compared with: the same number of training tokens.
    g = small.get_config()
    assert (c.train.steps, c.train.batch_size, c.data.seq_len) == (g.train.steps, g.train.batch_size, g.data.seq_len)
    cfg = models.model_config(c.model, vocab_size=300)
    assert isinstance(cfg, lstm.LSTMConfig) and cfg.num_layers == 2
    assert cfg.flops_per_token(256) == pytest.approx(6 * (2 * 8 * cfg.d_model**2 + cfg.d_model * 300))


# ----------------------------------------------------------------------------- the report, end to end


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """A report from synthetic two-style data, untrained tiny GPT + LSTM, and a generated folder."""
    import json

    import note_seq
    from flax import nnx

    from data_prep.vocab import Vocabulary
    from mgpt import eval as E
    from mgpt.model import lstm
    from mgpt.model import GPT, ModelConfig

    rng = np.random.default_rng(0)
    vocab = Vocabulary(["hymn", "jig"])

    def piece(style):
        notes = synthetic_style_piece(rng, style)
        return E.Piece(vocab.encode_notes(*notes), style, "", f"{style}{rng.integers(1e6)}")

    train = [piece(s) for s in ["hymn", "jig"] * 12]
    test = [piece(s) for s in ["hymn", "jig"] * 3]
    gen_dir = tmp_path_factory.mktemp("generated")
    entries = []
    sources = [("hymn", synthetic_style_piece(rng, "hymn")), ("jig", synthetic_style_piece(rng, "jig")),
               ("jig", vocab.decode_notes(train[1].tokens))]  # the last one copies a training piece
    for i, (style, notes) in enumerate(sources):
        name = f"{i:05d}_{style}.mid"
        note_seq.sequence_proto_to_midi_file(vocab.decode(vocab.encode_notes(*notes)), str(gen_dir / name))
        entries.append({"index": i, "file": name, "style": style})
    (gen_dir / "00003_hymn.mid").write_bytes(b"not a midi file")
    entries.append({"index": 3, "file": "00003_hymn.mid", "style": "hymn"})
    (gen_dir / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (gen_dir / "index.html").write_text("<html>gallery</html>")

    # Built inside one jit each: eager init compiles every random op separately.
    gpt = nnx.jit(lambda: GPT(ModelConfig(vocab.size, num_layers=1, num_heads=2, d_model=32, mlp_dim=64, max_len=64),
                              rngs=nnx.Rngs(0)))()
    lstm_model = nnx.jit(lambda: lstm.LSTMLM(lstm.LSTMConfig(vocab.size, num_layers=1, d_model=32), rngs=nnx.Rngs(1)))()
    models = [E.Model("gpt", gpt, vocab, 64, 1, 640, 10), E.Model("lstm", lstm_model, vocab, 64, 1, 640, 10)]
    out = tmp_path_factory.mktemp("report")
    generated = E.read_generated(gen_dir, vocab)
    report = E.evaluate(vocab=vocab, train=train, test=test, generated=generated, models=models,
                        options=E.Options(ngram_order=3, crop_seconds=20.0, copy_threshold_s=5.0),
                        output_dir=out, log=lambda *a: None, validation=test[:2])
    from mgpt.eval import pages as report_lib

    report_lib.write_report(report, out, gen_dir)
    return out, json.loads((out / "report.json").read_text())


def test_report_json_has_every_section(tiny_report):
    out, report = tiny_report
    for section in ("meta", "likelihood", "features", "coherence", "style", "originality", "validity", "targets"):
        assert section in report, section
    models = report["likelihood"]["models"]
    assert set(models) == {"gpt", "lstm", "ngram3"}
    for m in models.values():
        assert m["bits_per_event"] == pytest.approx(m["nats_per_event"] / math.log(2))
        assert set(m["per_style"]) == {"hymn", "jig"}
    # An untrained GPT is near uniform; the n-gram has learned something.
    assert models["ngram3"]["nats_per_event"] < models["gpt"]["nats_per_event"]
    assert set(report["features"]["generated_vs_test"]) == set(F.FEATURES)
    assert 0 <= report["features"]["mean_overlap"]["train_vs_test"] <= 1
    assert report["style"]["real_test"]["count"] == 6 and report["style"]["generated"]["count"] == 3
    assert (report["validity"]["files"], report["validity"]["valid"], report["validity"]["share"]) == (4, 3, 0.75)
    assert report["validity"]["invalid_files"] == ["00003_hymn.mid"]
    assert report["originality"]["generated"]["flagged_files"] == ["00002_jig.mid"]
    assert {t["target"].split(" ")[0] for t in report["targets"]} >= {"GPT", "style", "no", "mean", "100%", "every"}
    lstm_targets = [t["target"] for t in report["targets"] if "LSTM" in t["target"]]
    assert [t.split(" on ")[1].split(" at ")[0] for t in lstm_targets] == ["validation", "test without the outlier",
                                                                           "test"]
    for m in (models["gpt"], models["lstm"]):  # validation, the outlier apart, and the worst pieces
        assert m["validation"]["events"] > 0 and m["without_outlier"]["events"] + m["outlier"]["events"] == m["events"]
        assert len(m["worst_pieces"]) == 5
        rates = [w["nats_per_event"] for w in m["worst_pieces"]]
        assert rates == sorted(rates, reverse=True)
    assert report["likelihood"]["outlier"]["piece_id"].startswith(("hymn", "jig"))
    assert set(report["coherence"]["per_style"]) <= {"hymn", "jig"} and report["coherence"]["per_style"]
    for v in report["coherence"]["per_style"].values():  # the real train pieces are judged beside the model
        assert v["train"]["pieces"] > 0 and isinstance(v["train_off"], list)
    for name in ("report.md", "report.html", "style_confusion.png", "feature_polyphony.png"):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()
    assert "index.html" in page and "feature_polyphony.png" in page and "Originality" in page


def test_the_outlier_is_the_piece_holding_most_ngram_nats_and_every_model_drops_it():
    from mgpt.eval.likelihood import _scores, outlier_index, worst_pieces

    pieces = [ev.Piece(np.zeros(3, np.int32), "hymn", "", f"p{i}") for i in range(4)]
    count = np.array([100, 100, 800, 100])
    ngram_nats = np.array([200.0, 210.0, 2400.0, 190.0])  # p2: long and badly predicted
    assert outlier_index(ngram_nats) == 2
    model_nats = np.array([100.0, 150.0, 1600.0, 90.0])
    s = _scores(model_nats, count, pieces, outlier_index(ngram_nats))
    assert s["without_outlier"]["nats_per_event"] == pytest.approx(340.0 / 300)
    assert s["outlier"]["nats_per_event"] == pytest.approx(2.0)
    assert [w["piece_id"] for w in worst_pieces(model_nats, count, pieces, n=2)] == ["p2", "p1"]


def test_compare_prints_two_reports_side_by_side(tiny_report, tmp_path, capsys):
    import json

    from mgpt import evaluate as E

    out, report = tiny_report
    report["likelihood"]["models"]["gpt"]["nats_per_event"] -= 1.0
    (tmp_path / "report.json").write_text(json.dumps(report))
    E.main(["evaluate", "--compare", str(out), str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("likelihood.gpt.nats_per_event"))
    assert row.split()[-1] == "-1.0000"
    with pytest.raises(SystemExit, match="no report.json"):
        E.main(["evaluate", "--compare", str(out), str(tmp_path / "missing")])


def test_coherence_flags_a_style_whose_notes_drone():
    def chorale(hold):  # four voices, a chord every 0.5 s; `hold` s per note
        starts = np.repeat(np.arange(16) * 0.5, 4)
        pitch = np.tile([48, 55, 60, 64], 16)
        return pitch, np.full(64, 80), starts, starts + hold

    real = [("bach", chorale(0.5)) for _ in range(3)]
    assert F.onset_polyphony(*chorale(0.5)[2:]) == pytest.approx(4.0)
    assert F.onset_polyphony(*chorale(2.0)[2:]) > 12  # each held note is counted at 3 later onsets
    good = ev.coherence_by_style([("bach", chorale(0.45))] * 2, real, 30.0)
    assert good["flagged_styles"] == [] and good["per_style"]["bach"]["off"] == []
    drone = ev.coherence_by_style([("bach", chorale(4.5))] * 2, real, 30.0)
    assert drone["flagged_styles"] == ["bach"]
    assert set(drone["per_style"]["bach"]["off"]) == {"onset_polyphony", "mean_note_s", "share_notes_ge_4s"}
    # Thick test pieces (held notes) against a train split like the generated ones: the flag stays
    # against the test pieces, and the train figures show the test split is what is off.
    thick = ev.coherence_by_style([("bach", chorale(0.5))] * 2, [("bach", chorale(1.0))] * 2, 30.0,
                                  train=real)
    bach = thick["per_style"]["bach"]
    assert "onset_polyphony" in bach["off"] and bach["train"]["pieces"] == 3
    assert bach["ratio_to_train"]["onset_polyphony"] == pytest.approx(1.0)
    assert bach["test_vs_train"]["onset_polyphony"] > 1.25
    # The same rule applied to the real train pieces says the flag is the split's...
    assert "onset_polyphony" in bach["train_off"] and thick["flagged_for_train"] == ["bach"]
    # ...and stays quiet when the test pieces are like the train ones and only the model drones.
    # The 25 % tolerance itself, on a one-voice line (a note a second): 1.2x the real note length
    # passes, 1.3x is off.
    def line(hold):
        starts = np.arange(20) * 1.0
        return np.full(20, 60), np.full(20, 80), starts, starts + hold

    assert ev.coherence_by_style([("folk", line(0.6))], [("folk", line(0.5))], 30.0)["flagged_styles"] == []
    long = ev.coherence_by_style([("folk", line(0.65))], [("folk", line(0.5))], 30.0)
    assert long["per_style"]["folk"]["off"] == ["mean_note_s"]
    drone = ev.coherence_by_style([("bach", chorale(4.5))] * 2, real, 30.0, train=[("bach", chorale(0.45))] * 3)
    assert drone["flagged_styles"] == ["bach"] and drone["flagged_for_train"] == []
    assert drone["per_style"]["bach"]["train_off"] == []


def test_guidance_sweep_reports_each_value_with_the_reports_own_sections(tmp_path):
    import json

    from flax import nnx

    from data_prep.vocab import Vocabulary
    from mgpt import generate
    from mgpt.model import GPT, ModelConfig

    rng = np.random.default_rng(1)
    vocab = Vocabulary(["hymn", "jig"])

    def piece(style):
        return ev.Piece(vocab.encode_notes(*synthetic_style_piece(rng, style)), style, "", f"{style}{rng.integers(1e6)}")

    train = [piece(s) for s in ["hymn", "jig"] * 10]
    test = [piece(s) for s in ["hymn", "jig"] * 3]
    model = nnx.jit(lambda: GPT(ModelConfig(vocab.size, num_layers=1, num_heads=2, d_model=32, mlp_dim=64,
                                            max_len=32), rngs=nnx.Rngs(0)))()
    run = generate.Run(model=model, vocab=vocab)
    sampling = generate.Sampling(max_events=40, max_note_seconds=0)
    result = ev.guidance_sweep(run=run, vocab=vocab, train=train, test=test, guidances=[1.0, 2.5], num_samples=4,
                               styles=["hymn", "jig"], sampling=sampling, output_dir=tmp_path, progress=False,
                               log=lambda *a: None)
    assert [r["guidance"] for r in result["rows"]] == [1.0, 2.5]
    for r in result["rows"]:
        folder = tmp_path / r["generated_dir"]
        entries = generate.read_all_manifests(folder)
        assert [e["settings"]["guidance"] for e in entries] == [r["guidance"]] * 4
        assert "copy" not in entries[0]  # the model is measured, not the copy guard
        # The row's figures are exactly the report sections' over that folder.
        refs = ev.references(vocab, train, test, ev.Options(), np.random.default_rng(0), log=lambda *a: None)
        valid = [g for g in ev.read_generated(folder, vocab) if g.valid]
        assert r["pieces"] == len(valid) > 0
        assert r["style_accuracy"] == ev.style_section(refs, valid, ev.Options(), None)["generated"]["accuracy"]
        assert r["longest_copy_s_max"] == ev.originality_section(refs, valid, ev.Options())["generated"][
            "longest_copy_s_max"]
        assert r["overlap_vs_ceiling"] == pytest.approx(r["mean_overlap"] / result["overlap_ceiling"])
    # G = 1 is plain sampling: the same files as generating without guidance.
    plain = tmp_path / "plain"
    generate.generate_corpus(run, plain, num_samples=4, styles=["hymn", "jig"], sampling=sampling, progress=False,
                             max_copy_seconds=0)
    for e in generate.read_all_manifests(plain):
        assert (plain / e["file"]).read_bytes() == (tmp_path / "guidance_1" / e["file"]).read_bytes()
    assert (tmp_path / "guidance_sweep.png").is_file()
    assert json.loads((tmp_path / "guidance_sweep.json").read_text())["rows"] == result["rows"]
    assert "| 2.5 | 4 |" in ev.write_guidance_sweep(result)
    with pytest.raises(ev.UserError, match="--guidance_sweep=1,x"):
        ev.parse_guidances("1,x")


def test_composer_study_on_a_one_style_dataset_measures_nll_without_a_classifier(tmp_path, monkeypatch):
    """A dataset of one composer has no second style to tell apart: the study reports the NLL
    before and after, and says no classifier was fitted, instead of failing."""
    import types

    from flax import nnx

    from data_prep.vocab import Vocabulary
    from mgpt.eval import composer as study
    from mgpt.model import GPT, ModelConfig

    rng = np.random.default_rng(2)
    vocab = Vocabulary(["hymn"])
    pieces = {split: [ev.Piece(vocab.encode_notes(*synthetic_style_piece(rng, "hymn")), "hymn", "", f"{split}{i}")
                      for i in range(n)] for split, n in (("train", 6), ("test", 3))}

    def run(name, workdir):
        model = nnx.jit(lambda: GPT(ModelConfig(vocab.size, num_layers=1, num_heads=2, d_model=32, mlp_dim=64,
                                                max_len=32), rngs=nnx.Rngs(len(name))))()
        config = types.SimpleNamespace(data=types.SimpleNamespace(dataset_dir=str(tmp_path)))
        return ev.Model(name, model, vocab, 32, 0, None, 1, workdir), vocab, config

    vocab.save(tmp_path / "vocab.json")  # the dataset's vocabulary: the study checks it means the model's events
    monkeypatch.setattr(study, "model_from_run", run)
    monkeypatch.setattr(study, "resolve_dataset", lambda d: d)
    monkeypatch.setattr(study, "load_split", lambda d, split: pieces[split])
    result = study.composer_study(base_workdir="base", finetuned_workdir="ft", composer="hymn", num_samples=2,
                                  max_seconds=2.0, log=lambda *a: None)
    assert result["test_pieces"] == 3 and result["real_test_classified_as_composer"] is None
    for name in ("before", "after"):
        assert result[name]["composer_test"]["nats_per_event"] > 0
        assert result[name]["classified_as_composer"] is None
    assert "no style classifier was fitted" in study.write_composer_study(result, tmp_path / "out")


def test_evaluation_guards_notes_by_the_training_data_not_the_evaluated_dataset(tmp_path):
    import json
    import types

    import ml_collections

    from data_prep.vocab import Vocabulary
    from mgpt import evaluate as E

    for name, p995 in (("train_ds", 1.9), ("other_ds", 6.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "build.json").write_text(json.dumps({"note_seconds": {"all": {"p99.5": p995}}}))
    config = ml_collections.ConfigDict({"data": {"dataset_dir": str(tmp_path / "train_ds"), "style_dropout": 0.0}})
    vocab = Vocabulary(["hymn"])
    flags = types.SimpleNamespace(workdir="run", style="all", temperature=0.9, top_p=0.95, max_seconds=30.0,
                                  max_note_seconds=None, guidance=None, controls=None, mood=None, density_guard=True,
                                  register_guard=False, mode_guard=True, polyphony_guard=True, scale_guard=True,
                                  loudness_guard=True, control_tries=1, prefer_style=False, steered_guidance=None,
                                  contrast_style="")
    gpt = types.SimpleNamespace(model=None, step=1)
    run, _, _ = E._sampling_run(flags, gpt, vocab, config, tmp_path / "other_ds")
    assert run.note_seconds["all"]["p99.5"] == 1.9
    config.data.dataset_dir = str(tmp_path / "gone")  # the training data is not on this machine
    run, _, _ = E._sampling_run(flags, gpt, vocab, config, tmp_path / "other_ds")
    assert run.note_seconds["all"]["p99.5"] == 6.0


def test_nats_by_kind_add_up_to_the_pieces_nats():
    # The recipe's per-kind table must split the same nats the likelihood section reports.
    from data_prep.vocab import Vocabulary
    from mgpt.eval.likelihood import EVENT_KINDS, event_kinds, model_nats
    from flax import nnx

    from mgpt.model import GPT, ModelConfig

    vocab = Vocabulary(["bach"])
    ids = np.array([vocab.note_on_offset, vocab.note_off_offset, vocab.time_shift_offset, vocab.velocity_offset,
                    vocab.style_offset, vocab.eos_id])
    assert [EVENT_KINDS[k] for k in event_kinds(vocab, ids)] == ["NOTE_ON", "NOTE_OFF", "TIME_SHIFT", "VELOCITY",
                                                                   "other", "other"]
    model = GPT(ModelConfig(vocab_size=vocab.size, num_layers=1, num_heads=2, d_model=16, mlp_dim=32, max_len=16),
                rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    wins = []
    for i in range(3):
        tokens = np.concatenate([[vocab.style_id("bach")], rng.integers(2, vocab.style_offset, 10 + i)]).astype(np.int32)
        wins.append((i, tokens, np.arange(len(tokens)) > 0))
    out: dict = {}
    nats, count = model_nats(model, wins, 16, 3, batch_size=2, by_kind=(vocab, out))
    assert sum(c for _, c in out.values()) == count.sum() == 33
    assert abs(sum(n for n, _ in out.values()) - nats.sum()) < 1e-3
