"""Where runs live: a local directory or any ``pyarrow.fs`` URI (``s3://``, ``gs://``, ``file://``).

Checkpoints are written by whichever process holds the state (the parameter server on a
cluster), so every node must reach the same location: a shared directory or an object store.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from pyarrow import fs as pafs


class Location:
    """A file or folder on a local or remote filesystem, used like a ``Path``."""

    def __init__(self, where: str | Path | "Location") -> None:
        if isinstance(where, Location):
            self.fs, self.path, self.scheme, self.query = where.fs, where.path, where.scheme, where.query
            return
        where = str(where)
        self.query = ""  # URI options (e.g. ?endpoint_override=...), kept so the URI names the same store
        if "://" in where:
            self.fs, self.path = pafs.FileSystem.from_uri(where)
            self.scheme = where.split("://", 1)[0]
            self.query = where.partition("?")[2]
        else:
            self.fs, self.path, self.scheme = pafs.LocalFileSystem(), os.path.abspath(where), None
        self.path = self.path.rstrip("/") or "/"

    @property
    def uri(self) -> str:
        if self.scheme is None:
            return self.path
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __truediv__(self, name: str) -> "Location":
        child = Location(self)
        child.path = f"{self.path}/{name}"
        return child

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def local(self) -> Path | None:
        """The same location as a local ``Path``, where it is one (a plain path or ``file://``)."""
        return Path(self.path) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def listdir(self) -> list[str]:
        """Names of the files directly inside (none if the folder does not exist)."""
        if not self.is_dir():
            return []
        return [info.base_name for info in self.fs.get_file_info(pafs.FileSelector(self.path))
                if info.type == pafs.FileType.File]

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def write_bytes(self, data: bytes) -> None:
        """Write through a temporary sibling, then rename: readers see the old file or the
        whole new one, never a truncated one (object stores publish a finished upload at once)."""
        parent, name = self.path.rsplit("/", 1)
        self.fs.create_dir(parent, recursive=True)
        temporary = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with self.fs.open_output_stream(temporary) as stream:
                stream.write(data)
            if self.local is not None:  # make the bytes durable before the rename publishes them
                with open(temporary, "rb") as handle:
                    os.fsync(handle.fileno())
            self.fs.move(temporary, self.path)
        except BaseException:  # a full disk or Ctrl-C: leave no half-written sibling behind
            if self.fs.get_file_info(temporary).type == pafs.FileType.File:
                self.fs.delete_file(temporary)
            raise

    def delete(self) -> None:
        self.fs.delete_file(self.path)

    def check_writable(self) -> None:
        """Raises:
            PermissionError: the folder cannot be created or written (says where and why),
                so a run fails at start instead of at its first checkpoint.
        """
        probe = self / f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"ok")
            probe.delete()
        except OSError as error:
            raise PermissionError(f"storage {self.uri} is not writable: {error}") from None

    def upload_from(self, folder: Path) -> None:
        """Copy a local folder's files here (how a remote run location gets its metrics)."""
        self.fs.create_dir(self.path, recursive=True)
        pafs.copy_files(str(folder), self.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def download_to(self, folder: Path, skip: tuple[str, ...] = ()) -> None:
        """Copy this folder's files into a local folder, except the top-level entries named in
        ``skip`` (to continue a remote run's metrics without fetching its checkpoints)."""
        if not self.is_dir():
            return
        for info in self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True)):
            relative = info.path[len(self.path) + 1:]
            if info.type != pafs.FileType.File or relative.split("/", 1)[0] in skip:
                continue
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((self / relative).read_bytes())
