"""`config/layout.py` owns the layout arithmetic: its answers, and a scan of the source
tree that fails when another module computes a coordinate, a stage count, a shard degree,
a size from the parallel dimensions, or compares with the literal "auto" itself."""

from __future__ import annotations

import ast
import dataclasses
import itertools
from pathlib import Path

import pytest

from raytron.model.stages import SCHEDULES
from raytron.platform.config.layout import MESH_DIMS, Layout
from raytron.platform.config.schema import AUTO, ClusterConfig, ParallelConfig, RaytronConfig

from conftest import REPO

LAYOUTS = [Layout(1, 1, 1), Layout(2, 3, 2), Layout(4, 2, 1), Layout(1, 4, 2), Layout(3, 1, 4),
           Layout(2, 2, 2, cp=2), Layout(1, 3, 1, cp=4)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_coordinates_and_rank_of_are_inverse(layout):
    seen = set()
    for rank in range(layout.world):
        at = layout.coordinates(rank)
        assert all(0 <= at[dim] < getattr(layout, dim) for dim in ("pp", "dp", "cp", "tp"))
        assert layout.rank_of(**at) == rank
        seen.add(tuple(at.values()))
    assert len(seen) == layout.world == layout.pp * layout.dp * layout.cp * layout.tp


def test_ranks_are_laid_out_pp_major_tp_innermost():
    layout = Layout(pp=2, dp=2, tp=2)
    assert [tuple(layout.coordinates(r).values()) for r in range(8)] == list(
        itertools.product(range(2), range(2), range(1), range(2)))
    assert layout.describe(5) == "rank 5 (pp=1, dp=0, tp=1)"
    layout = Layout(pp=2, dp=2, tp=2, cp=2)  # a context-parallel group next to tp's
    assert [tuple(layout.coordinates(r).values()) for r in range(16)] == list(
        itertools.product(range(2), range(2), range(2), range(2)))
    assert layout.describe(5) == "rank 5 (pp=0, dp=1, cp=0, tp=1)"


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_ranks_at_a_pipeline_rank_are_those_with_its_coordinate(layout):
    for pp_rank in range(layout.pp):
        assert list(layout.ranks_at(pp_rank)) == [
            r for r in range(layout.world) if layout.coordinates(r)["pp"] == pp_rank]


@pytest.mark.parametrize(("schedule", "per_rank"), [
    ("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 3), ("zero-bubble", 2)])
def test_stage_count_per_schedule(schedule, per_rank):
    assert Layout(pp=4, schedule=schedule, virtual_stages=3).stages == 4 * per_rank
    assert Layout(pp=1, schedule=schedule, virtual_stages=3).stages == 1  # no pipeline
    assert Layout(pp=1, schedule=schedule, virtual_stages=3).rank_stages(0) == [0]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("pp", [2, 3])
def test_every_stage_has_one_owner(schedule, pp):
    layout = Layout(pp=pp, schedule=schedule, virtual_stages=2)
    hosted = {pp_rank: layout.rank_stages(pp_rank) for pp_rank in range(pp)}
    assert sorted(s for stages in hosted.values() for s in stages) == list(range(layout.stages))
    assert all(layout.stage_owner(s) == pp_rank for pp_rank, stages in hosted.items()
               for s in stages)
    if schedule == "zero-bubble":
        assert hosted[0] == [0, 2 * pp - 1]  # the V: the first rank has first and last


@pytest.mark.parametrize(("dp_shard", "shard", "replicate"), [
    ("full", 4, 1), ("grad-op", 4, 1), ("none", 1, 4)])
def test_shard_and_replicate_degrees(dp_shard, shard, replicate):
    layout = Layout(pp=2, dp=4, tp=2, dp_shard=dp_shard)
    assert (layout.shard_degree, layout.replicate_degree) == (shard, replicate)
    assert layout.mesh_shape == (2, replicate, shard, 1, 2)
    assert len(layout.mesh_shape) == len(MESH_DIMS)
    assert [layout.shard_rank(r) for r in layout.ranks_at(1)] == \
        [dp % shard for dp in range(4) for _ in range(2)]
    assert layout.tp_groups == 8 and layout.replica_size == 4
    with_cp = dataclasses.replace(layout, cp=2)  # FSDP shards over dp_shard x cp
    assert (with_cp.shard_degree, with_cp.replicate_degree) == (2 * shard, replicate)
    assert with_cp.mesh_shape == (2, replicate, shard, 2, 2) and with_cp.batch_ranks == 8
    assert [with_cp.shard_rank(r) for r in with_cp.ranks_at(1)] == \
        [dp % shard * 2 + cp for dp in range(4) for cp in range(2) for _ in range(2)]
    assert with_cp.replica_size == 8


def config(dp, workers, **parallel) -> RaytronConfig:
    return RaytronConfig(parallel=ParallelConfig(dp=dp, **parallel),
                         cluster=ClusterConfig(workers=workers))


def test_layout_of_a_config_resolves_dp():
    assert Layout.of(config(AUTO, 12, pp=2, tp=2)).dp == 3  # as many replicas as fit
    assert Layout.of(config(AUTO, None)).dp == 1  # validation names the missing workers
    assert Layout.of(config(2, 8, pp=2, tp=2)).dp == 2
    assert Layout.of(config(AUTO, 12, pp=2, tp=2), dp=1).world == 4  # an elastic size
    layout = Layout.of(config(2, 4, pp=2, schedule="zero-bubble", dp_shard="none"))
    assert dataclasses.astuple(layout) == (2, 2, 1, 1, "none", "zero-bubble", 2)


# -- no other module computes what the layout owns ------------------------------------------

OWNER = Path("platform/config/layout.py")
SCANNED = ("platform", "model", "pipelines", "bench")
DIMS = {"pp", "dp", "tp"}
STAGE_ARITHMETIC = {"stages_per_rank", "rank_stages", "stage_owner"}  # model/stages.py's


def names_in(node: ast.AST) -> set[str]:
    """The identifiers a subtree reads: names and attribute names (`p.tp` reads tp)."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            found.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            found.add(sub.attr)
    return found


def factors(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return factors(node.left) + factors(node.right)
    return [node]


def reads_rank(node: ast.AST) -> bool:
    return any(name == "rank" or name.endswith("_rank") for name in names_in(node))


def layout_arithmetic(tree: ast.AST, path: Path) -> list[tuple[int, str]]:
    """(line, what) for each expression of `tree` that does the layout's arithmetic."""
    found = []
    inner = {id(f) for node in ast.walk(tree) if isinstance(node, ast.BinOp)
             and isinstance(node.op, ast.Mult) for f in (node.left, node.right)}
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult) and id(node) not in inner:
            dims = set().union(*(names_in(f) & DIMS for f in factors(node)))
            if len(dims) >= 2:
                found.append((node.lineno, f"a product of {sorted(dims)}"))
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.FloorDiv, ast.Mod)) \
                and reads_rank(node.left) and names_in(node.right) & DIMS:
            found.append((node.lineno, "a rank's coordinate"))
        if path != Path("model/stages.py") and (
                isinstance(node, ast.Name) and node.id in STAGE_ARITHMETIC
                or isinstance(node, ast.alias) and node.name in STAGE_ARITHMETIC
                or isinstance(node, ast.Attribute) and node.attr in STAGE_ARITHMETIC
                and isinstance(node.value, ast.Name) and node.value.id == "stages"):
            found.append((getattr(node, "lineno", 0), "pipeline stages"))
        if isinstance(node, ast.Compare) and "dp_shard" in names_in(node) and any(
                isinstance(c, ast.Constant) and c.value == "none" for c in ast.walk(node)):
            found.append((node.lineno, "the shard degree"))
        if isinstance(node, ast.Constant) and node.value == AUTO and path.parts[0] == "platform" \
                and path != Path("platform/config/schema.py"):
            found.append((node.lineno, 'the literal "auto" (use schema.AUTO)'))
    return sorted(set(found))


def source_files() -> list[Path]:
    return sorted(path.relative_to(REPO) for top in SCANNED for path in (REPO / top).rglob("*.py"))


def test_only_the_layout_does_layout_arithmetic():
    offenders = [f"{path}:{line}: {what}" for path in source_files() if path != OWNER
                 for line, what in layout_arithmetic(ast.parse((REPO / path).read_text()), path)]
    assert not offenders, (
        "layout arithmetic outside platform/config/layout.py (ask a `Layout` instead, so that "
        "a new dimension stays a change to that module):\n  " + "\n  ".join(offenders))


@pytest.mark.parametrize(("code", "path"), [
    ("coords = rank // (dp * p.tp), rank // p.tp % dp, rank % p.tp", "platform/config/plan.py"),
    ("workers = p.pp * int(p.dp) * p.tp", "platform/control/supervisor.py"),
    ("n = p.pp * stages_per_rank(p.schedule, p.virtual_stages)", "platform/worker/trainer.py"),
    ("from raytron.model.stages import rank_stages", "platform/config/plan.py"),
    ("shard = 1 if p.dp_shard == 'none' else dp", "platform/config/plan.py"),
    ("elastic = config.parallel.dp == 'auto'", "platform/control/supervisor.py"),
])
def test_the_scan_finds_what_it_looks_for(code, path):
    assert layout_arithmetic(ast.parse(code), Path(path))


def test_the_scan_leaves_other_arithmetic_alone():
    code = ("held * (1 + (pp - 1) / (pp * virtual_stages)); t.micro_batch * dp; "
            "stage % pp; layout.rank_stages(0); amount * p.tp")
    assert layout_arithmetic(ast.parse(code), Path("model/estimates.py")) == []
