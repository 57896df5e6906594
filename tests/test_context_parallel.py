"""Context parallelism (parallel.cp) against the single-process run of the same model,
data and seed, on gloo: losses, gradient norms, validation loss and final parameters,
alone and beside tp (sequence parallel), dp (FSDP and DDP) and pp (1F1B, interleaved,
zero-bubble), with packed samples that must not see each other, with recomputation; and
checkpoints that move between cp and other layouts. Ring attention itself is tested in
tests/test_ring_attention.py."""

import pytest
import torch

from parallel_harness import (
    assert_same_parameters,
    assert_same_run,
    final_parameters,
    first_gradients,
    parallel_gradients,
    run_parallel,
    run_single,
)

SAMPLES = ["data.packing=samples"]  # packed samples, each attending only within itself

LAYOUTS = {
    "cp2": ["parallel.cp=2"],
    "cp4-samples": ["parallel.cp=4", *SAMPLES],
    "cp2-tp2-samples": ["parallel.cp=2", "parallel.tp=2", *SAMPLES],
    "cp2-dp2-fsdp": ["parallel.cp=2", "parallel.dp=2"],
    "cp2-dp2-ddp-samples": ["parallel.cp=2", "parallel.dp=2", "parallel.dp_shard=none",
                            *SAMPLES],
    "cp2-pp2-1f1b-samples": ["parallel.cp=2", "parallel.pp=2", *SAMPLES],
    "cp2-pp2-interleaved": ["parallel.cp=2", "parallel.pp=2",
                            "parallel.schedule=interleaved-1f1b"],
    "cp2-pp2-zero-bubble-grad-op-samples": ["parallel.cp=2", "parallel.pp=2",
                                            "parallel.schedule=zero-bubble",
                                            "parallel.dp_shard=grad-op", *SAMPLES],
    "pp2-cp2-tp2-selective-recompute-samples": [
        "parallel.pp=2", "parallel.cp=2", "parallel.tp=2",
        "train.activation_checkpointing=selective", *SAMPLES],
}


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """The single-process run, with and without packed samples: (result, parameters)."""
    runs = {}
    for name, overrides in (("plain", []), ("samples", SAMPLES)):
        checkpoints = tmp_path_factory.mktemp(name)
        runs[name] = run_single(overrides, checkpoints=checkpoints), \
            final_parameters(checkpoints, 6)
    return runs


@pytest.mark.parametrize("name", LAYOUTS)
def test_context_parallel_layout_matches_one_process(tmp_path, references, name):
    """Ring attention sums in another order than SDPA (the gradients agree to 4e-7 of
    their largest, below): the final parameters as `assert_same_parameters` allows."""
    want, want_params = references["samples" if SAMPLES[0] in LAYOUTS[name] else "plain"]
    got = run_parallel(LAYOUTS[name], checkpoints=tmp_path)
    assert_same_run(got, want)
    assert_same_parameters(final_parameters(tmp_path, 6), want_params)


@pytest.mark.parametrize("overrides", [["parallel.cp=4"], ["parallel.cp=2", "parallel.tp=2"]],
                         ids=["cp4", "cp2-tp2"])
def test_context_parallel_gradients_are_those_of_one_process(overrides):
    """Every parameter's gradient of a step with packed samples, element by element."""
    want = first_gradients(SAMPLES)
    got = parallel_gradients(overrides + SAMPLES)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-6 * grad.abs().max(),
                                   msg=name)


def test_samples_stay_apart_across_context_shards(references):
    """The packed run differs from the plain one, and from packed samples that see each
    other: the masks of the runs above were in force."""
    unmasked = run_parallel(["parallel.cp=2", *SAMPLES, "data.document_mask=false"], stop=2)
    assert unmasked["losses"][1] != pytest.approx(references["samples"][0]["losses"][1],
                                                  rel=1e-4)
    assert unmasked["losses"] == pytest.approx(
        run_single([*SAMPLES, "data.document_mask=false"], stop=2)["losses"], rel=1e-5)


def test_a_cp2_tp2_checkpoint_resumes_in_other_layouts_and_back(tmp_path, references):
    """cp2×tp2 trains 2 steps, 1×1×1 the next 2 from its checkpoint, dp2 one more, and
    cp2×tp2 the last: the losses of the uninterrupted single-process run."""
    want = references["plain"][0]
    cp_tp = ["parallel.cp=2", "parallel.tp=2"]
    losses = run_parallel(cp_tp, stop=2, checkpoints=tmp_path)["losses"]
    losses += run_single([], start=2, stop=4, checkpoints=tmp_path, resume=True)["losses"]
    losses += run_parallel(["parallel.dp=2"], start=4, stop=5, checkpoints=tmp_path,
                           resume=True)["losses"]
    last = run_parallel(cp_tp, start=5, stop=6, checkpoints=tmp_path, resume=True)
    assert losses + last["losses"] == pytest.approx(want["losses"], rel=1e-5)
    assert last["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)


@pytest.mark.parametrize("overrides", [[], ["parallel.pp=2", "parallel.schedule=zero-bubble"]],
                         ids=["1x1x1", "pp2-zero-bubble"])
def test_a_loss_over_chunks_of_five_tokens_trains_as_the_whole_logits_do(references,
                                                                         overrides):
    """The loss makes the logits of a few tokens at a time (recomputed in the backward
    pass): the run of the whole logits, in one process and through a pipeline schedule
    that splits the backward pass in two."""
    run = run_parallel if overrides else run_single
    assert_same_run(run(overrides, loss_chunk=5), references["plain"][0])
