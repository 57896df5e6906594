"""A trained model in one process, ready to generate: on one GPU in bf16 when there is
one, else on the CPU in fp32. Whatever layout wrote a checkpoint, its parameters have
the same names and whole shapes here: no process group is needed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from raytron.model.generate import Generation, TextGenerator
from raytron.model.gpt import GPT
from raytron.model.lora import is_adapter
from raytron.model.materialize import plain_name
from raytron.model.sampling import Sampling
from raytron.platform.config.schema import AUTO, ConfigError
from raytron.platform.models.sources import ModelSource, open_source
from raytron.platform.worker.hardware import autocast_dtype


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    source: ModelSource
    generator: TextGenerator

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, greedy: bool = False, seed: int | None = None,
                 stop: Sequence[str] = (), batch_size: int = 8,
                 on_text: Callable[[int, str], None] | None = None) -> list[Generation]:
        """Completions of each prompt: `.text`, `.tokens`, `.finish_reason`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        sampling = Sampling(temperature, top_k, top_p, greedy)
        return self.generator.generate(prompts, max_new_tokens, sampling, seed, stop,
                                       batch_size, on_text)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """As training computes by default: bf16 on a GPU, fp32 on the CPU."""
    return autocast_dtype(AUTO, device) or torch.float32


def load_model(source: str | Path | ModelSource, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> LoadedModel:
    """The model at `source`: a run directory (its latest committed checkpoint), a
    checkpoint folder, a Hugging Face folder or a cached Hub id."""
    source = source if isinstance(source, ModelSource) else open_source(source)
    if source.tokenizer is None:
        raise ConfigError([f"{source.path} has no tokenizer.json, which generation needs. "
                           "Fix: save the tokenizer beside the model (a fast tokenizer's "
                           "`save_pretrained` writes it)."])
    device = torch.device(device) if device is not None else default_device()
    model = build_model(source, device, dtype or default_dtype(device))
    generator = TextGenerator(model, source.tokenizer, source.end_ids, source.bos_id)
    return LoadedModel(model, source.tokenizer, source, generator)


def build_model(source: ModelSource, device: torch.device, dtype: torch.dtype) -> GPT:
    """The GPT of `source` with its weights, in evaluation mode."""
    with torch.device("meta"):
        model = GPT(source.shape)
    model.to_empty(device="cpu")
    model.tie_weights()
    load_weights(model, source.read_weights(), source)
    model.to(device=device, dtype=dtype)
    model.init_rope()  # in float32 whatever the weights' dtype
    return model.eval()


def load_weights(model: GPT, weights: dict[str, torch.Tensor], source: ModelSource) -> None:
    """Copy `weights` into `model` (or a pipeline stage of it), checked first."""
    with torch.no_grad():
        model.load_state_dict(checked_weights(model, weights, source), strict=False)


def checked_weights(model: GPT, weights: dict[str, torch.Tensor], source: ModelSource
                    ) -> dict[str, torch.Tensor]:
    """The tensor of each parameter of `model` (a pipeline stage of it, possibly
    parallelized: names and shapes are the whole model's), or a ConfigError naming what
    is missing or does not fit. A tied head reads the embedding; one that sits on another
    pipeline stage than the embedding takes it when the source holds no head. LoRA
    adapters are no part of a base model: they keep their own start."""
    chosen, missing = {}, []
    for name, param in model.named_parameters():
        name = plain_name(name)
        if is_adapter(name):
            continue
        found = weights.get(name)
        if found is None and name == "output.weight" and model.shape.tie_embeddings:
            found = weights.get("tok_embeddings.weight")
        if found is None:
            missing.append(name)
        elif found.shape != param.shape:
            raise ConfigError([f"{source.describe()}: its weights do not fit its shape "
                               f"({name} is {tuple(found.shape)}, the model's "
                               f"{tuple(param.shape)}). Fix: give a model whose config "
                               "matches its weights."])
        else:
            chosen[name] = found
    if missing:
        raise ConfigError([f"{source.describe()} lacks {', '.join(missing[:5])}"
                           f"{' and more' if len(missing) > 5 else ''}. Fix: give a complete "
                           "model of the same architecture."])
    return chosen
