"""Likelihood section: nats/bits per event and perplexity on the test split.

Each model (the GPT, and an LSTM when given) and an interpolated Kneser-Ney n-gram
fitted on the train split score the same windows: whole test pieces, no
transposition, cut into seq_len windows that each start with the piece's
conditioning token, exactly like the trainer's eval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from flax import nnx

from data_prep.vocab import Vocabulary
from mgpt.music import ngram as ngram_lib
from mgpt.errors import UserError
from mgpt.eval.inputs import Model, Options, Piece
from mgpt.model.kinds import target_log_probs

LN2 = math.log(2.0)


def windows(pieces: Sequence[Piece], vocab: Vocabulary, seq_len: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(piece index, tokens, predicted) windows covering each piece's events + EOS once.

    The trainer's own eval cut (`mgpt.train.data.piece_segments`): each window starts with the
    piece's conditioning token, plus the state carried when it starts mid-piece (the
    VELOCITY in force and the notes still sounding); those are given, never predicted. `predicted` is a bool per token.
    """
    from mgpt.train import data as data_lib

    out = []
    for i, p in enumerate(pieces):
        for seg in data_lib.piece_segments(np.asarray(p.tokens, np.int32), p.style, vocab, seq_len):
            out.append((i, seg["tokens"], seg["loss"].astype(bool)))
    return out


EVENT_KINDS = ("NOTE_ON", "NOTE_OFF", "TIME_SHIFT", "VELOCITY", "other")


def event_kinds(vocab: Vocabulary, ids: np.ndarray) -> np.ndarray:
    """The index in EVENT_KINDS of each id (EOS, STYLE, FIM and control tokens are 'other')."""
    ids = np.asarray(ids)
    bounds = (vocab.note_on_offset, vocab.note_off_offset, vocab.time_shift_offset, vocab.velocity_offset,
              vocab.style_offset)
    kind = np.searchsorted(np.asarray(bounds), ids, side="right") - 1  # -1 below NOTE_ON, 4 from STYLE on
    return np.where((kind < 0) | (kind > 3), 4, kind)


