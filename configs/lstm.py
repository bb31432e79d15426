"""LSTM baseline (Performance RNN style), trained by the same loop as the GPT it is compared with.

    python -m mgpt.train --config=configs/lstm.py --workdir=runs/lstm          # vs configs/small.py
    python -m mgpt.train --config=configs/lstm.py:tiny --workdir=runs/lstm_tiny

The argument names the GPT config to match (default 'small'). Data, optimizer and the
number of steps (hence training tokens: steps x batch_size x seq_len) are that
config's; only the model changes: a stacked LSTM of about the GPT's parameter count.
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
    return c
