"""raytron's MT-NLG zero-shot tasks (`mtnlg_*`) read local copies of each dataset, as
their official releases unpack, and ask exactly what lm_eval's stock task asks of the
same documents as the Hugging Face Hub holds them (the real peer: its own task configs,
fed those documents)."""

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")  # the [eval] extra; CI installs it
pytestmark = pytest.mark.usefixtures("hub_offline")  # no call may wait on the Hub

from lm_eval.tasks import TaskManager  # noqa: E402

from raytron.platform.models.task_eval import raytron_tasks, whole_index  # noqa: E402

from model_runs import run_cli, small_model, small_tokenizer, write_run  # noqa: E402

# documents as the Hub's datasets hold them (what the stock tasks read), two of each, and
# the split raytron's task reads them from
HUB_DOCS = {
    "lambada_openai": ("test", [{"text": "The cat sat on the mat and looked at the dog"},
                                {"text": "She opened the door and saw the garden"}]),
    "piqa": ("validation", [
        {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Push the lid.", "label": 0},
        {"goal": "Dry a towel", "sol1": "Soak it.", "sol2": "Hang it in the sun.",
         "label": 1}]),
    "hellaswag": ("validation", [
        {"ind": 4, "activity_label": "Removing ice from car",
         "ctx_a": "Then, the man writes over the snow.", "ctx_b": "then",
         "ctx": "Then, the man writes over the snow. then",
         "endings": [", the man adds wax.", " [title] he waits.", " he stops.",
                     " he leaves."], "source_id": "a", "split": "val",
         "split_type": "indomain", "label": "3"},
        {"ind": 9, "activity_label": "Baking cookies", "ctx_a": "A woman mixes dough.",
         "ctx_b": "she", "ctx": "A woman mixes dough. she",
         "endings": [" bakes it.", " eats it.", " throws it.", " sings."],
         "source_id": "b", "split": "val", "split_type": "zeroshot", "label": "0"}]),
    "winogrande": ("validation", [
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the "
                     "harder cases.", "option1": "Sarah", "option2": "Maria", "answer": "1"},
        {"sentence": "The trophy does not fit in the suitcase because _ is too small.",
         "option1": "trophy", "option2": "suitcase", "answer": "2"}]),
    "boolq": ("validation", [
        {"question": "is the sky blue", "passage": "The sky is blue on clear days.",
         "idx": 0, "label": 1},
        {"question": "do fish fly", "passage": "Fish swim in water.", "idx": 1,
         "label": 0}]),
    "wic": ("validation", [
        {"word": "bank", "sentence1": "He sat on the bank.", "sentence2": "The bank is "
         "closed.", "start1": 14, "end1": 18, "start2": 4, "end2": 8, "idx": 0, "label": 0},
        {"word": "run", "sentence1": "I run daily.", "sentence2": "They run fast.",
         "start1": 2, "end1": 5, "start2": 5, "end2": 8, "idx": 1, "label": 1}]),
    "race": ("test", [
        {"article": "Tom has a red ball. He plays with it every day.",
         "problems": repr([
             {"answer": "B", "options": ["blue", "red", "green", "black"],
              "question": "What colour is the ball?"},
             {"answer": "A", "options": ["every day", "never", "once", "at night"],
              "question": "When does Tom play?"}])}]),
    "anli_r1": ("test", [
        {"uid": "a1", "premise": "A dog runs.", "hypothesis": "An animal moves.",
         "label": 0, "reason": ""},
        {"uid": "a2", "premise": "It rains.", "hypothesis": "The ground is dry.",
         "label": 2, "reason": ""}]),
}
ANLI_LETTERS = "enc"


def write_releases(folder: Path) -> None:
    """`HUB_DOCS` as the official releases hold them, unpacked into `folder`."""
    def jsonl(path: str, rows: list[dict]) -> None:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text("".join(json.dumps(row) + "\n" for row in rows))

    docs = {name: rows for name, (_, rows) in HUB_DOCS.items()}
    jsonl("lambada_test.jsonl", docs["lambada_openai"])
    jsonl("piqa/valid.jsonl", [{k: v for k, v in d.items() if k != "label"} | {"id": str(i)}
                               for i, d in enumerate(docs["piqa"])])
    (folder / "piqa/valid-labels.lst").write_text("".join(f"{d['label']}\n"
                                                          for d in docs["piqa"]))
    jsonl("hellaswag_val.jsonl", [d | {"label": int(d["label"])} for d in docs["hellaswag"]])
    jsonl("winogrande_1.1/dev.jsonl", [d | {"qID": str(i)}
                                       for i, d in enumerate(docs["winogrande"])])
    jsonl("BoolQ/val.jsonl", [d | {"label": bool(d["label"])} for d in docs["boolq"]])
    jsonl("WiC/val.jsonl", [d | {"label": bool(d["label"])} for d in docs["wic"]])
    race = folder / "RACE/test/high"
    race.mkdir(parents=True)
    for i, doc in enumerate(docs["race"]):
        problems = eval(doc["problems"])  # noqa: S307 (this test's own literal)
        race.joinpath(f"{i}.txt").write_text(json.dumps({
            "answers": [p["answer"] for p in problems],
            "options": [p["options"] for p in problems],
            "questions": [p["question"] for p in problems],
            "article": doc["article"], "id": f"high{i}.txt"}))
    for round_name in ("R1", "R2", "R3"):
        jsonl(f"anli_v1.0/{round_name}/test.jsonl", [
            {"uid": d["uid"], "context": d["premise"], "hypothesis": d["hypothesis"],
             "label": ANLI_LETTERS[d["label"]], "reason": d["reason"]}
            for d in docs["anli_r1"]])
    (folder / "hans").mkdir()
    header = ("gold_label\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
              "sentence2_parse\tsentence1\tsentence2\tpairID\theuristic\tsubcase\ttemplate\n")
    (folder / "hans/heuristics_evaluation_set.txt").write_text(
        header + "non-entailment\t-\t-\t-\t-\tThe doctor saw the lawyer .\tThe lawyer saw "
        "the doctor .\tex0\tlexical_overlap\tln_subject/object_swap\ttemp1\n"
        "entailment\t-\t-\t-\t-\tThe actor slept .\tThe actor slept .\tex1\t"
        "lexical_overlap\tle_relative_clause\ttemp2\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mtnlg")
    write_releases(folder)
    return folder


