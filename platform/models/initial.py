"""`model.init_from`: a training run that starts from the weights of a raytron checkpoint
or a Hugging Face Llama folder instead of random ones (with a fresh optimizer, at step 0).

The model's shape and family come from the source, as `from_pretrained` takes them from
config.json: every key of the model section that shapes the network (n_layers, d_model,
heads, head_dim, ffn_hidden, vocab_size, the RoPE keys, norm_eps, tie_embeddings,
family) is replaced. Its tokenizer is the run's unless data.tokenizer
names another. Every rank reads the whole tensors of its pipeline stages into host memory
and keeps its shards of them on its device, so a source loads into any layout.
"""

from __future__ import annotations

import dataclasses

from raytron.model.gpt import GPT
from raytron.model.materialize import InitialValue, plain_name
from raytron.platform.config.resolve import model_fields
from raytron.platform.config.schema import ConfigError, RaytronConfig
from raytron.platform.models.loading import checked_weights
from raytron.platform.models.sources import HUGGING_FACE, open_source
from raytron.platform.storage.run_dir import TOKENIZER_FILE


def with_initial_model(config: RaytronConfig) -> RaytronConfig:
    """The config with the source's shape and, unless data.tokenizer is set, its tokenizer;
    as it is without model.init_from. ConfigError when the source holds no model."""
    if not config.model.init_from:
        return config
    try:
        source = open_source(config.model.init_from)
    except ConfigError as error:
        raise ConfigError([f"model.init_from: {p}" for p in error.problems]) from None
    shape = {key: value for key, value in model_fields(source.shape, source.family).items()
             if key not in ("max_seq_len", "init_std")}  # the run's own
    data = config.data
    if data.tokenizer is None:
        if source.tokenizer is None:
            raise ConfigError([f"model.init_from={config.model.init_from} has no "
                               "tokenizer.json. Fix: set data.tokenizer to the model's "
                               "tokenizer.json."])
        folder = source.path if source.kind == HUGGING_FACE else source.run_dir
        data = dataclasses.replace(data, tokenizer=str(folder / TOKENIZER_FILE))
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **shape),
                               data=data)


def initial_weights(parts: list[GPT], init_from: str) -> InitialValue:
    """The initial value of each parameter of `parts` (this rank's pipeline stages, on
    the meta device or parallelized): the source's whole tensor, checked against the
    model."""
    source = open_source(init_from)
    names = {plain_name(name) for part in parts for name, _ in part.named_parameters()}
    weights = source.read_weights(names | {"tok_embeddings.weight"})
    chosen = {}
    for part in parts:
        chosen.update(checked_weights(part, weights, source))
    return lambda name, shape: chosen[name]
