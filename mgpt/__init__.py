"""mgpt: GPT models of symbolic music, from a tokenised dataset to generated pieces.

The folders read as the pipeline: `model/` (the networks), `train/` (data pipeline, mesh, the
jitted step, checkpoints, lock, telemetry, aot), `sample/` (the compiled sampler, fill-in-the-
middle, the `Run` API, whole corpora), `music/` (analysis of notes), `eval/` (report sections).
`render` writes MIDI/WAV/PNG and the gallery, and `errors` is the one user-error type every
command shares. The commands stay where users know them: `python -m mgpt.train`,
`mgpt.generate`, `mgpt.evaluate`, `mgpt.aot`. Imports flow one way: `model/` imports none of the
other packages, `music/` no model, `eval/` never the training loop, and no library module imports a
command (tests/test_layout.py checks this).
"""
