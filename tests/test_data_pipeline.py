"""The grain input pipeline (mgpt/data.py): what a training row looks like."""

import numpy as np
import pytest

from data_prep.vocab import Vocabulary
from mgpt import data

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
    piece = np.arange(VOCAB.note_on_offset, VOCAB.note_on_offset + 88, dtype=np.int32)
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


def _dynamic_piece(phrases: int = 12, seed: int = 0, notes: int = 20) -> np.ndarray:
    """Phrases of `notes` note events, each after its own VELOCITY event (bins 5, 6, ...)."""
    parts = [np.concatenate([[VOCAB.velocity_offset + 4 + i], _piece(notes, seed + i)]) for i in range(phrases)]
    return np.concatenate(parts).astype(np.int32)


def _velocity_before(body, end):
    return int(body[:end][VOCAB.is_velocity(body[:end])][-1])


def test_mid_piece_crops_carry_the_velocity_in_force():
    piece = _dynamic_piece(4)  # 84 events: 23 possible crops of a 64-token row
    body = np.concatenate([piece, [VOCAB.eos_id]])
    ds = data.train_dataset([_record(piece, "bach")], VOCAB, seq_len=SEQ, batch_size=1, seed=0, transpose=0,
                            prefetch=0)
    carried = ends_with_eos = 0
    for batch in _batches(ds, 200):
        row = np.concatenate([batch["inputs"][0], batch["targets"][0, -1:]])
        mask = batch["mask"][0]
        assert row[0] == VOCAB.style_id("bach") and (row != VOCAB.pad_id).all()
        window = row[1:]
        if (window == body[:SEQ]).all():  # the piece's own opening (or one identical to it)
            continue
        # Otherwise STYLE, the carried VELOCITY, then a contiguous stretch of the piece.
        rest = window[1:]
        starts = [s for s in range(1, len(body) - len(rest) + 1) if (body[s : s + len(rest)] == rest).all()]
        assert starts, "after the carried velocity comes a contiguous window of the piece"
        assert window[0] == _velocity_before(body, starts[0]), "it is the velocity in force there"
        assert not VOCAB.is_velocity(rest[0]), "a crop that opens on a velocity change carries nothing"
        assert mask.all(), "in training the carried velocity is predicted: it is how a sample must begin"
        carried += 1
        ends_with_eos += int(row[-1] == VOCAB.eos_id)
    assert carried > 100 and ends_with_eos > 0, "mid-piece crops happen, and the end of the piece is reachable"


def test_eval_segments_carry_velocity_and_still_count_every_event_once():
    pieces = [_dynamic_piece(12, 0, notes=25), _dynamic_piece(5, 50)]  # cuts fall mid-phrase
    ev = data.eval_batches([_record(p, "folk", i) for i, p in enumerate(pieces)], VOCAB, seq_len=SEQ,
                           batch_size=4, num_batches=6)
    assert sum(b["mask"].sum() for b in ev) == sum(len(p) + 1 for p in pieces)
    body = np.concatenate([pieces[0], [VOCAB.eos_id]])
    first_row = np.concatenate([ev[0]["inputs"][0], ev[0]["targets"][0, -1:]])
    second_row = np.concatenate([ev[0]["inputs"][1], ev[0]["targets"][1, -1:]])
    np.testing.assert_array_equal(first_row[1:], body[:SEQ])
    # The second segment continues where the first stopped, after the velocity in force there.
    assert second_row[0] == VOCAB.style_id("folk") and second_row[1] == _velocity_before(body, SEQ)
    np.testing.assert_array_equal(second_row[2:], body[SEQ : 2 * SEQ - 1])


def test_short_pieces_pack_with_under_ten_percent_padding():
    ds = data.train_dataset(_corpus(200), VOCAB, seq_len=SEQ, batch_size=8, seed=0, transpose=0,
                            num_packing_bins=64, prefetch=0)
    assert data.padding_fraction(_batches(ds, 40), VOCAB.pad_id) < 0.10


def test_mask_excludes_padding_and_conditioning_tokens():
    ds = data.train_dataset(_corpus(), VOCAB, seq_len=SEQ, batch_size=4, seed=0, prefetch=0)
    for b in _batches(ds, 5):
        expected = (b["targets"] != VOCAB.pad_id) & ~VOCAB.is_style(b["targets"])
        np.testing.assert_array_equal(b["mask"], expected.astype(np.float32))
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


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


def test_iterator_state_restores_the_exact_position():
    ds = data.train_dataset(_corpus(), VOCAB, seq_len=SEQ, batch_size=4, seed=1, transpose=3, prefetch=2)
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
