"""Where each model kind starts: the step-0 loss on real validation rows, against ln V (a uniform guess).

    python benchmarks/step0_loss.py                       # configs/small.py, tied and untied, and the LSTM
    python benchmarks/step0_loss.py --dataset_dir=DIR

Last line, for scripts: `step-0: GPT X, tied GPT Y, LSTM Z nats/event, ln V W`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset_dir", default=None, help="default: configs/small.py's (the demo corpus)")
    p.add_argument("--rows", type=int, default=16, help="validation rows of seq_len + 1 events")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from configs import lstm, small
    from data_prep.vocab import Vocabulary
    from mgpt.model import kinds
    from mgpt.train import data as data_lib

    config = small.get_config()
    dataset_dir = os.fspath(data_lib.resolve_dataset(a.dataset_dir or config.data.dataset_dir))
    vocab = Vocabulary.load(os.path.join(dataset_dir, "vocab.json"))
    if config.data.fim_rate > 0:
        vocab = vocab.with_fim()  # as the demo run's model
    length = config.data.seq_len + 1
    source = data_lib.open_source(dataset_dir, "validation")
    rows = [np.asarray(source[i]["tokens"][:length], np.int32) for i in range(len(source))
            if len(source[i]["tokens"]) >= length][: a.rows]
    if not rows:
        raise SystemExit(f"{dataset_dir}: no validation piece of {length} events or more")
    tokens_BxL = jnp.asarray(np.stack(rows))

    def loss(model_config) -> float:
        model = kinds.build_model(model_config, vocab.size, nnx.Rngs(params=jax.random.PRNGKey(config.seed)))
        log_p_BxLxV = jax.nn.log_softmax(model(tokens_BxL[:, :-1]).astype(jnp.float32), axis=-1)
        return -float(jnp.mean(jnp.take_along_axis(log_p_BxLxV, tokens_BxL[:, 1:, None], axis=-1)))

    gpt = loss(config.model)
    config.model.tied_embeddings = True
    tied = loss(config.model)
    lstm_loss = loss(lstm.get_config("small").model)
    print(f"{len(rows)} validation rows of {length - 1} events, V = {vocab.size}")
    print(f"step-0: GPT {gpt:.3f}, tied GPT {tied:.3f}, LSTM {lstm_loss:.3f} nats/event, ln V {math.log(vocab.size):.3f}")


if __name__ == "__main__":
    main()
