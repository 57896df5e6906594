"""Every parallel layout against the single-process run of the same model, data and seed:
losses, gradient norms, validation loss and final parameters, on gloo process groups.
The final parameters are compared by loading each layout's checkpoint into one process,
which also proves checkpoints load across layouts."""

import pytest
import torch

from parallel_harness import final_parameters, run_parallel, run_single

LAYOUTS = {
    "dp2-fsdp": ["parallel.dp=2"],
    "dp2-zero2": ["parallel.dp=2", "parallel.dp_shard=grad-op"],
    "dp2-ddp": ["parallel.dp=2", "parallel.dp_shard=none"],
    "tp2-sp": ["parallel.tp=2"],
    "tp2-no-sp-gathered-loss": ["parallel.tp=2", "parallel.sequence_parallel=false",
                                "parallel.loss_parallel=false"],
    "pp2-gpipe": ["parallel.pp=2", "parallel.schedule=gpipe"],
    "pp2-1f1b-two-calls": ["parallel.pp=2", "parallel.microbatches=2"],
    "pp2-interleaved": ["parallel.pp=2", "parallel.schedule=interleaved-1f1b"],
    "pp2-zero-bubble": ["parallel.pp=2", "parallel.schedule=zero-bubble"],
    "pp2-uneven": ["parallel.pp=2", "parallel.layers_per_stage=[3,1]"],
    "dp2-tp2-recompute": ["parallel.dp=2", "parallel.tp=2", "train.activation_checkpointing=2"],
    "pp2-dp2-tp2": ["parallel.pp=2", "parallel.dp=2", "parallel.tp=2"],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    checkpoints = tmp_path_factory.mktemp("reference")
    result = run_single([], checkpoints=checkpoints)
    return result, final_parameters(checkpoints, 6)


def assert_same_run(got: dict, want: dict) -> None:
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    assert got["norms"] == pytest.approx(want["norms"], rel=1e-4)
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_one_process(tmp_path, reference, name):
    want, want_params = reference
    checkpoints = tmp_path / "checkpoints"
    got = run_parallel(LAYOUTS[name], checkpoints=checkpoints)
    assert_same_run(got, want)
    pp = 2 if any(o.startswith("parallel.pp=") for o in LAYOUTS[name]) else 0
    assert len(got["idle"]) == pp and all(0 <= share < 1 for share in got["idle"])
    got_params = final_parameters(checkpoints, 6)
    assert got_params.keys() == want_params.keys()
    for key, value in want_params.items():
        torch.testing.assert_close(got_params[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("resume_as", [["parallel.tp=2"], ["parallel.pp=2"], []],
                         ids=["1x1x2", "2x1x1", "1x1x1"])
def test_a_1x2x2_checkpoint_resumes_in_other_layouts(tmp_path, reference, resume_as):
    """1x2x2 trains 3 steps and checkpoints; another layout resumes for 3 more and must
    continue exactly like the uninterrupted single-process run."""
    want, _ = reference
    checkpoints = tmp_path / "checkpoints"
    first = run_parallel(["parallel.dp=2", "parallel.tp=2"], stop=3,
                         checkpoints=checkpoints)
    assert first["losses"] == pytest.approx(want["losses"][:3], rel=1e-5)
    if resume_as:
        resumed = run_parallel(resume_as, start=3, stop=6, checkpoints=checkpoints,
                               resume=True)
    else:
        resumed = run_single([], start=3, stop=6, checkpoints=checkpoints, resume=True)
    assert resumed["losses"] == pytest.approx(want["losses"][3:], rel=1e-5)
    assert resumed["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)


TIED = ["model.tie_embeddings=true"]


@pytest.fixture(scope="module")
def tied_reference(reference):
    result = run_single(TIED)
    assert result["losses"][-1] != pytest.approx(reference[0]["losses"][-1], rel=1e-3)
    return result


@pytest.mark.parametrize("layout", [["parallel.dp=2"], ["parallel.tp=2"],
                                    ["parallel.dp=2", "parallel.tp=2"]],
                         ids=["dp2", "tp2", "dp2-tp2"])
def test_tied_embeddings_stay_tied_in_every_layout(tied_reference, layout):
    """One matrix for the embedding and the head, whatever shards it."""
    assert_same_run(run_parallel(TIED + layout), tied_reference)


def test_a_tied_model_trains_one_matrix():
    import dataclasses

    from raytron.platform.worker.layout import Layout
    from raytron.platform.worker.trainer import Trainer

    from parallel_harness import config

    cfg = config(TIED)
    part = Trainer(cfg, Layout(), torch.device("cpu"), None).parts[0]
    assert part.output.weight is part.tok_embeddings.weight
    untied = Trainer(dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, tie_embeddings=False)), Layout(), torch.device("cpu"), None).parts[0]
    assert sum(p.numel() for p in untied.parameters()) - sum(
        p.numel() for p in part.parameters()) == cfg.model.vocab_size * cfg.model.d_model
