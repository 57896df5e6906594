"""DPO (train.objective=dpo) on preference pairs: the pairs tokenized as TRL tokenizes
them, the loss and TRL's reward statistics equal to TRL's DPOTrainer on the same model
(exported) and pairs, and the same training in every layout as in one process."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from raytron.model.dpo import pair_losses, statistic_means
from raytron.model.lora import adapters_off
from raytron.pipelines.chat import ChatError, encode_preference, render, with_chat_tokens
from raytron.pipelines.packing import TOO_LONG, Batch, PairPacker, TokenDoc
from raytron.pipelines.sources import PREFERENCE, CorpusFile, row_record
from raytron.pipelines.stream import Tokenize
from raytron.pipelines.tokenizer import eos_id
from raytron.platform.worker.references import REFERENCE_FILE
from raytron.platform.worker.trainer import Sequences

from model_runs import lora_runs, run_cli, small_tokenizer
from parallel_harness import assert_same_run, run_parallel, run_single

DPO = ["train.objective=dpo", "train.lora.rank=4", "train.lora.alpha=8",
       "data.packing=samples", "train.dpo.beta=0.5"]
PAIRS = [
    {"prompt": "The keyword that defines a function is", "chosen": " def",
     "rejected": " class"},
    {"prompt": "A for loop iterates over", "chosen": " the items of a sequence",
     "rejected": " nothing at all, ever"},
    {"prompt": "Exceptions are raised with", "chosen": " the raise statement.",
     "rejected": " a comment"},
    {"prompt": "", "chosen": "Names are bound by assignment.", "rejected": "Names float."},
]
BETA = 0.5


def tokenized_pairs(tokenizer, pairs: list[dict]) -> list[TokenDoc]:
    """`pairs` through the pipeline's tokenizer stage, as the pair documents it streams."""
    encode = Tokenize(tokenizer.to_str(), eos_id(tokenizer), None, PREFERENCE)
    table = encode(pa.table({"doc": list(range(len(pairs))), "reason": [""] * len(pairs),
                             "text": [json.dumps(pair) for pair in pairs]}))
    assert table.column("reason").to_pylist() == [""] * len(pairs)
    return [TokenDoc(0, 0, row["doc"], np.array(row["tokens"], np.int32),
                     np.array(row["targets"]), chosen_length=row["chosen_length"])
            for row in table.to_pylist()]


def test_a_pair_is_two_rows_chosen_then_rejected_learning_the_completions_only():
    first = TokenDoc(0, 0, 0, np.arange(1, 8, dtype=np.int32),
                     np.array([0, 0, 1, 1, 0, 0, 1], bool), chosen_length=4)
    too_long = TokenDoc(0, 0, 1, np.arange(1, 12, dtype=np.int32), np.ones(11, bool),
                        chosen_length=2)  # its rejected side has 9 tokens: over a row
    packer = PairPacker(iter([first, too_long, first]), seq_len=5, pad=0)
    batch = Batch.of([packer.next_sequence(), packer.next_sequence()])
    assert batch.tokens.tolist() == [[1, 2, 3, 4, 0, 0], [5, 6, 7, 0, 0, 0]] * 2
    assert batch.targets[:2].tolist() == [[False, False, True, True, False, False],
                                          [False, False, True, False, False, False]]
    assert packer.skipped == {TOO_LONG: 1}


