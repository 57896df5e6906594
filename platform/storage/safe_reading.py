"""Reading a DCP checkpoint without running code from it.

Checkpoint storage may be a bucket others can write. Torch DCP reads its `.metadata`
file with plain `pickle.load` and any non-tensor entry with `torch.load(weights_only=False)`,
either of which runs whatever code a crafted file names. raytron saves tensors only,
reads `.metadata` with an unpickler that builds nothing but DCP's own metadata classes,
and refuses an entry stored as pickled bytes. Tensor data is read by DCP with
`torch.load(weights_only=True)`, which builds tensors only.
"""

from __future__ import annotations

import io
import pickle
from pathlib import PurePosixPath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # looks a torch.layout up by its name
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpoint(ValueError):
    """A checkpoint file that would run code (or build arbitrary objects) when read."""


class MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch sizes and dtypes, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if name in METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpoint(f"its .metadata names {module}.{name}, which is no part of a "
                               "DCP checkpoint's metadata; raytron refuses to build it")


class SafeMetadata:
    """Mixed into DCP's readers: `.metadata` through `MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = MetadataUnpickler(io.BytesIO(stream.read())).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f"its .metadata holds a {type(metadata).__name__}, "
                                   "not DCP metadata")
        check_entry_files(metadata)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_entry_files(metadata: Metadata) -> None:
    """DCP reads each entry from `relative_path` joined to the checkpoint's folder: a crafted
    `../../etc/passwd` or `/home/...` would read any file the process can. Each must be a
    name inside the folder; `UnsafeCheckpoint` naming the first that is not."""
    if not isinstance(metadata.storage_data, dict):
        raise UnsafeCheckpoint("its .metadata has no map of the files its entries are in")
    for info in metadata.storage_data.values():
        path = getattr(info, "relative_path", None)
        if not is_name_inside(path):
            raise UnsafeCheckpoint(f"its .metadata places an entry in {path!r}, which is not a "
                                   "file inside the checkpoint's folder; raytron reads only "
                                   "those")


def is_name_inside(path: Any) -> bool:
    """A non-empty relative path without a `..` component or a NUL."""
    return (isinstance(path, str) and bool(path) and "\x00" not in path
            and not PurePosixPath(path).is_absolute() and ".." not in PurePosixPath(path).parts)


class SafeFileSystemReader(SafeMetadata, FileSystemReader):
    pass


class SafeFsspecReader(SafeMetadata, FsspecReader):
    pass


class TensorsOnlyPlanner(DefaultLoadPlanner):
    """Refuses every entry stored as pickled bytes instead of unpickling it."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise UnsafeCheckpoint(f"its entry {read_item.dest_index.fqn} is stored as pickled "
                               "bytes; raytron loads tensors only")


def safe_reader(checkpoint_id: str, local: bool) -> FileSystemReader:
    return SafeFileSystemReader(checkpoint_id) if local else SafeFsspecReader(checkpoint_id)
