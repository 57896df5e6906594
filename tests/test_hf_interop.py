"""raytron and Hugging Face `transformers`, against the real library: exported models load
and compute the same logits, tokens, greedy generations and perplexity. (Imported models
of every family, and their export back: tests/test_families.py.)"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from raytron.platform.models import load_model

from conftest import CORPUS
from model_runs import (
    hf_perplexity,
    reference_texts,
    run_cli,
    small_model,
    small_tokenizer,
    write_run,
)


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def exported(request, tmp_path_factory, tokenizer):
    """A raytron run (GQA, tied or untied head) and its Hugging Face export."""
    root = tmp_path_factory.mktemp("runs")
    model = small_model(tokenizer.get_vocab_size(), tie_embeddings=request.param)
    run_dir = write_run(root, "run", model, tokenizer)
    out = root / "hf"
    code, _, err = run_cli("export", str(run_dir), str(out))
    assert code == 0, err
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    return run_dir, out, hf


def test_exported_model_computes_raytrons_logits(exported):
    run_dir, out, hf = exported
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights are as readable as the rest
    ours = load_model(run_dir).model
    assert hf.config.tie_word_embeddings == ours.shape.tie_embeddings
    assert hf.config.num_key_value_heads == 2 < hf.config.num_attention_heads
    tokens = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=0, atol=1e-4)


def test_auto_tokenizer_gives_raytrons_ids_on_real_text(exported, tokenizer):
    _, out, _ = exported
    theirs = AutoTokenizer.from_pretrained(out)
    texts = reference_texts(80)[60:]
    if (CORPUS / "shakespeare").is_dir():
        texts += [p.read_text()[:20000] for p in sorted((CORPUS / "shakespeare").iterdir())[:2]]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert theirs(text)["input_ids"] == ids
        assert theirs.decode(ids) == tokenizer.decode(ids) == text
    assert theirs.eos_token == "<|endoftext|>"


def test_bos_trained_run_exports_a_tokenizer_that_adds_it(tmp_path, tokenizer):
    run_dir = write_run(tmp_path, "bos", small_model(512), tokenizer, ("data.bos=true",))
    code, _, err = run_cli("export", str(run_dir), str(tmp_path / "hf"))
    assert code == 0, err
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    assert theirs("def f")["input_ids"] == [bos, *tokenizer.encode("def f").ids]
    assert load_model(run_dir).generator.encode("def f") == theirs("def f")["input_ids"]


def test_the_chat_template_renders_in_transformers_what_fine_tuning_trained_on(
        exported, tokenizer, tmp_path):
    """apply_chat_template on the export: the same text and ids as raytron's chat encoding
    (with and without BOS), the generation prompt the server uses, and <|im_end|> among the
    tokens that end a generation."""
    from raytron.pipelines.chat import encode_chat, render

    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Reverse: apple river stone"},
                    {"role": "assistant", "content": "stone river apple"},
                    {"role": "user", "content": "And: green light"},
                    {"role": "assistant", "content": "light green"}]
    run_dir, out, hf = exported
    theirs = AutoTokenizer.from_pretrained(out)
    assert theirs.apply_chat_template(conversation, tokenize=False) == render(conversation)
    ids, _ = encode_chat(tokenizer, conversation)
    assert list(theirs.apply_chat_template(conversation, tokenize=True,
                                           return_dict=True)["input_ids"]) == ids
    question = conversation[:2]
    assert theirs.apply_chat_template(question, tokenize=False, add_generation_prompt=True) \
        == render(question, add_generation_prompt=True)
    assert theirs.convert_tokens_to_ids("<|im_end|>") in hf.generation_config.eos_token_id

    bos_run = write_run(tmp_path, "bos", small_model(512), tokenizer, ("data.bos=true",))
    assert run_cli("export", str(bos_run), str(tmp_path / "hf"))[0] == 0
    with_bos = AutoTokenizer.from_pretrained(tmp_path / "hf")
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    assert list(with_bos.apply_chat_template(conversation, tokenize=True,
                                             return_dict=True)["input_ids"]) == [bos, *ids]


def test_greedy_generation_equals_transformers_generate(exported):
    run_dir, _, hf = exported
    prompts = ["The import statement", "A class definition defines", "x"]
    code, out, err = run_cli("generate", str(run_dir), *[a for p in prompts for a in
                                                         ("--prompt", p)],
                             "--greedy", "--max-new-tokens", "24")
    assert code == 0, err
    assert "tokens/s" in err
    theirs_tok = AutoTokenizer.from_pretrained(exported[1])
    ours = load_model(run_dir).generate(prompts, max_new_tokens=24, greedy=True)
    if not hf.config.tie_word_embeddings:  # a random tied model repeats the last token
        assert all(len(set(g.tokens)) > 5 for g in ours)
    for prompt, generation in zip(prompts, ours, strict=True):
        ids = theirs_tok(prompt, return_tensors="pt")["input_ids"]
        generated = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
        expected = [t for t in generated.tolist() if t != theirs_tok.eos_token_id]
        assert generation.tokens == expected
        assert prompt + generation.text in out
        assert theirs_tok.decode(expected) == generation.text


def test_staggered_engine_requests_equal_transformers_generate(exported):
    """The serving engine with requests arriving at different steps into two slots, the
    longest prompt prefilled in chunks of 5 tokens while others decode: each greedy
    completion equals `transformers` `generate` on the export."""
    from raytron.model.engine import Engine, EngineLimits
    from raytron.model.sampling import Sampling

    run_dir, out, hf = exported
    loaded = load_model(run_dir)
    theirs_tok = AutoTokenizer.from_pretrained(out)
    texts = ["The import statement", "x", "A class definition defines a new", "def f"]
    prompts = [theirs_tok(text)["input_ids"] for text in texts]
    engine = Engine(loaded.model, limits=EngineLimits(max_num_seqs=2, token_budget=7))
    requests, step = [], 0
    while len(requests) < len(prompts) or engine.busy():
        if step % 3 == 0 and len(requests) < len(prompts):
            requests.append(engine.submit(prompts[len(requests)], 12,
                                          Sampling(greedy=True), lambda event: None))
        engine.step()
        step += 1
    for prompt, request in zip(prompts, requests, strict=True):
        ids = torch.tensor([prompt])
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                               do_sample=False, eos_token_id=None)[0, len(prompt):]
        assert request.generated == expected.tolist()


def test_eval_perplexity_equals_transformers_on_the_export(exported, tmp_path):
    run_dir, out, hf = exported
    texts = reference_texts(70)[60:]
    corpus = tmp_path / "held_out.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts)
                      + "{not json\n" + json.dumps({"body": "no text field"}) + "\n")
    result_file = tmp_path / "result.json"
    code, printed, err = run_cli("eval", str(run_dir), "--data", str(corpus), "--seq-len", "48",
                                 "--stride", "16", "--batch", "5", "--output", str(result_file))
    assert code == 0, err
    result = json.loads(result_file.read_text())
    assert result["skipped"] == {"malformed_json": 1, "missing_field": 1}
    assert result["documents"] == len(texts)
    assert f"perplexity {result['perplexity']:.3f}" in printed
    theirs = AutoTokenizer.from_pretrained(out)
    documents = [theirs(t)["input_ids"] + [theirs.eos_token_id] for t in texts]
    assert max(len(d) for d in documents) > 48 * 3  # the sliding window is exercised
    assert result["tokens"] == sum(len(d) - 1 for d in documents)
    expected = hf_perplexity(hf, documents, max_length=48 + 1, stride=16)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)


def random_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=128, rms_norm_eps=1e-6,
                         rope_theta=50000.0, tie_word_embeddings=tied, bos_token_id=1,
                         eos_token_id=0, initializer_range=0.1)
    return LlamaForCausalLM(config).eval()


def test_large_weights_are_sharded_with_an_index(tmp_path, exported):
    run_dir, _, hf = exported
    code, _, err = run_cli("export", str(run_dir), str(tmp_path / "sharded"),
                           "--max-shard-size", "100KB", "--dtype", "bfloat16")
    assert code == 0, err
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    assert sharded.dtype == torch.bfloat16
    assert json.loads((tmp_path / "sharded" / "config.json").read_text())["torch_dtype"] \
        == "bfloat16"


def test_export_refuses_a_folder_that_holds_files(exported):
    run_dir, out, _ = exported
    before = sorted(p.name for p in out.iterdir())
    code, _, err = run_cli("export", str(run_dir), str(out))
    assert code == 2 and "not an empty folder" in err and "Fix:" in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_sources_that_hold_no_model_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("generate", str(tmp_path / "empty"), "--prompt", "x")
    assert code == 2 and "is no model" in err and "Traceback" not in err
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps(random_llama(False)
                                                                 .config.to_dict()))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    code, _, err = run_cli("eval", str(tmp_path / "pickled"), "--data", str(tmp_path))
    assert code == 2 and "safetensors only" in err