def model_nats(model, wins: Sequence[tuple[int, np.ndarray, np.ndarray]], seq_len: int, num_pieces: int,
               batch_size: int = 16, by_kind: tuple[Vocabulary, dict] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per piece (nats, predicted tokens) under a model called as model(tokens_BxL) -> logits_BxLxV.

    by_kind: (vocab, out): out[kind] accumulates [nats, tokens] per EVENT_KINDS name, which
    shows what a model predicts worse than another (e.g. which notes end)."""
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
        lp_BxL = np.asarray(target_log_probs(graphdef, state, rows_BxL1[:, :-1], rows_BxL1[:, 1:]))
        for r, (i, _, predicted) in enumerate(chunk):
            nats[i] -= float(lp_BxL[r][mask_BxL[r]].astype(np.float64).sum())
            count[i] += int(predicted.sum())
        if by_kind is not None:
            vocab, out = by_kind
            kind_BxL = event_kinds(vocab, rows_BxL1[:, 1:])
            for k, name in enumerate(EVENT_KINDS):
                sel_BxL = mask_BxL & (kind_BxL == k)
                acc = out.setdefault(name, [0.0, 0])
                acc[0] -= float(lp_BxL[sel_BxL].astype(np.float64).sum())
                acc[1] += int(sel_BxL.sum())
    return nats, count


def ngram_nats(lm: ngram_lib.KneserNey, wins: Sequence[tuple[int, np.ndarray, np.ndarray]], num_pieces: int):
    nats = np.zeros(num_pieces)
    count = np.zeros(num_pieces, np.int64)
    for i, w, predicted in wins:
        nats[i] -= float(lm.log_probs(w)[predicted[1:]].sum())
        count[i] += int(predicted.sum())
    return nats, count


def rates(nats: float, count: int) -> dict:
    npe = nats / count if count else float("nan")
    return {"nats_per_event": npe, "bits_per_event": npe / LN2, "perplexity": math.exp(npe) if count else float("nan"),
            "events": int(count)}


def likelihood_summary(nats: np.ndarray, count: np.ndarray, pieces: Sequence[Piece]) -> dict:
    """Overall and per-style rates (events include the EOS that ends each piece)."""
    out = rates(float(nats.sum()), int(count.sum()))
    per_style = {}
    for style in sorted({p.style_name for p in pieces}):
        idx = [i for i, p in enumerate(pieces) if p.style_name == style]
        per_style[style] = {**rates(float(nats[idx].sum()), int(count[idx].sum())), "pieces": len(idx)}
    out["per_style"] = per_style
    return out


def worst_pieces(nats: np.ndarray, count: np.ndarray, pieces: Sequence[Piece], n: int = 5) -> list[dict]:
    """The `n` pieces with the highest nats/event, so the piece that drives a split's figure is seen at once."""
    total = max(int(count.sum()), 1)
    rate = np.where(count > 0, nats / np.maximum(count, 1), -np.inf)
    return [{"piece_id": pieces[i].piece_id, "style": pieces[i].style_name, "events": int(count[i]),
             "share_of_events": int(count[i]) / total, "nats_per_event": float(rate[i])}
            for i in np.argsort(-rate, kind="stable")[:n] if count[i] > 0]


def outlier_index(ngram_nats_N: np.ndarray) -> int:
    """The test piece that holds the largest share of the split's n-gram nats.

    Chosen by the n-gram fitted on the train split, not by a model under test, so every model
    drops the same piece. On the demo corpus it is bach/bwv190.7-inst, a 13-voice instrumental
    setting: 22 % of the test split's events, scored far worse than the rest by every model."""
    return int(np.argmax(ngram_nats_N))


def _scores(nats: np.ndarray, count: np.ndarray, pieces: Sequence[Piece], outlier: int | None) -> dict:
    out = {**likelihood_summary(nats, count, pieces), "worst_pieces": worst_pieces(nats, count, pieces)}
    if outlier is not None:
        keep = np.arange(len(pieces)) != outlier
        out["without_outlier"] = rates(float(nats[keep].sum()), int(count[keep].sum()))
        out["outlier"] = rates(float(nats[outlier]), int(count[outlier]))
    return out


def likelihood_section(vocab: Vocabulary, train: Sequence[Piece], test: Sequence[Piece], models: Sequence[Model],
                       o: Options, log=print, validation: Sequence[Piece] = ()) -> dict:
    """Every model and the n-gram baseline on the test split, overall, per style, without the
    outlier piece (`outlier_index`) and its five worst pieces; and each model on `validation`."""
    for m in models:
        if m.vocab.tokens[: vocab.style_offset] != vocab.tokens[: vocab.style_offset]:
            raise UserError(f"{m.workdir or m.name}: its event vocabulary differs from the dataset's")
    seq_len = models[0].seq_len if models else 512
    log(f"likelihood: {o.ngram_order}-gram Kneser-Ney fitted on {len(train)} train pieces")
    train_seqs = [np.concatenate([[vocab.style_id(p.style)], p.tokens, [vocab.eos_id]]) for p in train]
    lm = ngram_lib.KneserNey(o.ngram_order, vocab.size, pad_id=vocab.pad_id).fit(train_seqs)
    ng_nats, ng_count = ngram_nats(lm, windows(test, vocab, seq_len), len(test))
    outlier = outlier_index(ng_nats) if len(test) > 1 else None
    lik = {}
    for m in models:
        log(f"likelihood: {m.name} on {len(test)} test pieces")
        nats, count = model_nats(m.model, windows(test, m.vocab, m.seq_len), m.seq_len, len(test), o.batch_size)
        lik[m.name] = {**_scores(nats, count, test, outlier), "params": m.params, "tokens_seen": m.tokens_seen,
                       "step": m.step, "seq_len": m.seq_len, "workdir": m.workdir}
        if validation:
            log(f"likelihood: {m.name} on {len(validation)} validation pieces")
            v_nats, v_count = model_nats(m.model, windows(validation, m.vocab, m.seq_len), m.seq_len,
                                         len(validation), o.batch_size)
            lik[m.name]["validation"] = rates(float(v_nats.sum()), int(v_count.sum()))
    lik[f"ngram{o.ngram_order}"] = {**_scores(ng_nats, ng_count, test, outlier), "order": o.ngram_order,
                                    "discounts": lm.discounts, "seq_len": seq_len,
                                    "tokens_seen": int(sum(len(s) for s in train_seqs))}
    out = {"split": "test", "pieces": len(test), "models": lik}
    if outlier is not None:
        out["outlier"] = {"piece_id": test[outlier].piece_id, "style": test[outlier].style_name,
                          "events": int(ng_count[outlier]), "share_of_events": int(ng_count[outlier]) / int(ng_count.sum())}
    if validation:
        out["validation_pieces"] = len(validation)
    return out
