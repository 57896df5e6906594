"""Each Hugging Face family raytron computes, against the real `transformers` class: a
randomly initialised model of a small config of the family (rope scaling with a factor,
q/k/v biases, per-head norms, an explicit head size, GQA, tied and untied) imports with
equal logits past the scaling's original context, exports back bit for bit as the same
class, generates greedily as `generate` does, scores the perplexity transformers does,
and trains from its weights in every layout as in one process."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from raytron.platform.models import load_model
from raytron.platform.models.export import export_hugging_face
from raytron.platform.models.sources import open_source

from model_runs import hf_chat_model, hf_perplexity, reference_texts, run_cli, small_tokenizer

ORIGINAL_CONTEXT = 16  # the scaled models' pre-trained context; the tests go past it
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=0)
FAMILIES = {
    "llama3.1": LlamaConfig(**SMALL, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL_CONTEXT}),
    "llama-linear": LlamaConfig(**SMALL, tie_word_embeddings=False, rope_parameters={
        "rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}),
    "mistral": MistralConfig(**SMALL, sliding_window=None, tie_word_embeddings=False),
    "qwen2.5-yarn": Qwen2Config(**SMALL, tie_word_embeddings=True, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
        "original_max_position_embeddings": ORIGINAL_CONTEXT}),
    "qwen3": Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3-yarn-untied": Qwen3Config(**SMALL, head_dim=8, tie_word_embeddings=False,
                                     rope_parameters={
                                         "rope_type": "yarn", "rope_theta": 10000.0,
                                         "factor": 2.0, "attention_factor": 1.2,
                                         "original_max_position_embeddings": ORIGINAL_CONTEXT}),
}


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random, biases and norm gains too (zero biases and unit gains would
    hide a wrongly permuted one)."""
    torch.manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.1 + ("norm" in name))
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_folder(request, tmp_path_factory):
    """(folder, transformers model) of one family, saved as `save_pretrained` saves it."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = randomized(AutoModelForCausalLM.from_config(FAMILIES[request.param]))
    hf.save_pretrained(folder)
    small_tokenizer().save(str(folder / "tokenizer.json"))
    return folder, hf


def test_imported_logits_equal_transformers_past_the_original_context(family_folder):
    folder, hf = family_folder
    ours = load_model(folder).model
    attention = hf.model.layers[0].self_attn
    assert ours.shape.qkv_bias == (attention.q_proj.bias is not None)
    assert ours.shape.qk_norm == hasattr(attention, "q_norm")
    assert ours.shape.head_dim == attention.head_dim
    tokens = torch.randint(0, 512, (2, 60), generator=torch.Generator().manual_seed(1))
    assert tokens.shape[1] > ORIGINAL_CONTEXT * 3
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=0, atol=1e-4)


def test_export_gives_back_every_tensor_as_the_same_class(family_folder, tmp_path):
    folder, hf = family_folder
    export_hugging_face(open_source(folder), tmp_path / "again")
    original, again = load_file(folder / "model.safetensors"), \
        load_file(tmp_path / "again" / "model.safetensors")
    assert again.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(again[name], tensor), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert type(reloaded) is type(hf)
    # every RoPE parameter as it was (yarn's betas are written even where they were left
    # to their defaults)
    assert reloaded.config.rope_parameters.items() >= hf.config.rope_parameters.items()
    tokens = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)


def test_greedy_generate_equals_transformers_generate(family_folder):
    folder, hf = family_folder
    code, out, err = run_cli("generate", str(folder), "--prompt", "The import statement",
                             "--greedy", "--max-new-tokens", "40")
    assert code == 0, err
    loaded = load_model(folder)
    prompt = loaded.generator.encode("The import statement")
    ours = loaded.generate(["The import statement"], max_new_tokens=40, greedy=True)[0]
    ids = torch.tensor([prompt])
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                         do_sample=False)[0, len(prompt):].tolist()
    assert len(prompt) + 40 > ORIGINAL_CONTEXT * 2
    assert ours.tokens == [t for t in theirs if t != 0]
    assert ours.text in out


def test_eval_perplexity_equals_transformers(family_folder, tmp_path):
    folder, hf = family_folder
    texts = reference_texts(64)[60:]
    corpus = tmp_path / "held_out.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    result_file = tmp_path / "result.json"
    code, _, err = run_cli("eval", str(folder), "--data", str(corpus), "--seq-len", "48",
                           "--stride", "16", "--output", str(result_file))
    assert code == 0, err
    tokenizer = small_tokenizer()
    documents = [tokenizer.encode(t).ids + [0] for t in texts]
    expected = hf_perplexity(hf, documents, max_length=48 + 1, stride=16)
    assert json.loads(result_file.read_text())["perplexity"] == pytest.approx(expected,
                                                                               rel=1e-4)


HARNESS = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
LAYOUT_FAMILIES = {  # the harness's shape (parallel_harness.BASE) in three families
    "llama3.1": LlamaConfig(**HARNESS, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "qwen2.5-yarn": Qwen2Config(**HARNESS, tie_word_embeddings=False, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
        "original_max_position_embeddings": 8}),
    "qwen3": Qwen3Config(**HARNESS, head_dim=16, tie_word_embeddings=True),
}
LAYOUTS = {"dp2": ["parallel.dp=2"], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"],
           "dp2xtp2": ["parallel.dp=2", "parallel.tp=2"]}


def layout_folder(family: str, folder) -> list[str]:
    """The family's model saved in `folder`, and the harness's override that starts from
    it."""
    hf = randomized(AutoModelForCausalLM.from_config(LAYOUT_FAMILIES[family]))
    hf.save_pretrained(folder)
    small_tokenizer(300).save(str(folder / "tokenizer.json"))
    return [f"model.init_from={folder}"]


@pytest.mark.parametrize("family", list(LAYOUT_FAMILIES))
def test_init_from_a_family_trains_alike_in_every_layout(family, tmp_path):
    """Two steps from the family's weights: the first loss is transformers' loss on that
    batch, and dp2, tp2 (its biases split with their columns, its head norms per rank),
    pp2 and dp2 x tp2 give one process's losses and gradient norms."""
    from parallel_harness import batch, config, run_parallel, run_single

    start = layout_folder(family, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert config(start).model.family == hf.config.model_type
    single = run_single(start, stop=2)
    first = torch.from_numpy(batch(0, config(start)).tokens).long()
    with torch.no_grad():
        assert single["losses"][0] == pytest.approx(hf(first, labels=first).loss.item(),
                                                    rel=1e-5)
    for name, layout in LAYOUTS.items():
        got = run_parallel(start + layout, stop=2)
        assert got["losses"] == pytest.approx(single["losses"], rel=1e-5), name
        assert got["norms"] == pytest.approx(single["norms"], rel=1e-4), name


@pytest.mark.parametrize("overrides", [
    ["train.compile=true"],
    ["parallel.dp=2", "parallel.dp_shard=none", "parallel.tp=2",
     "train.activation_checkpointing=selective"],
], ids=["compiled", "ddp2-tp2-selective-recompute"])
def test_a_qwen3_compiles_recomputes_and_replicates_alike(tmp_path, overrides):
    """Qwen3's head norms and head size through inductor, and through DDP with tensor
    parallelism and selective recomputation: one eager process's losses and norms."""
    from parallel_harness import run_parallel, run_single

    start = layout_folder("qwen3", tmp_path)
    want = run_single(start, stop=2)
    run = run_parallel if "parallel.dp=2" in overrides else run_single
    got = run(start + overrides, stop=2)
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    assert got["norms"] == pytest.approx(want["norms"], rel=1e-4)


def test_a_hub_id_resolves_from_the_local_cache_and_never_downloads(tmp_path, monkeypatch):
    """`model.init_from=<org>/<name>` and `raytron generate <org>/<name>` read the snapshot
    in HF_HOME's cache; an id not cached is refused with the command that fetches it."""
    from raytron.platform.config.load import load_config
    from raytron.platform.models.initial import with_initial_model
    from raytron.platform.storage.run_dir import absolute, with_locations

    repo = tmp_path / "home" / "hub" / "models--tiny-org--tiny-qwen3"
    snapshot = repo / "snapshots" / ("a" * 40)
    randomized(AutoModelForCausalLM.from_config(FAMILIES["qwen3"])).save_pretrained(snapshot)
    small_tokenizer().save(str(snapshot / "tokenizer.json"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    source = open_source("tiny-org/tiny-qwen3")
    assert (source.path, source.family) == (snapshot, "qwen3")
    config = load_config("tiny", ["model.init_from=tiny-org/tiny-qwen3"])
    assert with_locations(config, lambda key, path: absolute(path)).model.init_from \
        == "tiny-org/tiny-qwen3"  # an id stays an id in the saved config
    tuned = with_initial_model(config)
    assert (tuned.model.family, tuned.model.head_dim) == ("qwen3", 32)
    assert tuned.data.tokenizer == str(snapshot / "tokenizer.json")
    code, _, err = run_cli("generate", "tiny-org/tiny-qwen3", "--prompt", "x", "--greedy",
                           "--max-new-tokens", "2")
    assert code == 0, err
    code, _, err = run_cli("generate", "tiny-org/not-cached", "--prompt", "x")
    assert code == 2 and "hf download tiny-org/not-cached" in err and "Traceback" not in err
    assert not (tmp_path / "home" / "hub" / "models--tiny-org--not-cached").exists()


def test_a_model_without_room_for_the_runs_tokens_grows_rows_at_the_mean(tmp_path):
    """ChatML's markers on a model whose embeddings are all taken: the vocabulary grows to
    the next multiple of vocab_multiple_of, the model's rows kept and the new ones (of the
    embedding and of an untied head) the mean of the model's."""
    from raytron.model.gpt import GPT
    from raytron.platform.config.load import load_config
    from raytron.platform.config.resolve import gpt_shape, resolve_model
    from raytron.platform.models.initial import initial_weights, with_initial_model, with_room_for

    hf = randomized(AutoModelForCausalLM.from_config(FAMILIES["llama-linear"]))
    hf.save_pretrained(tmp_path)
    small_tokenizer().save(str(tmp_path / "tokenizer.json"))
    config = with_initial_model(load_config("tiny", [f"model.init_from={tmp_path}"]))
    assert with_room_for(config, 512) is config
    grown = with_room_for(config, 514)
    assert grown.model.vocab_size == 576
    with torch.device("meta"):
        model = GPT(gpt_shape(resolve_model(grown.model, 514)))
    initial = initial_weights([model], str(tmp_path))
    for ours, theirs in (("tok_embeddings.weight", hf.model.embed_tokens.weight),
                         ("output.weight", hf.lm_head.weight)):
        rows = initial(ours, (576, 64))
        assert rows.shape == (576, 64) and torch.equal(rows[:512], theirs)
        assert torch.allclose(rows[512:], theirs.mean(dim=0).expand(64, -1))


def test_the_runs_chat_template_is_its_own_then_the_models_then_chatml(tmp_path):
    """And configs/sft-qwen3-0.6b.yaml, pointed at a Qwen3 folder, fine-tunes in Qwen's."""
    from test_chat import QWEN_2_5_SPECIAL, QWEN_2_5_TEMPLATE, QWEN_2_5_TOKENS

    from raytron.pipelines.chat import CHATML, ChatTemplate, save_chat_template
    from raytron.platform.cli import checked_config
    from raytron.platform.config.load import load_config
    from raytron.platform.control.settle import run_chat_template
    from raytron.platform.storage.run_dir import RunPaths

    folder = hf_chat_model(tmp_path / "qwen", FAMILIES["qwen3"], QWEN_2_5_TEMPLATE,
                           QWEN_2_5_SPECIAL, QWEN_2_5_TOKENS)
    qwen = ChatTemplate(QWEN_2_5_TEMPLATE, **QWEN_2_5_TOKENS)
    run = [f"run.root={tmp_path / 'runs'}", "run.name=chat"]
    config = load_config("tiny", [*run, f"model.init_from={folder}"])
    paths = RunPaths.of(config)
    assert run_chat_template(config, paths, resuming=False) == qwen
    forced = load_config("tiny", [*run, f"model.init_from={folder}", "data.chat_template=chatml"])
    assert run_chat_template(forced, paths, resuming=False) == CHATML
    assert run_chat_template(load_config("tiny", run), paths, resuming=False) == CHATML
    paths.dir.mkdir(parents=True)
    save_chat_template(CHATML, paths.dir)  # a resumed run keeps what it trained with
    assert run_chat_template(config, paths, resuming=True) == CHATML
    # the shipped example, given this folder: a Qwen3 in its own template
    example = checked_config("sft-qwen3-0.6b", [*run, f"model.init_from={folder}"])
    assert (example.model.family, example.model.head_dim) == ("qwen3", 32)
    assert run_chat_template(example, RunPaths.of(example), resuming=False) == qwen


@pytest.mark.parametrize(("family", "changes", "named"), [
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_type='dynamic'"),
    ("llama", {"rope_scaling": {"rope_type": "longrope", "factor": 2.0}},
     "rope_type='longrope'"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "mscale": 0.7}},
     "rope mscale=0.7"),
    ("llama", {"attention_bias": True}, "attention_bias=True"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("mistral", {"sliding_window": 4096}, "sliding_window=4096"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=True"),
    ("qwen3", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types="),
    ("qwen3", {"attention_bias": True}, "attention_bias=True"),
    ("qwen3_moe", {}, "model_type 'qwen3_moe'"),
])
def test_what_no_family_computes_is_refused_naming_the_field(family, changes, named):
    from raytron.model.families import FAMILIES as ADAPTERS
    from raytron.model.gpt import GPTShape
    from raytron.model.hf import hf_config, shape_from_hf_config
    from raytron.platform.models.sources import HF_MAXIMA

    shape = GPTShape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                     vocab_size=512, max_seq_len=64)
    config = hf_config(shape, ADAPTERS.get(family, ADAPTERS["qwen3"]), "float32", 1, 0, 0)
    with pytest.raises(ValueError, match="Fix:") as refusal:
        shape_from_hf_config({**config, "model_type": family, **changes}, HF_MAXIMA)
    assert named in str(refusal.value)
