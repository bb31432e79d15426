"""Evaluation of a trained run, one module per section of the report.

Each section is a function `inputs -> dict`, and `report.evaluate` runs them in order
into report.json (big_vision's evaluators, for music):

- likelihood: nats/bits per event and perplexity on the test split for the GPT, an
  interpolated Kneser-Ney n-gram fitted on the train split and, given one, an LSTM;
- features: musical statistics of generated vs real test pieces, train-vs-test the ceiling;
- coherence: per style, whether generated notes hold together as the real ones do;
- style: an independent style classifier's verdict on generated pieces;
- originality: the longest span each generated piece copies from training;
- validity: generated files that parse and have notes;
- targets: the issue's targets read off the sections above.

Beside the report: the guidance sweep (`guidance`), the controls sweep (`controls_sweep`), the
one-composer study (`composer`),
report.md/.html (`pages`), two reports side by side (`compare`, its own command) and
infilling (`infill`, its own command: `python -m mgpt.eval.infill`).
`references` builds what generated pieces are judged against, once. The command line
is `python -m mgpt.evaluate`.

Report sections only: the analysis they report on is the library in mgpt.music (so a section's
file is `features_section.py` beside `mgpt/music/features.py`). Code here may import mgpt.music,
mgpt.sample.run, .corpus and .controls (to generate pieces), mgpt.train.checkpoint and mgpt.train.data
(to load a model and a split), mgpt.render, data_prep and mgpt.errors; never the training loop
or a command.
"""

from mgpt.errors import UserError
from mgpt.eval.coherence import coherence_by_style, coherence_section
from mgpt.eval.composer import composer_study, write_composer_study
from mgpt.eval.features_section import feature_section
from mgpt.eval.guidance import guidance_sweep, parse_guidances, write_guidance_sweep
from mgpt.eval.inputs import (Generated, Model, Options, Piece, jsonable, load_split, model_from_run,
                              read_generated, resolve_dataset)
from mgpt.eval.likelihood import likelihood_section
from mgpt.eval.originality_section import originality_section
from mgpt.eval.references import References, fit_classifier, references
from mgpt.eval.report import SECTIONS, evaluate, targets
from mgpt.eval.style_section import style_section

__all__ = [
    "SECTIONS", "Generated", "Model", "Options", "Piece", "References", "UserError", "coherence_by_style",
    "coherence_section", "composer_study", "evaluate", "feature_section", "fit_classifier", "guidance_sweep",
    "jsonable", "likelihood_section", "load_split", "model_from_run", "originality_section", "parse_guidances",
    "read_generated", "references", "resolve_dataset", "style_section", "targets", "write_composer_study",
    "write_guidance_sweep",
]
