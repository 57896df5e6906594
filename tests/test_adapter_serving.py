"""LoRA adapters served on one base: PEFT's own adapters and a raytron LoRA run, read
from their folders, give `peft`'s logits (and the run's own model's) in an adapter bank
where each row of a batch has its own adapter; the base's rows stay exactly the base's;
in the engine, requests for two adapters and the base decode in one batch and give what
each gives alone; a full bank makes a request wait, never evicts an adapter in use; and
what cannot be served is refused saying why."""

import json
import os
import shutil

import pytest
import torch

from raytron.model.adapter_bank import BASE, AdapterBank
from raytron.model.engine import Engine, EngineLimits, Event
from raytron.model.generate import generate_ids
from raytron.model.sampling import Sampling
from raytron.platform.models.loading import build_model
from raytron.platform.models.sources import open_source
from raytron.platform.serving.adapters import AdapterError, AdapterLibrary, AdapterSettings

from model_runs import lora_runs, peft_adapters

pytest.importorskip("peft")
GREEDY = Sampling(greedy=True)
PROMPTS = [[5, 17, 42, 3, 99, 8, 61], [12, 40], [7, 7, 30, 200, 11]]
PEFT_ADAPTERS = {  # name -> LoraConfig's arguments
    "one": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "two": {"r": 8, "lora_alpha": 4, "use_rslora": True,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                               "up_proj", "down_proj"]},
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A base run, its LoRA run ("run"), and PEFT's random adapters on its export, in
    a folder of adapters."""
    root = tmp_path_factory.mktemp("adapters")
    _, base_dir, lora_dir, adapted = lora_runs(root, ("train.lora.rank=4",
                                                      "train.lora.alpha=8"))
    peft_adapters(base_dir, root, PEFT_ADAPTERS)
    settings = AdapterSettings({"run": str(lora_dir)}, str(root / "adapters"),
                               max_adapters=3, max_rank=8)
    return root, open_source(base_dir), settings, adapted


def banked(source, settings: AdapterSettings):
    model = build_model(source, torch.device("cpu"), torch.float32)
    return model, AdapterBank(model, settings.max_adapters, settings.max_rank)


def test_banked_rows_give_peft_logits_and_base_rows_stay_the_base(served):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, source, settings, adapted = served
    library = AdapterLibrary(settings, source)
    model, bank = banked(source, settings)
    plain = build_model(source, torch.device("cpu"), torch.float32)
    tokens = torch.randint(0, source.shape.vocab_size, (4, 16),
                           generator=torch.Generator().manual_seed(0))
    slots = [BASE, *(bank.place(library.adapter(name), set()) for name in ("one", "two",
                                                                            "run"))]
    with torch.no_grad(), bank.rows(slots):
        logits = model(tokens)
    with torch.no_grad():
        assert torch.equal(logits[0], plain(tokens)[0])  # the base's row: exactly the base
        assert torch.allclose(logits[3], adapted.eval()(tokens[3:]), atol=1e-5)
        for row, name in ((1, "one"), (2, "two")):
            peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
                root / "exported-base"), f"{settings.directory}/{name}").eval()
            theirs = peft_model(tokens[row:row + 1])
            assert (logits[row] - theirs.logits[0]).abs().max() < 1e-4, name
            assert (logits[row] - logits[0]).abs().max() > 1e-2  # the adapter changes it


class Heard:
    def __init__(self):
        self.tokens: list[int] = []
        self.end: Event | None = None

    def __call__(self, event: Event) -> None:
        if event.token is not None:
            self.tokens.append(event.token)
        elif event.prompt is None:
            self.end = event


def decode(engine: Engine, requests: list[tuple[list[int], object]], new: int = 12
           ) -> list[list[int]]:
    """Each (prompt, adapter) submitted at once, then decoded until all end."""
    heard = [Heard() for _ in requests]
    for (prompt, adapter), listener in zip(requests, heard, strict=True):
        engine.submit(prompt, new, GREEDY, listener, adapter=adapter)
    engine.run_until_done()
    assert all(listener.end.error is None for listener in heard)
    return [listener.tokens for listener in heard]


def test_two_adapters_and_the_base_in_one_batch_give_what_each_gives_alone(served):
    _, source, settings, adapted = served
    library = AdapterLibrary(settings, source)
    model, bank = banked(source, settings)
    engine = Engine(model, limits=EngineLimits(max_num_seqs=4), bank=bank)
    chosen = [None, library.adapter("one"), library.adapter("run")]
    together = decode(engine, list(zip(PROMPTS, chosen, strict=True)))
    alone = [decode(engine, [(prompt, adapter)])[0]
             for prompt, adapter in zip(PROMPTS, chosen, strict=True)]
    assert together == alone
    assert len({tuple(tokens) for tokens in together}) == 3
    plain = build_model(source, torch.device("cpu"), torch.float32)
    assert together[0] == generate_ids(plain, [PROMPTS[0]], 12, GREEDY).ids[0]
    assert together[2] == generate_ids(adapted.eval(), [PROMPTS[2]], 12, GREEDY).ids[0]
    # the same prompt under each adapter: one batch, three different continuations
    same = decode(engine, [(PROMPTS[0], adapter) for adapter in chosen])
    assert same[0] == together[0] and len({tuple(tokens) for tokens in same}) == 3


def test_a_full_bank_makes_a_request_wait_and_evicts_only_idle_adapters(served):
    _, source, settings, _ = served
    library = AdapterLibrary(settings, source)
    model, bank = banked(source, AdapterSettings(max_adapters=1, max_rank=8))
    engine = Engine(model, limits=EngineLimits(max_num_seqs=4), bank=bank)
    one, two = library.adapter("one"), library.adapter("two")
    heard = [Heard(), Heard()]
    engine.submit(PROMPTS[0], 6, GREEDY, heard[0], adapter=one)
    engine.submit(PROMPTS[1], 6, GREEDY, heard[1], adapter=two)
    engine.step()
    assert engine.state()["running"] == 1 and engine.state()["waiting"] == 1
    engine.run_until_done()
    assert [h.tokens for h in heard] == [decode(engine, [(PROMPTS[0], one)], 6)[0],
                                         decode(engine, [(PROMPTS[1], two)], 6)[0]]
    assert engine.state()["adapters_loaded"] == 1


def test_adapters_of_the_folder_are_found_and_read_again_when_changed(served, tmp_path):
    _, source, settings, _ = served
    folder = tmp_path / "adapters"
    folder.mkdir()
    library = AdapterLibrary(AdapterSettings(directory=str(folder), max_rank=8), source)
    assert library.names() == [] and library.path("one") is None
    os.symlink(f"{settings.directory}/one", folder / "one")
    (folder / "not-an-adapter").mkdir()
    assert library.names() == ["one"]
    first = library.adapter("one")
    assert library.adapter("one") is first  # read once while unchanged
    config = folder / "one" / "adapter_config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    assert library.adapter("one") is not first
    for name in ("../one", "one/..", ".hidden", "a" * 65):
        assert library.path(name) is None


@pytest.mark.parametrize("change, says", [
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"r": 0}, "r and lora_alpha"),
])
def test_peft_configs_it_cannot_compute_are_refused(served, tmp_path, change, says):
    _, source, settings, _ = served
    folder = tmp_path / "odd"
    folder.mkdir()
    original = f"{settings.directory}/one"
    config = json.loads(open(f"{original}/adapter_config.json").read())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    os.symlink(f"{original}/adapter_model.safetensors", folder / "adapter_model.safetensors")
    library = AdapterLibrary(AdapterSettings({"odd": str(folder)}), source)
    with pytest.raises(AdapterError, match=says):
        library.adapter("odd")


def test_adapters_that_do_not_fit_the_base_are_refused(served, tmp_path):
    _, source, settings, _ = served
    with pytest.raises(AdapterError, match="--max-lora-rank"):
        AdapterLibrary(AdapterSettings(directory=settings.directory, max_rank=4),
                       source).adapter("two")
    with pytest.raises(AdapterError, match="train_embeddings"):
        _, _, lora_dir, _ = lora_runs(tmp_path / "whole", (
            "train.lora.rank=4", "train.lora.alpha=8", "train.lora.train_embeddings=true"))
        AdapterLibrary(AdapterSettings({"x": str(lora_dir)}), source).adapter("x")
    # the same weights exported: not the files the run recorded (its PEFT export would do)
    hf = open_source(served[0] / "exported-base")
    with pytest.raises(AdapterError, match="not the served model"):
        AdapterLibrary(AdapterSettings({"x": settings.paths["run"]}), hf).adapter("x")
    with pytest.raises(AdapterError, match="whole model"):
        AdapterLibrary(AdapterSettings({"x": str(source.path)}), source).adapter("x")


def test_the_commands_folders_are_made_absolute_from_home_too(served, tmp_path, monkeypatch):
    """`raytron serve --adapters-dir ~/adapters`: the replicas, started elsewhere, get
    the folder itself."""
    import argparse

    from raytron.platform.serving.command import adapter_settings

    _, source, settings, _ = served
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "adapters").mkdir()
    args = argparse.Namespace(adapter=[("one", "~/one")], adapters_dir="~/adapters",
                              max_adapters=2, max_lora_rank=8)
    shutil.copytree(f"{settings.directory}/one", tmp_path / "one")
    chosen = adapter_settings(args, source)
    assert chosen.directory == str(tmp_path / "adapters")
    assert chosen.paths == {"one": str(tmp_path / "one")}
