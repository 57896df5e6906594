"""`raytron plan`, the memory estimates and the placement checks."""

import pytest

from raytron.model.estimates import GB, in_flight_microbatches
from raytron.model.stages import bubble_fraction, stage_layers
from raytron.platform.cli import EXIT_CONFIG_ERROR, main
from raytron.platform.config.load import load_config
from raytron.platform.config.plan import make_plan
from raytron.platform.config.snapshot_room import snapshots_unfit
from raytron.platform.config.validate import (
    placement_problems,
    resolve_layout,
    snapshot_problems,
    workers_on,
)


def test_mt_nlg_530b_plan_is_plausible():
    plan = make_plan(resolve_layout(load_config("mt-nlg-530b")))
    assert 528e9 < plan.total_params < 533e9  # the paper's 530B
    first = plan.ranks[0].memory
    # 16 bytes per parameter held (fp32 master, gradient, two Adam moments); tp=8 splits
    # the matrices, the norms' gains are whole on every rank:
    assert first.held * 16 == first.weights + first.gradients + first.optimizer
    assert first.params / 8 < first.held < first.params / 8 * 1.001
    assert 25 * GB < plan.busiest.memory.total < 40 * GB
    assert first.activations_no_recompute > 15 * GB > first.activations_full_recompute
    assert plan.bubble == pytest.approx(34 / (240 + 34))
    # 6N + attention per token over 1920 x 2048 tokens: about 1.27e19
    assert plan.flops_per_step == pytest.approx(1.27e19, rel=0.02)
    assert plan.fits()


def test_plan_refuses_what_does_not_fit(capsys):
    assert main(["plan", "llama-1b", "cluster.device_memory_gb=8"]) == EXIT_CONFIG_ERROR
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", "tiny"]) == 0
    out = capsys.readouterr().out
    for text in ("layout", "parameters", "weights", "activations", "bubble", "FLOPs"):
        assert text in out


def test_plan_says_which_context_parallelism_a_long_sequence_needs(capsys):
    """llama-1b at 128k tokens on 80 GB devices: 232 GB on one; cp=4 splits each sequence
    (its activations and, FSDP sharding over dp x cp, its weights) into 58 GB."""
    long = ["data.seq_len=131072", "train.global_batch=8", "train.micro_batch=1",
            "cluster.device_memory_gb=80"]
    assert main(["plan", "llama-1b", *long]) == EXIT_CONFIG_ERROR
    out = capsys.readouterr().out
    assert "parallel.cp=4 splits each sequence so that it fits: 58.4 GB" in out
    one = make_plan(load_config("llama-1b", long[:-1]))
    four = make_plan(load_config("llama-1b", [*long[:-1], "parallel.cp=4"]))
    assert four.busiest.memory.activations == pytest.approx(  # the loss's chunk aside
        one.busiest.memory.activations / 4, rel=0.01)
    assert four.busiest.memory.held == pytest.approx(one.busiest.memory.held / 4, rel=1e-3)
    # each device sends its k and v share round the ring: 3 times forward in bf16, 4 times
    # backward with fp32 gradients; 16 layers, 8 sequences of 32k tokens per device
    kv = 2 * 8 * 64 * 131072 // 4
    assert four.ring_bytes == pytest.approx(16 * 8 * kv * (3 * 2 + 4 * (2 + 4)))
    assert main(["plan", "llama-1b", *long, "parallel.cp=4"]) == 0
    assert "32768 tokens of each sequence per device (cp=4)" in capsys.readouterr().out
    # the docs' long-context layouts: llama-1b at 32k over cp=2, Llama 3.1 8B at 128k
    # over its tp=8 and cp=4
    assert make_plan(load_config("llama-1b", [
        "data.seq_len=32768", "train.global_batch=32", "train.micro_batch=1",
        "parallel.cp=2"])).busiest.memory.total == pytest.approx(35.7 * GB, abs=0.05 * GB)
    eight = ["data.seq_len=131072", "train.global_batch=16", "cluster.device_memory_gb=80"]
    assert main(["plan", "llama3.1-8b", *eight]) == EXIT_CONFIG_ERROR
    assert "parallel.cp=2 splits each sequence so that it fits: 74.9 GB" in \
        capsys.readouterr().out
    assert make_plan(load_config("llama3.1-8b", [*eight, "parallel.cp=4"])
                     ).busiest.memory.total == pytest.approx(37.4 * GB, abs=0.05 * GB)


