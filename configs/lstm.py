"""LSTM baseline (Performance RNN style), trained by the same loop as the GPT it is compared with.

    python -m mgpt.train --config=configs/lstm.py --workdir=runs/lstm          # vs configs/small.py
    python -m mgpt.train --config=configs/lstm.py:tiny --workdir=runs/lstm_tiny

The argument names the GPT config to match (default 'small'). Data, learning-rate schedule and
the number of steps (hence training tokens: steps x batch_size x seq_len) are that config's. The
model is a stacked LSTM of about the GPT's parameter count, and its optimizer is AdamW, which
suits it better than the GPT's Muon.
"""

import importlib

# GPT config -> (num_layers, d_model) of an LSTM with a similar parameter count.
_SIZES = {"tiny": (1, 80), "small": (2, 320), "base": (3, 2048), "large": (4, 5120)}


def get_config(arg: str | None = None):
    name = arg or "small"
    if name not in _SIZES:
        raise ValueError(f"configs/lstm.py:{name}: expected one of {', '.join(_SIZES)}")
    c = importlib.import_module(f"configs.{name}").get_config()
    num_layers, d_model = _SIZES[name]
    c.model.kind = "lstm"
    c.model.num_layers = num_layers
    c.model.d_model = d_model
    c.model.sounding_pitches = 0  # a GPT input (the notes held); the LSTM carries them in its state
    # The LSTM keeps AdamW, its better optimizer here: with Muon on its gate matrices (small, seed 0) it
    # was behind at every evaluation (validation 1.2363 against 1.2090 at step 480; docs/recipe.md).
    c.train.optimizer = "adamw"
    return c
