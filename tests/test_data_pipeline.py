"""The grain input pipeline (mgpt/train/data.py): what a training row looks like."""

import numpy as np
import pytest

from data_prep.vocab import Vocabulary
from mgpt.train import data

VOCAB = Vocabulary(["bach", "folk"])
SEQ = 64


def _piece(n: int, seed: int, low: int = 55, high: int = 70) -> np.ndarray:
    """n events: NOTE_ON/TIME_SHIFT/NOTE_OFF triples of pitches in [low, high)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        p = int(rng.integers(low, high))
        out += [VOCAB.note_on_offset + p - VOCAB.min_pitch, VOCAB.time_shift_offset + 9,
                VOCAB.note_off_offset + p - VOCAB.min_pitch]
    return np.asarray(out[:n], np.int32)


def _record(tokens, style, i=0):
    # The TFDS source returns strings as bytes; in-memory ones may be str: both must work.
    return {"tokens": tokens, "piece_id": f"p{i}", "path": "", "source": "test", "style": style, "composer": b""}


def _corpus(n=60, seed=0):
    rng = np.random.default_rng(seed)
    styles = [b"bach", "folk", ""]
    # Mostly pieces shorter than a row, some much longer: like the demo corpus.
    lengths = np.where(rng.random(n) < 0.2, rng.integers(3 * SEQ, 6 * SEQ, n), rng.integers(5, SEQ, n))
    return [_record(_piece(int(L), i), styles[i % 3], i) for i, L in enumerate(lengths)]


def _batches(ds, n):
    it = iter(ds)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _rows(batches):
    for b in batches:
        for inp, tgt in zip(b["inputs"], b["targets"]):
            yield np.concatenate([inp, tgt[-1:]])


def test_every_piece_starts_with_its_style_token_and_ends_with_eos():
    corpus = _corpus()
    ds = data.train_dataset(corpus, VOCAB, seq_len=SEQ, batch_size=4, seed=0, transpose=0, prefetch=0)
    style_ids = {VOCAB.style_id("bach"), VOCAB.style_id("folk"), VOCAB.unknown_style_id}
    for row in _rows(_batches(ds, 20)):
        assert row[0] in style_ids, "a row starts with a conditioning token"
        # After every EOS comes either padding or the next piece's conditioning token.
        for i in np.flatnonzero(row[:-1] == VOCAB.eos_id):
            assert row[i + 1] == VOCAB.pad_id or row[i + 1] in style_ids
        # Conditioning tokens appear only at piece starts.
        starts = np.flatnonzero(VOCAB.is_style(row))
        assert all(i == 0 or row[i - 1] == VOCAB.eos_id for i in starts)


def test_style_token_matches_the_record_label_bytes_or_str():
    corpus = [_record(_piece(20, 0), b"bach"), _record(_piece(20, 1), "folk"), _record(_piece(20, 2), "")]
    ev = data.eval_batches(corpus, VOCAB, seq_len=SEQ, batch_size=4, num_batches=1, num_packing_bins=4)
    # The three pieces are packed into rows; each brings exactly its own conditioning token.
    present = sorted(int(t) for r in _rows(ev) for t in r[VOCAB.is_style(r)])
    assert present == sorted([VOCAB.style_id("bach"), VOCAB.style_id("folk"), VOCAB.unknown_style_id])


def test_long_pieces_become_random_crops_of_the_piece():
    # TIME_SHIFTs only: no velocity or note is in force at a cut, so nothing is carried.
    piece = np.arange(VOCAB.time_shift_offset, VOCAB.time_shift_offset + 88, dtype=np.int32)
    piece = np.tile(piece, 8)  # 704 events, distinct positions modulo 88
    ds = data.train_dataset([_record(piece, "bach")], VOCAB, seq_len=SEQ, batch_size=1, seed=3, transpose=0,
                            prefetch=0)
    body = np.concatenate([piece, [VOCAB.eos_id]])
    starts = set()
    for row in _rows(_batches(ds, 12)):
        assert row[0] == VOCAB.style_id("bach")
        window = row[1:]
        assert len(window) == SEQ and (window != VOCAB.pad_id).all(), "a crop fills the whole row"
        matches = [s for s in range(len(body) - SEQ + 1) if (body[s : s + SEQ] == window).all()]
        assert matches, "a crop is a contiguous window of the piece"
        starts.add(matches[0] % 88)
    assert len(starts) > 3, "crop offsets vary from epoch to epoch"


def _dynamic_piece(phrases: int = 12, seed: int = 0, notes: int = 21) -> np.ndarray:
    """Phrases of `notes` note events (whole notes), each after its own VELOCITY (bins 5, 6, ...)."""
    parts = [np.concatenate([[VOCAB.velocity_offset + 4 + i], _piece(notes, seed + i)]) for i in range(phrases)]
    return np.concatenate(parts).astype(np.int32)


def _crop_starts(body, window):
    """Every (s, carried) for which `window` (a row without its STYLE) is carried_state(s) + body[s:].
    A cut just before a NOTE_ON and one just after it give the same tokens, so there may be two."""
    found = []
    for s in range(1, len(body)):
        carried = VOCAB.carried_state(body, s, limit=SEQ // 2)
        rest = window[len(carried):]
        stretch = body[s : s + len(rest)]
        if list(window[: len(carried)]) == carried and len(stretch) == len(rest) and (stretch == rest).all():
            found.append((s, carried))
    return found


def test_mid_piece_crops_carry_the_velocity_and_the_sounding_notes():
    piece = _dynamic_piece(4)  # 88 events: a 64-token row has many crops
    body = np.concatenate([piece, [VOCAB.eos_id]])
    ds = data.train_dataset([_record(piece, "bach")], VOCAB, seq_len=SEQ, batch_size=1, seed=0, transpose=0,
                            prefetch=0)
    crops = with_notes = ends_with_eos = 0
    for batch in _batches(ds, 200):
        row = np.concatenate([batch["inputs"][0], batch["targets"][0, -1:]])
        mask = batch["mask"][0]
        used = int((row != VOCAB.pad_id).sum())
        # A crop ends exactly where its end was drawn, so it may leave a slot or two of PAD.
        assert row[0] == VOCAB.style_id("bach") and (row[:used] != VOCAB.pad_id).all() and used >= SEQ - 2
        window = row[1:used]
        if len(window) == SEQ and (window == body[:SEQ]).all():  # the piece's own opening
            continue
        # Otherwise STYLE, the carried state, then a contiguous stretch of the piece.
        found = _crop_starts(body, window)
        assert found, "after the carried state comes a contiguous window of the piece"
        # Targets: the leading velocity (how a sample must begin) and the piece; never a carried NOTE_ON.
        tail = [0] * (SEQ - len(window))
        masks = {len(c): [1] * min(len(c), 1) + [0] * (len(c) - 1) + [1] * (len(window) - len(c)) + tail
                 for _, c in found}
        start, carried = next((s, c) for s, c in found if (mask == masks[len(c)]).all())
        if carried:
            assert carried[0] == _velocity_before(body, start)
        else:
            assert VOCAB.is_velocity(body[start]), "only a crop that opens on a VELOCITY, with no note sounding, carries nothing"
        notes_carried = [t for t in carried if not VOCAB.is_velocity(t)]
        # The only note that can sound at a cut of these pieces is the one struck in the open triple.
        assert len(notes_carried) <= 1
        crops += 1
        with_notes += bool(notes_carried)
        ends_with_eos += int(row[-1] == VOCAB.eos_id)
    assert crops > 100 and with_notes > 20 and ends_with_eos > 0, "mid-piece crops, with and without notes, to EOS"


def _velocity_before(body, end):
    return int(body[:end][VOCAB.is_velocity(body[:end])][-1])


def test_eval_segments_carry_the_state_and_still_count_every_event_once():
    pieces = [_dynamic_piece(12, 0, notes=25), _dynamic_piece(5, 50)]  # cuts fall mid-phrase and mid-note
    ev = data.eval_batches([_record(p, "folk", i) for i, p in enumerate(pieces)], VOCAB, seq_len=SEQ,
                           batch_size=4, num_batches=6)
    assert sum(b["mask"].sum() for b in ev) == sum(len(p) + 1 for p in pieces)
    body = np.concatenate([pieces[0], [VOCAB.eos_id]])
    first_row = np.concatenate([ev[0]["inputs"][0], ev[0]["targets"][0, -1:]])
    second_row = np.concatenate([ev[0]["inputs"][1], ev[0]["targets"][1, -1:]])
    np.testing.assert_array_equal(first_row[1:], body[:SEQ])
    # The second segment continues where the first stopped, after the state carried there.
    carried = VOCAB.carried_state(body, SEQ, limit=SEQ // 2)
    assert second_row[0] == VOCAB.style_id("folk") and carried[0] == _velocity_before(body, SEQ)
    np.testing.assert_array_equal(second_row[1 : 1 + len(carried)], carried)
    np.testing.assert_array_equal(second_row[1 + len(carried) :], body[SEQ : 2 * SEQ - len(carried)])
    assert ev[0]["mask"][1, : len(carried)].sum() == 0, "carried tokens are given in evaluation"


def test_short_pieces_pack_with_under_ten_percent_padding():
    ds = data.train_dataset(_corpus(200), VOCAB, seq_len=SEQ, batch_size=8, seed=0, transpose=0,
                            num_packing_bins=64, prefetch=0)
    assert data.padding_fraction(_batches(ds, 40), VOCAB.pad_id) < 0.10


def _in_carried_block(row, i):
    """True when row[i] is a NOTE_ON/VELOCITY in the run of them that follows a STYLE token."""
    j = i
    while j > 0 and not VOCAB.is_style(row[j - 1]):
        t = row[j - 1]
        if not (VOCAB.is_velocity(t) or VOCAB.note_on_offset <= t < VOCAB.note_off_offset):
            return False
        j -= 1
    return j > 0


def test_mask_excludes_padding_conditioning_and_carried_notes():
    ds = data.train_dataset(_corpus(), VOCAB, seq_len=SEQ, batch_size=4, seed=0, prefetch=0)
    given = 0
    for b in _batches(ds, 5):
        expected = (b["targets"] != VOCAB.pad_id) & ~VOCAB.is_style(b["targets"])
        # Where they differ, the target is a carried NOTE_ON: given context at a crop's start.
        for r, i in zip(*np.nonzero(expected & (b["mask"] == 0))):
            row = np.concatenate([b["inputs"][r], b["targets"][r, -1:]])
            assert VOCAB.note_on_offset <= row[i + 1] < VOCAB.note_off_offset and _in_carried_block(row, i + 1)
            given += 1
        assert not np.any((b["mask"] == 1) & ~expected)
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert given > 0, "some crops carry sounding notes"


def _pitches(tokens):
    on = (tokens >= VOCAB.note_on_offset) & (tokens < VOCAB.note_off_offset)
    return set((tokens[on] - VOCAB.note_on_offset + VOCAB.min_pitch).tolist())


def test_transposition_on_train_only():
    corpus = [_record(_piece(40, i, 60, 61), "bach", i) for i in range(8)]  # every note is pitch 60
    train = data.train_dataset(corpus, VOCAB, seq_len=SEQ, batch_size=4, seed=0, transpose=5, prefetch=0)
    seen = set()
    for b in _batches(train, 10):
        seen |= _pitches(b["inputs"])
    assert seen <= set(range(55, 66)) and len(seen) > 3, f"train pitches are shifted by -5..5: {seen}"
    ev = data.eval_batches(corpus, VOCAB, seq_len=SEQ, batch_size=4, num_batches=4)
    assert set().union(*(_pitches(b["inputs"]) for b in ev)) == {60}, "validation is never transposed"


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_restores_the_exact_position(workers):
    ds = data.train_dataset(_corpus(), VOCAB, seq_len=SEQ, batch_size=4, seed=1, transpose=3, prefetch=2,
                            workers=workers)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    it.close()
    again = iter(ds)
    again.set_state(state)
    for want in expected:
        got = next(again)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    again.close()


def test_shuffle_depends_on_the_seed():
    a = _batches(data.train_dataset(_corpus(), VOCAB, seq_len=SEQ, batch_size=4, seed=0, prefetch=0), 3)
    b = _batches(data.train_dataset(_corpus(), VOCAB, seq_len=SEQ, batch_size=4, seed=0, prefetch=0), 3)
    c = _batches(data.train_dataset(_corpus(), VOCAB, seq_len=SEQ, batch_size=4, seed=9, prefetch=0), 3)
    assert all((x["inputs"] == y["inputs"]).all() for x, y in zip(a, b))
    assert any((x["inputs"] != z["inputs"]).any() for x, z in zip(a, c))


def test_hosts_read_disjoint_slices():
    corpus = [_record(np.full(10, VOCAB.note_on_offset + i, np.int32), "bach", i) for i in range(10)]
    seen = []
    for host in range(2):
        ev = data.eval_batches(corpus, VOCAB, seq_len=SEQ, batch_size=2, num_batches=2, process_index=host,
                               process_count=2)
        ids = set(np.concatenate([b["inputs"].ravel() for b in ev]).tolist())
        seen.append(ids & set(range(VOCAB.note_on_offset, VOCAB.note_on_offset + 10)))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 10


def test_eval_batches_cover_every_event_once_and_pad_to_a_fixed_count():
    corpus = _corpus(20)
    ev = data.eval_batches(corpus, VOCAB, seq_len=SEQ, batch_size=4, num_batches=200)
    assert len(ev) == 200 and all(b["inputs"].shape == (4, SEQ) for b in ev)
    events_plus_eos = sum(len(r["tokens"]) + 1 for r in corpus)
    assert sum(b["mask"].sum() for b in ev) == events_plus_eos


def test_empty_training_split_is_a_clear_error():
    with pytest.raises(ValueError, match="training split is empty"):
        data.train_dataset([], VOCAB, seq_len=SEQ, batch_size=4, seed=0)


def test_packed_rows_keep_each_piece_apart_with_its_own_positions():
    ds = data.train_dataset(_corpus(200), VOCAB, seq_len=SEQ, batch_size=8, seed=0, transpose=0, prefetch=0)
    style_ids = {VOCAB.style_id("bach"), VOCAB.style_id("folk"), VOCAB.unknown_style_id}
    several = 0
    for b in _batches(ds, 10):
        assert set(b) == set(data.BATCH_KEYS)
        for inp, seg, pos in zip(b["inputs"], b["segment_ids"], b["positions"]):
            starts = np.flatnonzero(np.isin(inp, list(style_ids)))
            # A new segment id begins exactly at each conditioning token, and positions restart there.
            np.testing.assert_array_equal(np.flatnonzero(np.diff(seg, prepend=0) > 0), starts)
            assert (pos[starts] == 0).all()
            for s in np.unique(seg[seg > 0]):
                np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
            assert (inp[seg == 0] == VOCAB.pad_id).all(), "segment 0 is padding"
            several += len(starts) > 1
    assert several > 10, "rows do pack several pieces"


def test_hosts_draw_different_crops_and_transpositions():
    # Every piece the same: with the same seeds, every host would make the same rows.
    corpus = [_record(_piece(5 * SEQ, 0), "bach", i) for i in range(8)]
    rows = [np.concatenate([b["inputs"] for b in _batches(
        data.train_dataset(corpus, VOCAB, seq_len=SEQ, batch_size=4, seed=0, transpose=5, prefetch=0,
                           process_index=host, process_count=2), 3)]) for host in range(2)]
    assert (rows[0] != rows[1]).any(axis=1).all(), "no row of host 1 repeats host 0's"


def _global_batches(corpus, process_count, num_shards, n, states=None):
    """n global batches (hosts' rows concatenated in process order) and each host's final state."""
    iters = []
    for host in range(process_count):
        ds = data.train_dataset(corpus, VOCAB, seq_len=SEQ, batch_size=8 // process_count, seed=4, transpose=3,
                                prefetch=2, num_shards=num_shards, process_index=host, process_count=process_count)
        iters.append(iter(ds))
        if states is not None:
            iters[-1].set_state(states)
    out = [{k: np.concatenate([b[k] for b in bs]) for k in bs[0]} for bs in zip(*([next(it) for _ in range(n)]
                                                                                for it in iters))]
    merged = {"num_shards": num_shards, "shards": {}}
    for it in iters:
        merged["shards"].update(it.get_state()["shards"])
        it.close()
    return out, merged


def test_resume_on_another_host_count_replays_and_skips_nothing():
    corpus = _corpus(80)
    uninterrupted, _ = _global_batches(corpus, 2, 2, 9)
    first, state = _global_batches(corpus, 2, 2, 4)  # two hosts stop after 4 batches ...
    rest, _ = _global_batches(corpus, 1, 2, 5, state)  # ... and one host carries on
    for want, got in zip(uninterrupted, first + rest):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    # And back from one host to four: the same global stream, whatever the host count.
    four, _ = _global_batches(corpus, 4, 4, 3)
    one, _ = _global_batches(corpus, 1, 4, 3)
    for want, got in zip(one, four):
        np.testing.assert_array_equal(got["inputs"], want["inputs"])


def test_long_pieces_give_rows_in_proportion_to_their_length():
    short, long = _piece(SEQ // 2, 0), _piece(10 * SEQ, 1)
    corpus = [_record(short, "bach", 0), _record(long, "folk", 1)]
    ds = data.train_dataset(corpus, VOCAB, seq_len=SEQ, batch_size=4, seed=0, transpose=0, prefetch=0)
    folk, bach = VOCAB.style_id("folk"), VOCAB.style_id("bach")
    counts = {folk: 0, bach: 0}
    for row in _rows(_batches(ds, 30)):
        for t in row[VOCAB.is_style(row)]:
            counts[int(t)] += 1
    # 11 (piece, chunk) items of the long piece for 1 of the short one: each epoch crops it 11 times.
    assert 9 < counts[folk] / counts[bach] < 13, counts


def _segment_styles(ds, n):
    """The conditioning token of every segment in n batches (a row may pack several)."""
    out = []
    for row in _rows(_batches(ds, n)):
        out += row[VOCAB.is_style(row)].tolist()
    return np.asarray(out)


def test_style_dropout_conditions_that_share_of_segments_on_unknown_and_zero_changes_nothing():
    labelled = [_record(_piece(40, i), "bach", i) for i in range(60)]  # every piece has a style
    kw = dict(seq_len=SEQ, batch_size=4, seed=3, transpose=2, prefetch=0)
    plain = _batches(data.train_dataset(labelled, VOCAB, **kw), 6)
    off = _batches(data.train_dataset(labelled, VOCAB, style_dropout=0.0, **kw), 6)
    for x, y in zip(plain, off):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    styles = _segment_styles(data.train_dataset(labelled, VOCAB, style_dropout=0.3, **kw), 80)
    share = np.mean(styles == VOCAB.unknown_style_id)
    assert len(styles) > 300 and 0.22 < share < 0.38, share
    assert set(styles.tolist()) == {VOCAB.style_id("bach"), VOCAB.unknown_style_id}
    again = _segment_styles(data.train_dataset(labelled, VOCAB, style_dropout=0.3, **kw), 80)
    np.testing.assert_array_equal(styles, again)  # drawn from the pipeline's seeded rng: reproducible
    with pytest.raises(ValueError, match="style_dropout"):
        data.train_dataset(labelled, VOCAB, style_dropout=1.0, **kw)


def test_a_crop_ends_where_its_end_was_drawn_even_with_many_notes_sounding():
    # Dense chords that ring across every cut: the carried state's length changes with the start.
    rng = np.random.default_rng(0)
    out = []
    held = []
    for _ in range(300):
        p = int(rng.integers(40, 90))
        if p not in held:
            out.append(VOCAB.note_on_offset + p - VOCAB.min_pitch)
            held.append(p)
        if len(held) > 5:
            q = held.pop(int(rng.integers(len(held))))
            out.append(VOCAB.note_off_offset + q - VOCAB.min_pitch)
        out.append(VOCAB.time_shift_offset + int(rng.integers(0, 20)))
    segments = data._Segments(VOCAB, 32)
    body = np.concatenate([np.asarray(out, np.int32), [VOCAB.eos_id]])
    draws = np.random.default_rng(1)
    eos = 0
    for _ in range(400):
        start, end = segments.random_span(body, draws)
        seg = segments.segment(VOCAB.style_id("bach"), body, start, predict_carried=True, end=end)
        carried = segments.carried(body, start)
        assert len(seg["tokens"]) <= 33
        np.testing.assert_array_equal(seg["tokens"][1 + len(carried):], body[start:end])  # ends exactly at end
        eos += int(seg["tokens"][-1] == VOCAB.eos_id)
    assert eos > 0, "the last draws reach EOS"
