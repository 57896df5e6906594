"""The file list each source's cursor was recorded in, kept with it, and checked on resume.

A data cursor names a position in a permutation of a source's file list (epoch, file,
record, offset). Resumed with another list, the same cursor names other documents: the
run would go on, silently, on data the uninterrupted run never saw. Every checkpoint
therefore records, per source, the lists in force from its cursor's epoch on (each
file's path and version: size and modification time, or the embedded corpus's hash),
and a resume compares them with the files listed now. A change is refused, naming the
files added, removed or changed, unless the run asks to grow its corpus
(`data.on_new_files=next_epoch`): then files added since are read from the next epoch
on, and the epoch in flight finishes over the files it started with.
"""

from __future__ import annotations

import dataclasses

from raytron.pipelines.stream import SourceSpec, StreamSpec

ERROR, NEXT_EPOCH = "error", "next_epoch"
ON_NEW_FILES = (ERROR, NEXT_EPOCH)  # data.on_new_files
SHOWN = 5  # file names a message lists of each kind


def recorded_lists(spec: StreamSpec, cursor: dict) -> list[list[dict] | None]:
    """Per source, the file lists the data of `cursor` on reads: [{"from_epoch": e,
    "files": [[path, version], ...]}, ...]; None for a source exhausted before it."""
    positions = cursor.get("sources") or [{}] * len(spec.sources)
    lists: list[list[dict] | None] = []
    for source, position in zip(spec.sources, positions, strict=True):
        if position is None:
            lists.append(None)
            continue
        epoch = position.get("epoch", 0)
        eras = source.eras or ((0, tuple(range(len(source.files)))),)
        current = [first for first, _ in eras if first <= epoch]
        since = current[-1] if current else eras[0][0]
        lists.append([{"from_epoch": first,
                       "files": [[source.files[i].path, source.files[i].version]
                                 for i in indices]}
                      for first, indices in eras if first >= since])
    return lists


def resumed_spec(spec: StreamSpec, cursor: dict, on_new_files: str,
                 step: int) -> tuple[StreamSpec, list[str]]:
    """`spec` (just listed) reading what `cursor`'s recorded lists say each epoch reads,
    and one problem per source whose files changed in a way the run cannot take. A
    cursor from before lists were recorded is taken as it is."""
    recorded = cursor.get("files")
    if not recorded or len(recorded) != len(spec.sources):  # none, or another source list,
        return spec, []  # which the resume rules refuse
    sources, problems = [], []
    positions = cursor.get("sources") or [None] * len(spec.sources)
    for index, (source, eras, position) in enumerate(
            zip(spec.sources, recorded, positions, strict=True)):
        if eras is None or position is None:  # exhausted: nothing of it is read again
            sources.append(source)
            continue
        grown, problem = resumed_source(source, eras, position.get("epoch", 0), on_new_files)
        sources.append(grown)
        if problem:
            problems.append(f"data.sources.{index} ({source.files[0].path}...): its files "
                            f"changed since the checkpoint at step {step}: {problem}")
    return dataclasses.replace(spec, sources=sources), problems


def resumed_source(source: SourceSpec, eras: list[dict], epoch: int,
                   on_new_files: str) -> tuple[SourceSpec, str | None]:
    """`source` with the recorded `eras` (and, when allowed, the files listed now from
    the epoch after `epoch` on); the problem when the change cannot be taken."""
    template = source.files[0]
    listed = {f.path: f for f in source.files}
    files: dict[tuple[str, str], int] = {}  # (path, version) -> index in `all_files`
    all_files, spec_eras = [], []
    for era in eras:
        indices = []
        for path, version in era["files"]:
            key = (path, version)
            if key not in files:
                files[key] = len(all_files)
                all_files.append(dataclasses.replace(listed.get(path, template), path=path,
                                                     version=version))
            indices.append(files[key])
        spec_eras.append((int(era["from_epoch"]), tuple(indices)))
    now = [(f.path, f.version) for f in source.files]
    last = [tuple(item) for item in eras[-1]["files"]]
    if now != last:
        added, removed, changed = difference(last, now)
        if on_new_files != NEXT_EPOCH or removed or changed:
            return source, describe(added, removed, changed, on_new_files)
        for key in now:
            if key not in files:
                files[key] = len(all_files)
                all_files.append(listed[key[0]])
        first = max(epoch + 1, spec_eras[-1][0])  # a list not yet in force is replaced
        spec_eras = [era for era in spec_eras if era[0] < first]
        spec_eras.append((first, tuple(files[key] for key in now)))
    return dataclasses.replace(source, files=all_files, eras=tuple(spec_eras)), None


def difference(before: list[tuple[str, str]], after: list[tuple[str, str]]
               ) -> tuple[list[str], list[str], list[str]]:
    """The paths added, removed and changed (same path, other version) between lists."""
    old, new = dict(before), dict(after)
    return ([p for p in new if p not in old], [p for p in old if p not in new],
            [p for p in new if p in old and new[p] != old[p]])


def describe(added: list[str], removed: list[str], changed: list[str], on_new_files: str
             ) -> str:
    parts = [f"{what} {shown(paths)}" for what, paths in
             (("added", added), ("removed", removed),
              ("changed (size or modification time)", changed)) if paths]
    if on_new_files == NEXT_EPOCH:
        fix = ("data.on_new_files=next_epoch takes added files only: put the removed and "
               "changed files back as they were")
    else:
        fix = ("put the files back as they were, or, to grow the corpus, set "
               "data.on_new_files=next_epoch (added files are read from the next epoch on)")
    return (f"{'; '.join(parts)}. The run's data cursor counts positions in the files it "
            f"was recorded with: resumed with others it would feed different documents. "
            f"Fix: {fix}; or start a new run with another run.name.")


def shown(paths: list[str]) -> str:
    more = f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else ""
    return ", ".join(paths[:SHOWN]) + more
