"""Where images and videos come from: folders, zip archives or uncompressed tar archives, any
depth, looked up by file name (the public releases name files uniquely).

Indexing reads directory entries and archive tables only. A member whose path is absolute or
climbs with "..", or a symlink resolving outside its folder, is never indexed, and a name asked
for that is not a plain file name (it holds a path separator or is "..") is refused: both count
as "path outside the dataset root".

Two entries with one file name (the same image in two --images folders, or in a folder and an
archive) are counted and the first few named; `prefer="first"` (the default) keeps the entry of
the source listed first, "last" the one listed last.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path

# ("file", path) | ("zip", archive, member) | ("tar", archive, offset, size): picklable, so a
# plan can be sent to writer processes.
Ref = tuple

_open_archives: dict[str, object] = {}  # per process: archive path -> open handle


def safe_name(name: str) -> bool:
    """A plain file name: no directory part, no "..", nothing absolute."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _member_ok(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return not name.startswith(("/", "\\")) and ".." not in parts and ":" not in parts[0]


class Sources:
    """File name -> Ref over a list of folders and archives; also by stem (name without its
    extension) for videos and feature files named after a video id."""

    EXAMPLES = 5  # duplicate names kept for the summary

    def __init__(self, paths, prefer: str = "first"):
        if prefer not in ("first", "last"):
            raise ValueError(f"prefer={prefer!r}; valid: first, last")
        self.paths = [Path(p) for p in paths or ()]
        self.prefer = prefer
        self.by_name: dict[str, Ref] = {}
        self.outside = 0  # entries refused while indexing
        self.duplicates = 0  # entries whose name was already indexed
        self.duplicate_names: list[str] = []  # the first EXAMPLES of them
        for p in self.paths:
            if p.is_dir():
                self._index_dir(p)
            elif zipfile.is_zipfile(p):
                self._index_zip(p)
            elif p.is_file() and tarfile.is_tarfile(p):
                self._index_tar(p)
            else:
                raise FileNotFoundError(
                    f"{p} is not a folder, a .zip or a .tar archive; pass where the files are"
                )
        self.by_stem: dict[str, list[str]] = {}
        for name in self.by_name:
            self.by_stem.setdefault(name.rsplit(".", 1)[0], []).append(name)

    def _add(self, name: str, ref: Ref) -> None:
        if name in self.by_name:
            self.duplicates += 1
            if len(self.duplicate_names) < self.EXAMPLES:
                self.duplicate_names.append(name)
            if self.prefer == "first":
                return
        self.by_name[name] = ref

    def _index_dir(self, root: Path) -> None:
        real_root = os.path.realpath(root)
        stack = [str(root)]
        while stack:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_symlink():
                        real = os.path.realpath(e.path)
                        if os.path.isfile(real) and real.startswith(real_root + os.sep):
                            self._add(e.name, ("file", e.path))
                        else:
                            self.outside += 1
                    elif e.is_file(follow_symlinks=False):
                        self._add(e.name, ("file", e.path))

    def _index_zip(self, path: Path) -> None:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.is_dir():
                    continue
                if not _member_ok(info.filename):
                    self.outside += 1
                    continue
                self._add(info.filename.rsplit("/", 1)[-1], ("zip", str(path), info.filename))

    def _index_tar(self, path: Path) -> None:
        try:
            tar = tarfile.open(path, "r:")  # noqa: SIM115 (uncompressed only: read by offset)
        except tarfile.ReadError:
            raise FileNotFoundError(
                f"{path} is a compressed tar; members are read by offset, so decompress it "
                f"first (e.g. gunzip) or extract it to a folder"
            ) from None
        with tar:
            for m in tar:
                if not m.isreg():
                    continue
                if not _member_ok(m.name):
                    self.outside += 1
                    continue
                self._add(m.name.rsplit("/", 1)[-1], ("tar", str(path), m.offset_data, m.size))

    def lookup(self, name: str) -> Ref | None:
        return self.by_name.get(name)

    def lookup_stem(self, stem: str, exts: tuple[str, ...]) -> Ref | None:
        """The first file named stem + one of exts (in exts' order)."""
        names = self.by_stem.get(stem, ())
        for ext in exts:
            if stem + ext in names:
                return self.by_name[stem + ext]
        return None


def ref_name(ref: Ref) -> str:
    return ref[1] if ref[0] == "file" else f"{ref[1]}:{ref[2]}"


def read(ref: Ref) -> bytes:
    """The bytes of a referenced file (archives stay open per process)."""
    kind = ref[0]
    if kind == "file":
        return Path(ref[1]).read_bytes()
    if kind == "zip":
        z = _open_archives.get(ref[1])
        if z is None:
            z = _open_archives[ref[1]] = zipfile.ZipFile(ref[1])
        return z.read(ref[2])
    if kind == "tar":
        f = _open_archives.get(ref[1])
        if f is None:
            f = _open_archives[ref[1]] = open(ref[1], "rb")  # noqa: SIM115 (cached handle)
        f.seek(ref[2])
        data = f.read(ref[3])
        if len(data) != ref[3]:
            raise OSError(f"{ref_name(ref)}: archive truncated ({len(data)} of {ref[3]} bytes)")
        return data
    raise ValueError(f"unknown reference {ref!r}")