def requests(manager: TaskManager, spec) -> list:
    """Every request the task asks of a model, in order."""
    task = next(iter(manager.load_task_or_group([spec]).values()))
    task.build_all_requests(rank=0, world_size=1)
    return [(instance.request_type, instance.arguments) for instance in task.instances]


# the documents under every split name a stock task may read (its few-shot split too)
HUB_LOADER = """import json, pathlib
import datasets

SPLITS = ("train", "validation", "test", "train_r1", "dev_r1", "test_r1")
for _name, (_split, _docs) in json.loads(
        (pathlib.Path(__file__).parent / "hub_docs.json").read_text()).items():
    globals()[_name] = (lambda docs: lambda **_: datasets.DatasetDict(
        {split: datasets.Dataset.from_list(docs) for split in SPLITS}))(_docs)
"""


@pytest.fixture(scope="module")
def stock_tasks(tmp_path_factory) -> TaskManager:
    """lm_eval's stock tasks, each included whole from its own YAML, reading `HUB_DOCS`
    instead of the Hub: `stock_<name>`."""
    folder = tmp_path_factory.mktemp("stock")
    (folder / "hub_docs.json").write_text(json.dumps(HUB_DOCS))
    (folder / "hub_docs.py").write_text(HUB_LOADER)
    index = whole_index(None).task_index  # lm_eval's whole index: once in this process
    for name in HUB_DOCS:
        (folder / f"stock_{name}.yaml").write_text(
            f"include: {index[name].yaml_path}\ntask: stock_{name}\n"
            f"custom_dataset: !function hub_docs.{name}\n")
    return TaskManager(include_defaults=False, include_path=str(folder))


@pytest.fixture(scope="module")
def ours(data_dir) -> TaskManager:
    return TaskManager(include_path=str(raytron_tasks()), metadata={"data_dir": str(data_dir)})


@pytest.mark.parametrize("stock", HUB_DOCS)
def test_each_task_asks_what_lm_evals_stock_task_asks_of_the_hubs_documents(
        stock, ours, stock_tasks):
    name = {"lambada_openai": "lambada", "race": "race_high"}.get(stock, stock)
    asked = requests(ours, f"mtnlg_{name}")
    assert asked == requests(stock_tasks, f"stock_{stock}")
    assert len(asked) >= 2  # two documents' worth


def test_hans_asks_whether_each_premise_entails_its_hypothesis(ours):
    asked = requests(ours, "mtnlg_hans")
    assert asked[:2] == [
        ("loglikelihood", ("The doctor saw the lawyer .\nQuestion: The lawyer saw the "
                           "doctor . True or False?\nAnswer:", " True")),
        ("loglikelihood", ("The doctor saw the lawyer .\nQuestion: The lawyer saw the "
                           "doctor . True or False?\nAnswer:", " False"))]
    task = next(iter(ours.load_task_or_group(["mtnlg_hans"]).values()))
    assert [task.doc_to_target(doc) for doc in task.test_docs()] == [1, 0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    return write_run(root, "run", small_model(512, max_seq_len=128), small_tokenizer())


def test_one_command_scores_the_whole_set_from_the_data_folder(run_dir, data_dir, tmp_path):
    output = tmp_path / "mtnlg.json"
    code, out, err = run_cli("eval", str(run_dir), "--tasks", "mtnlg", "--data-dir",
                             str(data_dir), "--output", str(output))
    assert code == 0, err
    results = json.loads(output.read_text())["results"]
    assert {f"mtnlg_{name}" for name in ("lambada", "piqa", "hellaswag", "winogrande",
                                         "boolq", "race_high", "anli_r1", "anli_r2",
                                         "anli_r3", "hans", "wic")} <= set(results)
    assert "mtnlg_piqa" in out


def test_a_missing_file_says_where_to_get_it(run_dir, tmp_path):
    code, _, err = run_cli("eval", str(run_dir), "--tasks", "mtnlg_piqa", "--data-dir",
                           str(tmp_path))
    assert code == 2
    assert "piqa/valid.jsonl is not there" in err and "https://yonatanbisk.com/piqa" in err
    code, _, err = run_cli("eval", str(run_dir), "--tasks", "mtnlg_boolq")
    assert code == 2 and "--data-dir DIR" in err and "BoolQ.zip" in err


def test_training_scores_them_from_the_data_folder_too(data_dir):
    """train.eval_task_data_dir: the judge of a run asks BoolQ's two questions, two
    answers each."""
    from raytron.platform.config.load import load_config
    from raytron.platform.models.task_judge import TaskJudge

    config = load_config("tiny", ["data.seq_len=64", "train.eval_tasks=[mtnlg_boolq]",
                                  f"train.eval_task_data_dir={data_dir}"])
    assert len(TaskJudge(config, small_tokenizer().to_str()).requests()) == 4
