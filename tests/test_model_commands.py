"""`raytron generate` and `raytron eval` as a user meets them: sources, prompt files, stop
strings, seeds, and bad input refused with exit 2 and a fix."""

import json

import pytest

from model_runs import run_cli, small_model, small_tokenizer, write_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("runs"), "small", small_model(512),
                     small_tokenizer(), step=20)


def test_a_checkpoint_folder_and_its_run_generate_the_same(run_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The import statement\n\nA class\n")
    outputs = []
    for source in (run_dir, run_dir / "checkpoints" / "step_00000020"):
        code, out, err = run_cli("generate", str(source), "--prompts-file", str(prompts),
                                 "--greedy", "--max-new-tokens", "10", "--batch-size", "2")
        assert code == 0, err
        outputs.append(out)
    assert outputs[0] == outputs[1]
    assert "--- 1/2 ---\nThe import statement" in outputs[0] and "--- 2/2 ---\nA class" in \
        outputs[0]


def test_sampling_repeats_with_a_seed_and_stops_at_a_stop_string(run_dir):
    def sample(*extra):
        code, out, err = run_cli("generate", str(run_dir), "--prompt", "def", "--seed", "4",
                                 "--temperature", "0.9", "--top-k", "50", "--top-p", "0.9",
                                 "--max-new-tokens", "30", *extra)
        assert code == 0, err
        return out.split("\n[")[0].removeprefix("def")

    first = sample()
    assert sample() == first
    stop = first[4:6]
    cut = sample("--stop", stop)
    assert cut == first[: first.index(stop)]


@pytest.mark.parametrize(("argv", "message"), [
    (["generate", "{run}"], "no prompt given"),
    (["generate", "{run}", "--prompt", "x", "--top-p", "0"], "out of range"),
    (["generate", "{run}", "--prompt", "x", "--temperature", "-1"], "out of range"),
    (["generate", "{run}", "--prompts-file", "/no/such/file"], "cannot be read"),
    (["eval", "{run}", "--data", "/no/such/corpus"], "--data.0.path"),
    (["eval", "{run}", "--data", "embedded:python-reference", "--stride", "100",
      "--seq-len", "50"], "--stride 100 is longer"),
    (["eval", "{run}", "--data", "embedded:python-reference", "--seq-len", "500"],
     "longer than the model's context"),
    (["generate", "{run}/checkpoints", "--prompt", "x"], "is no model"),
    (["eval", "{run}", "--data", "embedded:reverse-words"], "scores documents"),
])
def test_bad_input_is_refused_with_a_fix(run_dir, argv, message):
    code, _, err = run_cli(*[a.format(run=run_dir) for a in argv])
    assert code == 2
    assert message in err and "Traceback" not in err


def test_eval_of_the_held_out_documents_and_a_prompt_longer_than_the_context(run_dir,
                                                                             tmp_path):
    code, out, err = run_cli("eval", str(run_dir), "--data", "embedded:python-reference",
                             "--split", "held-out", "--output", str(tmp_path / "r.json"))
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert 0 < result["documents"] < 40 and result["split"] == "held-out"
    code, out, err = run_cli("generate", str(run_dir), "--prompt", "x", "--prompt", "word " * 100)
    assert code == 2 and "prompt 2 of 2 has" in err and "the model's context is 64" in err
    assert out == ""  # refused before anything was generated


def test_held_out_means_what_the_run_held_out_of_its_sources(tmp_path):
    run_dir = write_run(tmp_path, "validated", small_model(512), small_tokenizer(),
                        ("data.validation_sources=[embedded:python-reference]",))
    code, _, err = run_cli("eval", str(run_dir), "--data", "embedded:python-reference",
                           "--split", "held-out")
    assert code == 2 and "data.validation_sources" in err and "Fix:" in err