def test_a_lora_plan_counts_gradients_and_optimizer_state_of_the_adapters_alone(capsys):
    """gpt2-124m with rank-16 adapters on every projection: 12 x 16 x (4 x (768 + 768) +
    3 x (768 + 2048)) = 2.80M trained parameters, each with a gradient (4 bytes) and two
    AdamW moments (8); the weights are all held; the base's backward computes no weight
    gradients (4 FLOPs per weight and token instead of 6)."""
    full = make_plan(load_config("gpt2-124m"))
    lora = make_plan(load_config("gpt2-124m", ["train.lora.rank=16"]))
    adapters = 12 * 16 * (4 * (768 + 768) + 3 * (768 + 2048))
    assert lora.trained_params == adapters
    memory = lora.busiest.memory
    assert (memory.gradients, memory.optimizer) == (4 * adapters, 8 * adapters)
    assert memory.weights > full.busiest.memory.weights  # the base and the adapters
    assert 0.67 < lora.flops_per_step / full.flops_per_step < 0.75  # attention: unchanged
    assert main(["plan", "gpt2-124m", "train.lora.rank=16"]) == 0
    assert "2.80M trained parameters (2.22%)" in capsys.readouterr().out


def test_a_dpo_plan_counts_the_reference_pass(capsys):
    """DPO with LoRA adds the base's forward pass (a third of a full model's step) to a
    LoRA step's FLOPs, and holds no second model; without LoRA, steps cost what they do."""
    lora = ["train.lora.rank=16"]
    plain = make_plan(load_config("gpt2-124m", lora))
    dpo = ["train.objective=dpo", "data.sources=[{path: embedded:reverse-words-pairs}]", *lora]
    aligned = make_plan(load_config("gpt2-124m", dpo))
    full = make_plan(load_config("gpt2-124m"))
    assert aligned.flops_per_step == pytest.approx(
        plain.flops_per_step + full.flops_per_step / 3)
    assert aligned.busiest.memory.total == plain.busiest.memory.total
    assert main(["plan", "gpt2-124m", *dpo]) == 0
    assert "pairs per step (beta 0.1, sigmoid); the reference is the base" in \
        capsys.readouterr().out
    # a full fine-tune's reference is computed before the first step: steps cost as ever
    whole = make_plan(load_config("gpt2-124m", dpo[:2]))
    assert whole.flops_per_step == pytest.approx(full.flops_per_step)
    assert main(["plan", "gpt2-124m", *dpo[:2]]) == 0
    assert "the reference is the starting weights" in capsys.readouterr().out


def test_stage_split_and_bubble_formulas():
    assert [len(r) for r in stage_layers(10, 4)] == [3, 3, 2, 2]
    assert [list(r) for r in stage_layers(4, 2, [3, 1])] == [[0, 1, 2], [3]]
    assert bubble_fraction("1f1b", 4, 12) == pytest.approx(3 / 15)
    assert bubble_fraction("interleaved-1f1b", 4, 12, 2) == pytest.approx(3 / 27)
    assert bubble_fraction("zero-bubble", 4, 8) == 0
    assert bubble_fraction("gpipe", 1, 8) == 0
    assert in_flight_microbatches("1f1b", 4, 0, 16, 1) == 4
    assert in_flight_microbatches("1f1b", 4, 3, 16, 1) == 1
    assert in_flight_microbatches("gpipe", 4, 3, 16, 1) == 16


