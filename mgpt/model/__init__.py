"""The networks: the GPT (`gpt`), the LSTM baseline (`lstm`) and the table of model kinds (`kinds`).

Pure Flax NNX modules and their configs: code here may import jax/flax, data_prep and
mgpt.errors, never mgpt.train, mgpt.sample, mgpt.eval or a command. `GPT` and `ModelConfig` are
re-exported here, so `from mgpt.model import GPT, ModelConfig` (the path before the move) works.
"""

from mgpt.model.gpt import GPT, ModelConfig, dataclass_from_config  # noqa: F401

__all__ = ["GPT", "ModelConfig", "dataclass_from_config"]
