"""How every ``bitdet`` command writes files: nothing lost, nothing half-written.

One rule for all writing commands (``train``, ``export``, ``detect``, ``demo``,
``hw verilog``):

* an existing target is refused (:class:`OutputExists`, naming it and the option that
  allows it) unless the user passed ``--force``;
* every file is written atomically (:func:`atomic_path` / :func:`atomic_write`): into a
  temporary file beside the target, flushed and ``fsync``-ed, then renamed over the
  target, so a crash or Ctrl-C leaves either the old file or the new one, never a torn one;
* outputs derived from input names are made unique (:func:`unique_names`), so two inputs
  never write the same output file.

This module imports nothing heavy (no torch), so the CLI can use it before it decides
what else to import.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["OutputExists", "atomic_path", "atomic_write", "check_new_file", "check_new_folder",
           "same_file", "unique_names"]


class OutputExists(ValueError):
    """A writing command would replace or mix with existing output (one line, names it)."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:          # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write it in the ``with`` block.

    On a normal exit the temporary file is ``fsync``-ed and renamed over ``path`` (and the
    folder ``fsync``-ed); on an exception it is removed and ``path`` is left untouched. The
    parent folder must exist.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same existing file (links and ``..`` resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_new_file(path: str | os.PathLike, *, force: bool = False,
                   inputs: Sequence[str | os.PathLike] = (), option: str = "--force") -> Path:
    """Refuse to write ``path`` when it exists (unless ``force``) or is one of ``inputs``
    (always: a command must not replace the file it reads). Returns ``path``."""
    path = Path(path)
    for source in inputs:
        if same_file(path, source):
            raise OutputExists(f"{path}: is the input {source}; write the output to another "
                               "file")
    if path.is_dir():
        raise OutputExists(f"{path}: is a folder; give a file name")
    if path.exists() and not force:
        raise OutputExists(f"{path}: already exists (pass {option} to replace it)")
    return path


def check_new_folder(path: str | os.PathLike, *, force: bool = False,
                     option: str = "--force", what: str = "output") -> Path:
    """Refuse an output folder that exists and is not empty (unless ``force``): its files
    would mix with the new ones. A missing or empty folder is fine. Returns ``path``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExists(f"{path}: is a file, not a folder")
    if path.is_dir() and not force and any(path.iterdir()):
        raise OutputExists(f"{path}: the {what} folder already holds files (choose a new "
                           f"folder, or pass {option} to write into it)")
    return path


def unique_names(paths: Sequence[str | os.PathLike], suffix: str) -> list[str]:
    """One output file name per input path, ``<stem><suffix>``, made unique.

    Inputs whose stems collide (``d1/scene.png``, ``d2/scene.png``, ``d1/scene.jpg``) get
    their extension and, if still needed, their parent folders' names added
    (``scene.png<suffix>``, ``d2-scene.png<suffix>``), so no two inputs share an output.
    The same input path given twice gets ``-2``, ``-3``, … after its name.
    """
    paths = [Path(p) for p in paths]
    distinct = list(dict.fromkeys(p.resolve() for p in paths))    # first occurrence order
    stems: dict[str, int] = {}
    for r in distinct:
        stems[r.stem] = stems.get(r.stem, 0) + 1
    name = {r: r.stem if stems[r.stem] == 1 else r.name for r in distinct}
    for depth in range(1, 1 + max((len(r.parts) for r in distinct), default=1)):
        seen: dict[str, int] = {}
        for r in distinct:
            seen[name[r]] = seen.get(name[r], 0) + 1
        if all(c == 1 for c in seen.values()):
            break
        for r in distinct:               # same name in different folders: add the folders
            if seen[name[r]] > 1:
                name[r] = "-".join([*r.parent.parts[-depth:], r.name]).lstrip("/-")
    out, used = [], set()
    for p in paths:
        base, i = name[p.resolve()], 2
        candidate = base + suffix
        while candidate in used:         # the same input given twice
            candidate, i = f"{base}-{i}{suffix}", i + 1
        used.add(candidate)
        out.append(candidate)
    return out