def test_tensor_parallel_must_fit_one_node():
    config = load_config("tiny", ["parallel.tp=8", "cluster.workers=8", "model.n_heads=8",
                                  "model.n_kv_heads=8", "cluster.gpus_per_worker=1"])
    problems = placement_problems(config, [{"CPU": 64, "GPU": 4}, {"CPU": 64, "GPU": 4}], 1)
    assert len(problems) == 1 and "parallel.tp=8 is larger than the 4 workers" in problems[0]
    assert placement_problems(config, [{"CPU": 64, "GPU": 8}], 1) == []


def test_a_worker_must_fit_one_node_by_every_resource_it_asks_for():
    """The GPU presets ask 8 CPUs per worker: a GPU node with fewer hosts no worker."""
    config = load_config("gpt2-124m", ["cluster.address=auto"])
    (problem,) = placement_problems(config, [{"CPU": 4, "GPU": 1}], 1)
    assert problem == ("cluster.cpus_per_worker=8: no node has 8 CPUs (the most one has is "
                       "4). Fix: lower cluster.cpus_per_worker to 4 or less, or use nodes "
                       "with more CPUs.")
    assert placement_problems(config, [{"CPU": 8, "GPU": 1}], 1) == []
    local = load_config("gpt2-124m", ["cluster.num_cpus=4"])
    assert "or raise cluster.num_cpus" in placement_problems(local, [{"CPU": 4}], 0)[0]
    (problem,) = placement_problems(config, [{"CPU": 64}], 1)
    assert problem.startswith("cluster.gpus_per_worker=1: no node has 1 GPU (the most one "
                              "has is 0). Fix: set cluster.gpus_per_worker=0 to train on CPUs")
    (problem,) = placement_problems(config, [{"CPU": 4, "GPU": 1}, {"CPU": 64}], 1)
    assert problem.startswith("no node has all a worker asks for at once (8 CPUs, 1 GPU; the "
                              "nodes have: 4 CPUs, 1 GPU; 64 CPUs, 0 GPUs). Fix: lower one of "
                              "cluster.cpus_per_worker, cluster.gpus_per_worker")


def test_a_tensor_parallel_group_fits_by_its_scarcest_resource():
    config = load_config("llama-1b", ["cluster.address=auto", "parallel.tp=2"])
    (problem,) = placement_problems(config, [{"CPU": 8, "GPU": 8}], 1)
    assert problem.startswith("parallel.tp=2 is larger than the 1 workers the largest node can "
                              "host (its 8 CPUs at cluster.cpus_per_worker=8)")
    assert "lower cluster.cpus_per_worker, or use nodes with more CPUs" in problem
    assert placement_problems(config, [{"CPU": 8, "GPU": 8}, {"CPU": 16, "GPU": 2}], 1) == []
    assert workers_on({"CPU": 64, "GPU": 1}, {"CPU": 1, "GPU": 0.1}) == 10  # 1 / 0.1 < 10


def test_custom_worker_resources_must_be_on_a_node():
    config = load_config("tiny", ["cluster.address=auto", "parallel.tp=2",
                                  "cluster.worker_resources={trainer: 1}"])
    (problem,) = placement_problems(config, [{"CPU": 8}], 0)
    assert problem.startswith("cluster.worker_resources.trainer=1: no node has 1 'trainer' (the "
                              "most one has is 0). Fix: declare it on the nodes meant for "
                              "workers (`ray start --resources='{\"trainer\": N}'`")
    (problem,) = placement_problems(config, [{"CPU": 8, "trainer": 1}], 0)
    assert "(its 1 'trainer' at cluster.worker_resources.trainer=1)" in problem
    assert placement_problems(config, [{"CPU": 4, "trainer": 2}], 0) == []