def test_preference_records_take_text_or_chat_messages_and_nothing_else():
    file = CorpusFile("pairs.jsonl", PREFERENCE)
    assert row_record(0, file, PAIRS[0]).text is not None
    chat = {"prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}]}
    assert row_record(1, file, chat).text is not None
    mixed = {**chat, "prompt": "hi"}
    assert row_record(2, file, mixed).reason == "missing_field"
    assert row_record(3, file, {"prompt": "hi", "chosen": "a"}).reason == "missing_field"


def test_chat_pairs_learn_what_the_template_adds_after_the_prompt():
    tokenizer = with_chat_tokens(small_tokenizer())
    prompt = [{"role": "user", "content": "Which keyword defines a function?"}]
    chosen = [{"role": "assistant", "content": "def"}]
    rejected = [{"role": "assistant", "content": "lambda, mostly"}]
    ids, learned, first = encode_preference(tokenizer, json.dumps(
        {"prompt": prompt, "chosen": chosen, "rejected": rejected}), eos=0)
    head = tokenizer.encode(render(prompt, add_generation_prompt=True)).ids
    assert ids[:first] == tokenizer.encode(render(prompt + chosen)).ids
    assert ids[first:] == tokenizer.encode(render(prompt + rejected)).ids
    assert learned[:first] == [index >= len(head) for index in range(first)]
    assert tokenizer.decode([i for i, keep in zip(ids[:first], learned[:first],
                                                  strict=True) if keep],
                            skip_special_tokens=False) == "def<|im_end|>\n"
    with pytest.raises(ChatError):
        encode_preference(tokenizer, json.dumps({"prompt": "x", "chosen": "", "rejected": "y"}),
                          eos=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A LoRA run's model (adapters as after training), exported for PEFT and TRL."""
    root = tmp_path_factory.mktemp("dpo")
    _, _, lora_dir, adapted = lora_runs(root, ("train.lora.rank=4", "train.lora.alpha=8"))
    code, _, err = run_cli("export", str(lora_dir), str(root / "adapter"))
    assert code == 0, err
    from tokenizers import Tokenizer

    from raytron.platform.storage.run_dir import TOKENIZER_FILE

    return root / "adapter", adapted.eval(), Tokenizer.from_file(str(lora_dir / TOKENIZER_FILE))


def test_loss_and_reward_statistics_equal_trls_dpo_trainer(exported, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    folder, adapted, tokenizer = exported
    docs = tokenized_pairs(tokenizer, PAIRS)
    packer = PairPacker(iter(docs), seq_len=31, pad=eos_id(tokenizer))
    batch = Sequences.of(Batch.of([packer.next_sequence() for _ in PAIRS]),
                         torch.device("cpu"))
    with torch.no_grad():
        logps = -adapted(batch.inputs, labels=batch.labels)
        with adapters_off([adapted]):
            reference = -adapted(batch.inputs, labels=batch.labels)
    losses, sums = pair_losses(logps, reference, (batch.labels >= 0).sum(1), BETA)
    ours = {"loss": losses.mean().item(), **statistic_means(sums.tolist())}

    hf_tokenizer = AutoTokenizer.from_pretrained(folder / "base")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "base"),
                                      folder)
    base = AutoModelForCausalLM.from_pretrained(folder / "base")  # raytron's reference
    trainer = DPOTrainer(model=model, ref_model=base, processing_class=hf_tokenizer,
                         train_dataset=Dataset.from_list(PAIRS),
                         args=DPOConfig(output_dir=str(tmp_path), beta=BETA, report_to=[],
                                        per_device_train_batch_size=len(PAIRS),
                                        use_cpu=True, bf16=False, dataset_num_proc=None))
    examples = list(trainer.train_dataset)
    for doc, example in zip(docs, examples, strict=True):  # the same tokens, learned alike
        chosen, rejected = np.split(doc.tokens, [doc.chosen_length])
        prompt = example["prompt_ids"]
        assert chosen.tolist() == prompt + example["chosen_ids"]
        assert rejected.tolist() == prompt + example["rejected_ids"]
        assert doc.targets.tolist() == [False] * len(prompt) + [True] * len(
            example["chosen_ids"]) + [False] * len(prompt) + [True] * len(example["rejected_ids"])
    model.train()
    loss = trainer._compute_loss(model, trainer.data_collator(examples), False)
    theirs = {"loss": loss.item(),
              **{name: values[-1] for name, values in trainer._metrics["train"].items()
                 if name.startswith(("rewards/", "logps/"))}}
    assert set(theirs) == set(ours)
    assert abs(ours["rewards/margins"]) > 1e-2  # the adapters move the model from its base
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-5)


def test_dpo_trains_alike_in_every_layout():
    """The loss, gradient norms, held-out loss and TRL's statistics of six steps."""
    want = run_single(DPO)
    assert want["losses"][0] == pytest.approx(np.log(2))  # B = 0: the policy is the reference
    for layout in (["parallel.dp=2"], ["parallel.tp=2"], ["parallel.cp=2"],
                   ["parallel.pp=2", "parallel.schedule=1f1b"]):
        assert_same_run(run_parallel(DPO + layout), want)


FULL_DPO = [option for option in DPO if not option.startswith("train.lora")]


def test_a_full_fine_tunes_dpo_takes_its_reference_from_a_pass_before_training(tmp_path):
    """Without LoRA the reference log-probabilities come from the starting weights, in a
    pass before the first step: the first loss is ln 2, the trained weights move away
    from them, every layout trains alike, and a resume reads the stored table."""
    want = run_single(FULL_DPO)
    assert want["losses"][0] == pytest.approx(np.log(2), abs=1e-6)
    # a reference recomputed from the weights as they train would give ln 2 at every step
    assert all(abs(loss - np.log(2)) > 1e-3 for loss in want["losses"][1:])
    for layout in (["parallel.dp=2"], ["parallel.tp=2"], ["parallel.pp=2",
                                                         "parallel.schedule=1f1b"]):
        assert_same_run(run_parallel(FULL_DPO + layout), want)
    run_single(FULL_DPO, 0, 3, checkpoints=tmp_path)
    assert (tmp_path / REFERENCE_FILE).is_file()
    resumed = run_parallel(FULL_DPO + ["parallel.dp=2"], 3, 6, checkpoints=tmp_path,
                           resume=True)
    assert resumed["losses"] == pytest.approx(want["losses"][3:], rel=1e-5)


def test_ipo_is_the_squared_distance_of_the_length_averaged_margin_from_one_over_two_beta():
    logps = torch.tensor([-4.0, -6.0, -1.0, -1.0])
    reference = torch.tensor([-5.0, -5.0, -1.0, -1.0])
    lengths = torch.tensor([2, 4, 1, 0])  # the second pair is padding
    losses, sums = pair_losses(logps, reference, lengths, beta=0.25, loss="ipo")
    assert losses.tolist() == pytest.approx([(1 / 2 + 1 / 4 - 2) ** 2, 0.0])
    assert sums[-1] == 1  # one real pair


def test_a_resumed_dpo_run_trains_as_the_uninterrupted_one(tmp_path):
    whole = run_single(DPO)
    run_single(DPO, 0, 3, checkpoints=tmp_path)
    resumed = run_single(DPO, 3, 6, checkpoints=tmp_path, resume=True)
    assert resumed["losses"] == pytest.approx(whole["losses"][3:], rel=1e-6)
    assert resumed["pair_statistics"] == pytest.approx(whole["pair_statistics"], rel=1e-6)
