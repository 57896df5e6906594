"""`model.init_from`: a training run that starts from the weights of a raytron checkpoint
or a Hugging Face model (a folder, or a cached Hub id) instead of random ones (with a
fresh optimizer, at step 0).

The model's shape and family come from the source, as `from_pretrained` takes them from
config.json: every key of the model section that shapes the network (n_layers, d_model,
heads, head_dim, ffn_hidden, vocab_size, the RoPE keys, norm_eps, tie_embeddings,
family) is replaced. Its tokenizer and chat template are the run's unless data.tokenizer
(data.chat_template) names others. Every rank reads the whole tensors of its pipeline
stages into host memory and keeps its shards of them on its device, so a source loads
into any layout.
"""

from __future__ import annotations

import dataclasses

import torch

from raytron.model.gpt import GPT
from raytron.model.lora import is_adapter
from raytron.model.materialize import InitialValue, plain_name
from raytron.pipelines.chat import ChatTemplate
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


def initial_chat_template(config: RaytronConfig) -> ChatTemplate | None:
    """The chat template of model.init_from's model; None: it has none (or no init_from)."""
    return open_source(config.model.init_from).chat_template if config.model.init_from \
        else None


def with_room_for(config: RaytronConfig, tokenizer_vocab: int) -> RaytronConfig:
    """With model.init_from, the vocabulary grown (to a multiple of vocab_multiple_of) when
    the run's tokenizer has more tokens than the model has embeddings: the chat markers
    ChatML adds to a model without them. `grown_vocabulary` initializes the new rows."""
    size, multiple = config.model.vocab_size, config.model.vocab_multiple_of
    if not config.model.init_from or size is None or size >= tokenizer_vocab:
        return config
    grown = multiple * -(-tokenizer_vocab // multiple)
    print(f"model.init_from has {size} token embeddings and the tokenizer {tokenizer_vocab} "
          f"tokens: growing the embeddings (and head) to {grown}, each new row the mean of "
          "the model's rows")
    return dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                 vocab_size=grown))


def grown_vocabulary(weights: dict[str, torch.Tensor], vocab_size: int
                     ) -> dict[str, torch.Tensor]:
    """The embedding and head with rows added up to `vocab_size`, each the mean of the
    existing rows: a new token starts where an average token is (transformers'
    `resize_token_embeddings(mean_resizing=True)` centres them there too, plus noise),
    so its logit is no outlier and the first steps' loss does not jump."""
    grown = dict(weights)
    for name in ("tok_embeddings.weight", "output.weight"):
        tensor = weights.get(name)
        if tensor is not None and len(tensor) < vocab_size:
            mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
            grown[name] = torch.cat([tensor, mean.expand(vocab_size - len(tensor), -1)])
    return grown


def initial_weights(parts: list[GPT], init_from: str) -> InitialValue:
    """The initial value of each parameter of `parts` (this rank's pipeline stages, on
    the meta device or parallelized): the source's whole tensor, checked against the
    model (its vocabulary grown as `with_room_for` grew the model's)."""
    source = open_source(init_from)
    names = {plain_name(name) for part in parts for name, _ in part.named_parameters()
             if not is_adapter(name)}
    weights = grown_vocabulary(source.read_weights(names | {"tok_embeddings.weight"}),
                               parts[0].shape.vocab_size)
    chosen = {}
    for part in parts:
        chosen.update(checked_weights(part, weights, source))
    return lambda name, shape: chosen[name]