def test_snapshots_fit_when_every_nodes_keeper_can_hold_two_steps_of_its_and_a_peers_ranks():
    """llama3.1-8b on 8-GPU nodes: 12.05 GB per device; a keeper holds two steps of its
    node's 8 devices and of another node's 8: 385.5 GB, so a node needs that much memory
    for Ray's tasks and actors; a single node holds no peer's copy."""
    plan = make_plan(load_config("llama3.1-8b", ["cluster.address=auto"]))
    assert plan.snapshot_share == pytest.approx(12.05e9, rel=1e-3)
    node = {"CPU": 64, "GPU": 8, "memory": 386e9}
    assert snapshots_unfit(plan, 1, [node, node]) is None
    small = {**node, "memory": 380e9}
    assert snapshots_unfit(plan, 1, [node, small]) == (
        "a node's keeper may hold 385.5 GB of snapshots (2 steps of 8 of its own workers' "
        "shares and 8 of another node's, 12.0 GB each), and the node has 380.0 GB for them "
        "(380.0 GB of memory for Ray's tasks and actors)")
    assert snapshots_unfit(plan, 1, [small]) is None  # 192.8 GB: no peer's copy
    head = {"CPU": 8, "memory": 200e9}  # no GPU, no worker: it holds a GPU node's copies
    assert snapshots_unfit(plan, 1, [node, node, head]) is None
    assert "keeper may hold 192.8 GB" in snapshots_unfit(plan, 1, [node, {**head, "memory": 1e9}])


def test_workers_on_cpus_leave_their_own_state_out_of_the_snapshots_room():
    config = load_config("gpt2-124m", ["cluster.address=auto", "cluster.gpus_per_worker=0",
                                       "cluster.cpus_per_worker=4"])
    plan = make_plan(config)
    own = plan.busiest.memory.total
    share = plan.snapshot_share
    just = {"CPU": 4, "memory": own + 2 * share}
    assert snapshots_unfit(plan, 0, [just]) is None
    problem = snapshots_unfit(plan, 0, [{**just, "memory": own + share}])
    assert problem.endswith(f"less {own / GB:.1f} GB for its 1 workers' own state)")


def test_a_snapshot_interval_set_by_hand_is_refused_where_they_do_not_fit():
    nodes = [{"CPU": 64, "GPU": 8, "memory": 100e9}] * 2
    explicit = load_config("llama3.1-8b", ["cluster.address=auto",
                                           "checkpoint.memory_interval=5"])
    (problem,) = snapshot_problems(explicit, nodes, 1)
    assert problem.startswith("checkpoint.memory_interval=5: the in-memory snapshots do not fit: "
                              "a node's keeper may hold 385.5 GB")
    assert problem.endswith("Fix: set checkpoint.memory_interval=auto (snapshots only where they "
                            "fit) or 0 (restarts start from the last committed checkpoint), or "
                            "give the nodes more memory.")
    for interval in ("auto", "0"):  # auto turns them off where they do not fit, at launch
        config = load_config("llama3.1-8b", ["cluster.address=auto",
                                             f"checkpoint.memory_interval={interval}"])
        assert snapshot_problems(config, nodes, 1) == []


# the parameter counts of the released models (their model cards and safetensors indexes)
RELEASED = {"llama3.2-1b": 1_235_814_400, "qwen2.5-0.5b": 494_032_768,
            "qwen3-0.6b": 596_049_920, "llama3.1-8b": 8_030_261_248,
            "qwen3-8b": 8_190_735_360}


@pytest.mark.parametrize("preset", list(RELEASED))
def test_a_family_preset_has_the_released_models_shape(preset):
    """The preset's parameters are the released model's, and the config.json raytron would
    export for it builds the family's transformers class with that many."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raytron.model.families import FAMILIES
    from raytron.model.gpt import GPT
    from raytron.model.hf import hf_config
    from raytron.platform.config.resolve import gpt_shape, resolve_model

    config = load_config(preset)
    shape = gpt_shape(resolve_model(config.model, 1000))
    family = FAMILIES[config.model.family]
    assert make_plan(resolve_layout(config)).total_params == RELEASED[preset]
    with torch.device("meta"):
        assert GPT(shape).num_params() == RELEASED[preset]
        theirs = AutoModelForCausalLM.from_config(AutoConfig.for_model(
            **hf_config(shape, family, "bfloat16", 1, 2, 2)))
    assert type(theirs).__name__ == family.architecture
    assert sum(p.numel() for p in theirs.parameters()) == RELEASED[preset]
