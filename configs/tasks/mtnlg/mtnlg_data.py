"""The data of raytron's MT-NLG zero-shot tasks (`mtnlg_*`, the group `mtnlg`): each
dataset read from a local copy of its official release, unpacked into one folder
(`raytron eval --data-dir DIR`, `train.eval_task_data_dir`, or lm_eval's
`--metadata '{"data_dir": "DIR"}'`), and given the fields of the Hugging Face dataset
that lm_eval's stock task reads, so that the prompts, choices and metrics are the stock
task's (the YAMLs beside this file use its prompt functions).
"""

import csv
import json
from pathlib import Path

import datasets

# each task's files under the data folder: where to get them, and what they are
SOURCES = {
    "lambada": ("lambada_test.jsonl",
                "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"),
    "piqa": ("piqa/valid.jsonl and piqa/valid-labels.lst",
             "https://yonatanbisk.com/piqa/data/ (valid.jsonl, valid-labels.lst)"),
    "hellaswag": ("hellaswag_val.jsonl", "https://raw.githubusercontent.com/rowanz/hellaswag/"
                                         "master/data/hellaswag_val.jsonl"),
    "winogrande": ("winogrande_1.1/dev.jsonl", "https://storage.googleapis.com/ai2-mosaic/"
                                               "public/winogrande/winogrande_1.1.zip"),
    "boolq": ("BoolQ/val.jsonl", "https://dl.fbaipublicfiles.com/glue/superglue/data/v2/"
                                 "BoolQ.zip"),
    "wic": ("WiC/val.jsonl", "https://dl.fbaipublicfiles.com/glue/superglue/data/v2/WiC.zip"),
    "race": ("RACE/test/high/*.txt", "http://www.cs.cmu.edu/~glai1/data/race/RACE.tar.gz"),
    "anli": ("anli_v1.0/R1/test.jsonl (R2, R3)",
             "https://dl.fbaipublicfiles.com/anli/anli_v1.0.zip"),
    "hans": ("hans/heuristics_evaluation_set.txt", "https://raw.githubusercontent.com/"
             "tommccoy1/hans/master/heuristics_evaluation_set.txt"),
}
ANLI_LABELS = {"e": 0, "n": 1, "c": 2}  # entailment, neutral, contradiction
HANS_LABELS = {"entailment": 0, "non-entailment": 1}


def lambada(data_dir=None, **_metadata):
    return split("test", read_jsonl(located(data_dir, "lambada", "lambada_test.jsonl")))


def piqa(data_dir=None, **_metadata):
    docs = read_jsonl(located(data_dir, "piqa", "piqa/valid.jsonl"))
    labels = located(data_dir, "piqa", "piqa/valid-labels.lst").read_text().split()
    if len(labels) != len(docs):
        raise ValueError(f"piqa: {len(docs)} questions in valid.jsonl, {len(labels)} labels "
                         "in valid-labels.lst; they must be the files of one release")
    return split("validation", [{"goal": doc["goal"], "sol1": doc["sol1"],
                                 "sol2": doc["sol2"], "label": int(label)}
                                for doc, label in zip(docs, labels, strict=True)])


def hellaswag(data_dir=None, **_metadata):
    docs = read_jsonl(located(data_dir, "hellaswag", "hellaswag_val.jsonl"))
    return split("validation", [{**doc, "label": str(doc["label"])} for doc in docs])


def winogrande(data_dir=None, **_metadata):
    docs = read_jsonl(located(data_dir, "winogrande", "winogrande_1.1/dev.jsonl"))
    return split("validation", [{"sentence": doc["sentence"], "option1": doc["option1"],
                                 "option2": doc["option2"], "answer": str(doc["answer"])}
                                for doc in docs])


def boolq(data_dir=None, **_metadata):
    docs = read_jsonl(located(data_dir, "boolq", "BoolQ/val.jsonl"))
    return split("validation", [{"question": doc["question"], "passage": doc["passage"],
                                 "idx": doc["idx"], "label": int(doc["label"])}
                                for doc in docs])


def wic(data_dir=None, **_metadata):
    docs = read_jsonl(located(data_dir, "wic", "WiC/val.jsonl"))
    return split("validation", [{**doc, "label": int(doc["label"])} for doc in docs])


def race_high(data_dir=None, **_metadata):
    """One document per article of RACE's high-school test set, its questions as the
    stock task reads them (the last one is asked, the others answered before it)."""
    folder = located(data_dir, "race", "RACE/test/high")
    docs = []
    for path in sorted(folder.glob("*.txt")):
        article = json.loads(path.read_text(encoding="utf-8"))
        problems = [{"answer": answer, "options": options, "question": question}
                    for answer, options, question in zip(
                        article["answers"], article["options"], article["questions"],
                        strict=True)]
        docs.append({"article": article["article"], "problems": repr(problems)})
    if not docs:
        raise FileNotFoundError(missing("race", folder))
    return split("test", docs)


def anli(round_name):
    def load(data_dir=None, **_metadata):
        docs = read_jsonl(located(data_dir, "anli", f"anli_v1.0/{round_name}/test.jsonl"))
        return split("test", [{"uid": doc["uid"], "premise": doc["context"],
                               "hypothesis": doc["hypothesis"],
                               "label": ANLI_LABELS[doc["label"]]} for doc in docs])
    return load


anli_r1, anli_r2, anli_r3 = anli("R1"), anli("R2"), anli("R3")


def hans(data_dir=None, **_metadata):
    path = located(data_dir, "hans", "hans/heuristics_evaluation_set.txt")
    with path.open(encoding="utf-8", newline="") as rows:
        docs = [{"premise": row["sentence1"], "hypothesis": row["sentence2"],
                 "heuristic": row["heuristic"], "label": HANS_LABELS[row["gold_label"]]}
                for row in csv.DictReader(rows, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return split("test", docs)


def located(data_dir, dataset: str, relative: str) -> Path:
    """The file (or folder) `relative` of `dataset` in the data folder, or a
    FileNotFoundError saying where to get it."""
    if not data_dir:
        raise FileNotFoundError(f"the mtnlg tasks read local copies of their data, and no "
                                f"data folder was given: --data-dir DIR (training: "
                                f"train.eval_task_data_dir) holding {SOURCES[dataset][0]}, "
                                f"from {SOURCES[dataset][1]}")
    path = Path(data_dir).expanduser() / relative
    if not path.exists():
        raise FileNotFoundError(missing(dataset, path))
    return path


def missing(dataset: str, path: Path) -> str:
    name, url = SOURCES[dataset]
    return f"{path} is not there: the {dataset} task reads {name}, from {url}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def split(name: str, docs: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(docs)})

