"""`raytron eval --tasks`: lm-evaluation-harness tasks on raytron's model in process give
what lm_eval's own `hf` model gives on `raytron export`'s folder (the real peer), sample
by sample; the command writes and logs its results; bad input is a clear error."""

import json
import socket

import pytest

pytest.importorskip("lm_eval")  # the [eval] extra; CI installs it
pytestmark = pytest.mark.usefixtures("hub_offline")  # no call may wait on the Hub

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from raytron.platform.models import load_model  # noqa: E402
from raytron.platform.models.harness import RaytronLM  # noqa: E402
from raytron.platform.models.task_eval import raytron_tasks, task_metrics  # noqa: E402

from model_runs import run_cli, small_model, small_tokenizer, write_run  # noqa: E402

TASKS = ["raytron_last_word", "raytron_next_line"]
LIMIT = 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run_dir = write_run(root, "run", small_model(512, max_seq_len=128), small_tokenizer())
    code, _, err = run_cli("export", str(run_dir), str(root / "hf"))
    assert code == 0, err
    return run_dir, root / "hf"


def evaluated(model, **options) -> dict:
    return simple_evaluate(model=model, tasks=TASKS, limit=LIMIT, log_samples=True,
                           task_manager=TaskManager(include_path=str(raytron_tasks())),
                           **options)


def scores(results: dict, task: str) -> list[float]:
    """Every request's log-likelihood, sample by sample (a multiple-choice sample has one
    per choice)."""
    return [float(response[0][0]) for sample in sorted(results["samples"][task],
                                                        key=lambda s: s["doc_id"])
            for response in sample["resps"]]


def test_scores_equal_lm_evals_hf_model_on_the_export(exported):
    from lm_eval.models.huggingface import HFLM

    run_dir, hf_dir = exported
    ours = evaluated(RaytronLM(load_model(run_dir), batch_size=5))
    theirs = evaluated(HFLM(pretrained=str(hf_dir), batch_size=5, device="cpu",
                            dtype="float32"))
    for task in TASKS:
        assert scores(ours, task) == pytest.approx(scores(theirs, task), abs=1e-4)
        assert ours["results"][task]["acc,none"] == theirs["results"][task]["acc,none"]
    assert len(scores(ours, "raytron_next_line")) == 4 * LIMIT  # four choices each


@pytest.fixture(scope="module")
def served(ray_session, exported):
    from ray import serve

    from raytron.platform.serving.app import build_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(str(exported[0]), "run"), name="raytron", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_lm_evals_local_completions_on_raytron_serve_gives_the_same_scores(exported,
                                                                           served):
    """lm_eval's own client of OpenAI-compatible servers, tokenizing through the server
    (/tokenizer_info, /tokenize), scoring with echo and logprobs."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    theirs = evaluated(LocalCompletionsAPI(model="run", base_url=f"{served}/v1/completions",
                                           tokenizer_backend="remote",
                                           tokenized_requests=True, max_length=128,
                                           num_concurrent=4))
    # max_length 128 (the context): lm_eval sends prompts of 127 tokens (1 more is
    # generated), a scored sequence's last 127, which a model in process keeps at 126
    ours = evaluated(RaytronLM(load_model(exported[0]), max_length=126))
    for task in TASKS:
        assert scores(ours, task) == pytest.approx(scores(theirs, task), abs=1e-4)
        assert ours["results"][task]["acc,none"] == theirs["results"][task]["acc,none"]


def test_generation_on_raytron_serve_gives_the_text_of_generation_in_process(
        exported, served, tmp_path):
    """A generate_until task (greedy, stop strings): the same text either way, as text
    and as conversations."""
    from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI
    from lm_eval.utils import RemoteTokenizer

    items = tmp_path / "lines.jsonl"
    items.write_text("".join(json.dumps({"context": text, "answer": ""}) + "\n"
                             for text in ("The import statement", "A class is", "x = 1",
                                          "Objects are", "def f():", "The while loop")))
    (tmp_path / "continue.yaml").write_text(f"""task: continue_lines
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
output_type: generate_until
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""")
    manager = TaskManager(include_path=[str(tmp_path)])

    def texts(model, **options) -> list[str]:
        results = simple_evaluate(model=model, tasks=["continue_lines"], log_samples=True,
                                  task_manager=manager, **options)
        samples = sorted(results["samples"]["continue_lines"], key=lambda s: s["doc_id"])
        return [sample["resps"][0][0] for sample in samples]

    ours = texts(RaytronLM(load_model(exported[0])))
    theirs = texts(LocalCompletionsAPI(model="run", base_url=f"{served}/v1/completions",
                                       tokenizer_backend="remote", tokenized_requests=True,
                                       max_length=128))
    assert ours == theirs and len(ours) == 6 and any(ours)
    # as conversations: lm_eval's chat client, the server rendering its chat template
    ours = texts(RaytronLM(load_model(exported[0])), apply_chat_template=True)
    theirs = texts(LocalChatCompletion(model="run", base_url=f"{served}/v1/chat/completions",
                                       max_length=128), apply_chat_template=True)
    assert ours == theirs and any(ours)
    remote = RemoteTokenizer(f"{served}/v1/completions")  # the template /tokenizer_info gives
    conversation = [{"role": "user", "content": "Hi"}]
    assert remote.apply_chat_template(conversation) == \
        RaytronLM(load_model(exported[0])).apply_chat_template(conversation)


def test_the_command_prints_writes_and_names_its_metrics(exported, tmp_path):
    run_dir, _ = exported
    output = tmp_path / "scores.json"
    code, printed, err = run_cli("eval", str(run_dir), "--tasks", "raytron_next_line",
                                 "--limit", "8", "--batch-size", "4", "--output", str(output))
    assert code == 0, err
    assert "raytron_next_line" in printed and "acc_norm" in printed
    results = json.loads(output.read_text())
    assert set(task_metrics(results)) == {"eval/raytron_next_line/acc",
                                          "eval/raytron_next_line/acc_norm"}
    assert results["results"]["raytron_next_line"]["alias"] == "raytron_next_line"


def test_a_task_of_ones_own_reads_local_files(exported, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"question": f"{a} plus {a} is",
                                         "choices": [str(2 * a), str(2 * a + 1)],
                                         "label": 0}) + "\n" for a in range(6)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "sums.yaml").write_text(f"""task: my_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    output = tmp_path / "sums.json"
    code, printed, err = run_cli("eval", str(exported[0]), "--tasks", "my_sums",
                                 "--include-path", str(tmp_path / "tasks"), "--output",
                                 str(output))
    assert code == 0, err
    assert json.loads(output.read_text())["n-samples"]["my_sums"]["effective"] == 6


@pytest.mark.parametrize(("arguments", "says"), [
    (("--tasks", "no_such_task"), "no task named no_such_task"),
    (("--tasks", "raytron_next_line", "--data", "x.txt"), "--data (perplexity) or --tasks"),
    ((), "--data (perplexity) or --tasks"),
])
def test_bad_arguments_are_clear_errors_before_anything_loads(exported, arguments, says):
    code, _, err = run_cli("eval", str(exported[0]), *arguments)
    assert code == 2 and says in err and "Traceback" not in err
