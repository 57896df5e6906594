"""A LoRA run exported: its adapters in PEFT's format on the exported base give raytron's
logits in `peft`, `--merge` gives the same whole model, and a base that changed since
training is refused."""

import pytest
import torch

from raytron.platform.storage.checkpoint import CheckpointStore
from raytron.platform.storage.run_dir import read_run_config

from model_runs import lora_runs, run_cli, small_model

pytest.importorskip("peft")
LORA = ("train.lora.rank=4", "train.lora.alpha=8", "train.lora.train_embeddings=true")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return lora_runs(tmp_path_factory.mktemp("runs"), LORA)


def test_the_adapter_loads_in_peft_and_merged_equals_it(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, _, lora_dir, adapted = runs
    code, out, err = run_cli("export", str(lora_dir), str(tmp_path / "adapter"))
    assert code == 0, err
    folder = tmp_path / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "base"} <= \
        {path.name for path in folder.iterdir()}
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(folder / "base"), folder).eval()
    tokens = torch.randint(0, adapted.shape.vocab_size, (2, 24))
    with torch.no_grad():
        ours = adapted.eval()(tokens)
        theirs = peft_model(tokens).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(tokens).logits
    assert (ours - base_logits).abs().max() > 1e-2  # the adapters change the model
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)

    code, out, err = run_cli("export", str(lora_dir), str(tmp_path / "merged"), "--merge")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, theirs, rtol=0, atol=1e-4)


def test_a_base_that_changed_since_training_is_refused(tmp_path):
    _, base_dir, lora_dir, _ = lora_runs(tmp_path, LORA)
    config = read_run_config(base_dir)
    model = small_model(config.model.vocab_size, init_std=0.2)
    CheckpointStore(config.checkpoint.dir, keep_last=5).save(  # the base run trained on
        20, [model], [torch.optim.AdamW(model.parameters())], {})
    code, _, err = run_cli("export", str(lora_dir), str(tmp_path / "out"))
    assert code == 2
    assert "were trained on" in err and "model.init_from" in err


def test_merge_needs_a_lora_run(runs, tmp_path):
    _, base_dir, _, _ = runs
    code, _, err = run_cli("export", str(base_dir), str(tmp_path / "out"), "--merge")
    assert code == 2 and "has no LoRA adapters" in err
