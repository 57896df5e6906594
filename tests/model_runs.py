"""A raytron run directory as `raytron train` leaves it (config.yaml, tokenizer.json, a
committed checkpoint, an MLflow run id), written without Ray, for the tests of what is
done with a trained model."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer

from raytron.model.families import FAMILIES
from raytron.model.gpt import GPT, GPTShape
from raytron.pipelines.sources import embedded_records
from raytron.pipelines.tokenizer import train_bpe
from raytron.platform.cli import main
from raytron.platform.config.load import load_config, to_yaml
from raytron.platform.config.resolve import model_fields
from raytron.platform.storage.checkpoint import CheckpointStore
from raytron.platform.storage.run_dir import CONFIG_FILE, TOKENIZER_FILE
from raytron.platform.storage.tracking import RUN_ID_FILE


def reference_texts(count: int = 60) -> list[str]:
    """Real English: the Python language reference that CPython ships."""
    return [record.text for record in embedded_records("python-reference")][:count]


def small_tokenizer(vocab_size: int = 512) -> Tokenizer:
    return train_bpe(reference_texts(), vocab_size, show_progress=False)


def small_model(vocab_size: int, **changes) -> GPT:
    """Random weights, large enough that greedy decoding does not just repeat a token."""
    base = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                vocab_size=vocab_size, max_seq_len=64, init_std=0.1, tie_embeddings=False)
    return GPT(GPTShape(**{**base, **changes}), seed=11).eval()


def write_run(root: Path, name: str, model: GPT, tokenizer: Tokenizer,
              overrides: tuple[str, ...] = (), step: int = 10,
              tracking: tuple[str, str] | None = None) -> Path:
    """The run directory `root/name` of `model`, checkpointed at `step`; `tracking` is
    (tracking URI, MLflow run id) of its MLflow run."""
    shape = model.shape
    config = load_config("tiny", [f"run.root={root}", f"run.name={name}",
                                  f"data.seq_len={shape.max_seq_len}",
                                  f"checkpoint.dir={root / name / 'checkpoints'}",
                                  *([f"tracking.uri={tracking[0]}"] if tracking else []),
                                  *overrides])
    family = next(name for name, f in FAMILIES.items()
                  if (f.qkv_bias, f.qk_norm) == (shape.qkv_bias, shape.qk_norm))
    config = dataclasses.replace(config, model=dataclasses.replace(
        config.model, **model_fields(shape, family)))
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(to_yaml(config))
    tokenizer.save(str(run_dir / TOKENIZER_FILE))
    if tracking:
        (run_dir / RUN_ID_FILE).write_text(tracking[1])
    optimizer = torch.optim.AdamW(model.parameters())
    CheckpointStore(config.checkpoint.dir, keep_last=2).save(step, [model], [optimizer], {})
    return run_dir


def lora_runs(root: Path, lora: tuple[str, ...]) -> tuple[Path, Path, Path, GPT]:
    """A base run and a LoRA run on it (`lora`: its train.lora overrides), its adapters
    (and its embeddings and head, when they train whole) as after some training."""
    from raytron.model.lora import add_adapters
    from raytron.platform.config.resolve import lora_spec
    from raytron.platform.models.lora_base import base_reference, record_base
    from raytron.platform.storage.run_dir import read_run_config

    tokenizer = small_tokenizer()
    base = small_model(tokenizer.get_vocab_size())
    base_dir = write_run(root, "base", base, tokenizer)
    spec = lora_spec(load_config("tiny", list(lora)).train.lora)
    adapted = add_adapters(copy.deepcopy(base), spec)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if param.requires_grad and not name.endswith("lora_a"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    lora_dir = write_run(root, "lora", adapted, tokenizer, (*lora, f"model.init_from={base_dir}"))
    config = read_run_config(lora_dir)
    record_base(CheckpointStore(config.checkpoint.dir, 2), base_reference(config))
    return root, base_dir, lora_dir, adapted


def run_cli(*argv: str) -> tuple[int, str, str]:
    """`raytron ARGV` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            contextlib.suppress(SystemExit):
        return main(list(argv)), out.getvalue(), err.getvalue()
    return 2, out.getvalue(), err.getvalue()  # argparse exits with 2 on a usage error


def hf_perplexity(hf, ids_per_document: list[list[int]], max_length: int, stride: int) -> float:
    """transformers' "perplexity of fixed-length models", document by document."""
    nll, count = 0.0, 0
    for ids in ids_per_document:
        ids = torch.tensor([ids])
        previous_end = 0
        for begin in range(0, ids.shape[1], stride):
            end = min(begin + max_length, ids.shape[1])
            window = ids[:, begin:end]
            labels = window.clone()
            labels[:, : -(end - previous_end)] = -100
            scored = int((labels[:, 1:] != -100).sum())
            with torch.no_grad():
                nll += hf(window, labels=labels).loss.item() * scored
            count += scored
            previous_end = end
            if end == ids.shape[1]:
                break
    return math.exp(nll / count)


def hf_chat_model(folder: Path, config, template: str, special: tuple[str, ...],
                  tokens: dict[str, str]) -> Path:
    """A random transformers model of `config` saved in `folder` as a Hub model is, with
    the small tokenizer grown by the family's `special` tokens and the family's chat
    `template` and special `tokens` in its tokenizer files."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = small_tokenizer()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in special])
    assert tokenizer.get_vocab_size() <= config.vocab_size
    torch.manual_seed(4)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=template,
                            **tokens).save_pretrained(folder)
    return folder


def peft_adapters(model_dir: Path, folder: Path, configs: dict[str, dict]) -> Path:
    """PEFT's own LoRA adapters, with random A and B, on the model in `model_dir` (a
    raytron run, exported for transformers first): `folder`/NAME for each NAME of
    `configs` (LoraConfig's arguments)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    exported = folder / "exported-base"
    code, _, err = run_cli("export", str(model_dir), str(exported))
    assert code == 0, err
    for seed, (name, arguments) in enumerate(configs.items()):
        torch.manual_seed(seed)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(exported),
                                    LoraConfig(init_lora_weights=False, **arguments))
        peft_model.save_pretrained(folder / "adapters" / name)
    return folder
