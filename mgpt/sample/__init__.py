"""Sampling: the compiled sampler (`sampler`), its hard limits (`limits`) and control timelines
(`controls`), controls followed by choosing among draws (`rerank`), continuous batching over a rolling KV cache (`continuous`), fill-in-the-middle (`fim`), the `Run` API a
notebook uses with its primer/infill reading (`run`), and whole corpora with manifests, resume
and the copy guard (`corpus`).

May import mgpt.model, mgpt.train.checkpoint (inference loading) and mgpt.train.mesh,
mgpt.music (the copy guard's index), mgpt.render, data_prep and mgpt.errors; never mgpt.eval,
the training loop or a command. The sampler's public names are re-exported here on first use,
so `from mgpt.sample import generate_tokens` (the path before the move) works.
"""

_SUBMODULES = frozenset({"continuous", "controls", "corpus", "fim", "limits", "rerank", "run", "sampler"})


def __getattr__(name):
    if name.startswith("_") or name in _SUBMODULES:
        raise AttributeError(f"module 'mgpt.sample' has no attribute {name!r}")
    from mgpt.sample import sampler

    try:
        return getattr(sampler, name)
    except AttributeError:
        raise AttributeError(f"module 'mgpt.sample' has no attribute {name!r}") from None
