"""Small file helpers shared by the runtime, export and checkpoints: atomic writes, JSON objects with clear errors,
and image-file listing (torch-free: ``segadapt predict`` and the demo use these without the ``adapt`` extra)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Iterator, List, Optional

#: Image file suffixes the runtime reads (OpenCV decodes them all).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: Video file suffixes ``segadapt predict`` treats as video (decoded by OpenCV's FFmpeg backend).
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def read_json_object(path: str | Path, what: str) -> dict:
    """Read a JSON file that must hold an object.

    Args:
        path: the file.
        what: what the file is, for messages (e.g. "model metadata").

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or not a JSON object (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: {what} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: {what} must be a JSON object")
    return d


def list_images(source: str | Path) -> List[Path]:
    """The image files to segment for ``source``: the file itself, or the sorted images of a folder (of its
    ``images/`` sub-folder when it has one, as a dataset split does).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: the folder holds no image file (the message names it and the suffixes looked for).
    """
    p = Path(source)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such image or folder")
    d = p / "images" if (p / "images").is_dir() else p
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{d}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


# ---------------------------------------------------------------------------------------------------------------
# Writers that lose nothing: every artefact is written under a temporary name in its own folder and
# renamed into place; a failed write removes the temporary files, keeps the previous complete artefact and raises
# one line naming the path and the space needed.

#: errnos reported as "the disk is full" (ENOSPC, EDQUOT, EFBIG) or "the device failed" (EIO)
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_WRITE_ERRNOS = _SPACE_ERRNOS + (errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM)
#: a write that fails for an unnamed reason while less than this is free is reported as a full disk
_NEARLY_FULL = 1 << 20
#: name of the completeness marker of a folder written by :func:`atomic_dir` (written last)
MANIFEST = "manifest.json"
_CHUNK = 1 << 22
_state = threading.local()


class ArtefactWriteError(OSError):
    """Writing an artefact failed (full disk, I/O error, read-only or forbidden folder). The message is one line
    naming the path, the cause and the space needed; ``errno`` is the cause's. Temporary files are already removed
    and the previous complete artefact, if any, is unchanged."""


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, one decimal)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def free_bytes(path: str | Path) -> Optional[int]:
    """Bytes available to this user on the file system holding ``path`` (its nearest existing parent), or None."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _record(e: OSError) -> None:
    _state.last = e


def _cause(exc: BaseException) -> Optional[OSError]:
    """The OSError behind ``exc``: itself, one in its cause/context chain, or the last one a low-level write of this
    thread recorded (libraries such as torch.save wrap the OSError of a failed write in their own error)."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return getattr(_state, "last", None)


def write_error(path: str | Path, exc: BaseException, needed: Optional[int] = None,
                what: str = "") -> Optional[ArtefactWriteError]:
    """The one-line :class:`ArtefactWriteError` for a failed write of ``path``, or None when ``exc`` is not a
    full disk, an I/O error or a permission problem (the caller re-raises it as it is).

    Args:
        path: the artefact (final name, not the temporary one).
        exc: what the write raised.
        needed: bytes the whole artefact needs (an estimate), if known.
        what: what the artefact is, for the message ("checkpoint", "video").
    """
    if isinstance(exc, ArtefactWriteError):
        return exc
    cause = _cause(exc)
    _state.last = None  # used once: a later, unrelated failure must not be blamed on this write
    free = free_bytes(Path(path).parent)
    code = cause.errno if cause is not None else None
    if code not in _WRITE_ERRNOS:
        if cause is None and free is not None and free < _NEARLY_FULL and not isinstance(exc, KeyboardInterrupt):
            code = errno.ENOSPC  # a library that hides its errno (OpenCV, safetensors) on a full disk
        else:
            return None
    name = f"{what} {path}" if what else str(path)
    need = f"needs about {human_bytes(needed)}" if needed else "needs more space"
    have = f", {human_bytes(free)} free" if free is not None else ""
    kept = "nothing was replaced" if Path(path).exists() else "nothing was written"
    if code in _SPACE_ERRNOS:
        msg = f"{name}: no space left on the device ({need}{have}); {kept}, temporary files removed"
    elif code == errno.EIO:
        msg = f"{name}: input/output error while writing ({need}{have}); {kept}, temporary files removed"
    else:
        msg = f"{name}: cannot write there ({os.strerror(code)}; {need}); {kept}"
    err = ArtefactWriteError(msg)
    err.errno = code
    err.__cause__ = cause if cause is not None else exc
    return err


def check_space(path: str | Path, needed: int, what: str = "") -> None:
    """Refuse before writing ``path`` (a file or folder, existing or not) when its file system has less than
    ``needed`` bytes free.

    Raises:
        ArtefactWriteError: (ENOSPC) naming the path, the bytes needed and the bytes free.
    """
    free = free_bytes(path)
    if free is not None and needed > free:
        name = f"{what} {path}" if what else str(path)
        err = ArtefactWriteError(f"{name}: not enough space on the device (needs about {human_bytes(needed)}, "
                                 f"{human_bytes(free)} free); nothing was written or replaced")
        err.errno = errno.ENOSPC
        raise err


def _write_chunk(fd: int, data: memoryview) -> int:
    """One low-level write (``os.write``); the single place where file bytes of our writers reach the OS."""
    return os.write(fd, data)


def write_bytes(fd: int, data: bytes | bytearray | memoryview) -> int:
    """Write all of ``data`` to the open file descriptor ``fd``; returns the bytes written.

    Raises:
        OSError: the write failed (recorded for :func:`write_error`, which turns it into one line).
    """
    view, done = memoryview(data).cast("B"), 0
    try:
        while done < len(view):
            done += _write_chunk(fd, view[done:done + _CHUNK])
    except OSError as e:
        _record(e)
        raise
    return done


class TrackedFile(io.RawIOBase):
    """A write-only binary file whose writes go through :func:`write_bytes` (so that a full disk is seen and
    counted even when a library, e.g. ``torch.save``, wraps the OSError in its own error).

    ``written``: bytes written so far."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = write_bytes(self.fd, b)
        self.written += n
        return n

    def close(self) -> None:
        if self.closed:
            return
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            super().close()


def write_file(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (a new file, e.g. inside :func:`atomic_dir`'s temporary folder) and fsync it."""
    with TrackedFile(path) as f:
        f.write(data)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _swap_hook(stage: str, path: Path) -> None:
    """Called between the steps of :func:`atomic_dir`'s swap of ``path`` (``"prev"``: the old folder is now
    ``<path>.prev``, the new one not yet renamed in; ``"renamed"``: the new one is in, ``<path>.prev`` not yet
    removed). Does nothing; tests replace it to kill the process right there."""


def temp_path(path: str | Path) -> Path:
    """The temporary name a writer of ``path`` writes to before renaming: hidden, in the same folder, unique to
    this process and thread, with the real suffix last (libraries that pick a format from it, OpenCV, PyAV, onnx,
    still work): ``out/clip.mp4`` -> ``out/.clip.tmp-<pid>-<thread>.mp4``."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{threading.get_ident() % 100000}{path.suffix}")


@contextlib.contextmanager
def atomic_output(path: str | Path, needed: Optional[int] = None, what: str = "") -> Iterator[Path]:
    """Write a file under a temporary name in its own folder and rename it to ``path`` when the block succeeds.

    ``with atomic_output("out/clip.mp4") as tmp: writer(tmp)`` - the writer writes ``tmp`` (same folder, same
    suffix); on success it is fsynced and renamed over ``path``. On any failure the temporary file is removed and
    ``path`` is left as it was.

    Args:
        path: the final file.
        needed: bytes the file will need, if known: refused up front when the disk has less free.
        what: what the file is, for messages.

    Raises:
        ArtefactWriteError: full disk, I/O error or permission problem (one line: path, bytes needed).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (write_error(path, e, needed, what) or e) from None
    if needed:
        check_space(path, needed, what)
    tmp = temp_path(path)
    _state.last = None
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{path}: the writer wrote nothing")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        size = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        err = write_error(path, e, max(needed or 0, size) or None, what)
        if err is not None:
            raise err from None
        raise


def write_atomic(path: str | Path, data: bytes, what: str = "") -> None:
    """Write bytes to ``path`` atomically: a temporary file in the same directory, fsync, then rename.

    Raises:
        ArtefactWriteError: not enough space (checked before writing), a full disk, an I/O error or a read-only
            folder; one line naming the path and the bytes needed. The previous ``path`` is then unchanged and no
            temporary file is left.
    """
    with atomic_output(path, needed=len(data), what=what) as tmp:
        write_file(tmp, data)


def write_json(path: str | Path, obj, what: str = "") -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (:func:`write_atomic`), creating its folder.

    Args:
        path: the final file; a previous file there stays whole until the new one is complete.
        obj: anything ``json.dumps`` encodes (dicts, lists, strings, numbers, booleans, None).
        what: what the file is, for error messages (e.g. "report").

    Raises:
        TypeError: ``obj`` holds something JSON cannot encode (nothing is written).
        ArtefactWriteError: as :func:`write_atomic`.
    """
    write_atomic(path, json.dumps(obj, indent=1).encode(), what=what)


def _file_digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(d: Path) -> None:
    """Write ``<d>/manifest.json``: size and SHA-256 of every other file of the folder (recursively); written
    last, it marks the folder complete (:func:`is_complete`)."""
    files = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(d).as_posix()] = {"bytes": p.stat().st_size, "sha256": _file_digest(p)}
    write_file(d / MANIFEST, json.dumps({"files": files}, indent=1).encode())


def manifest_problem(d: str | Path, verify_hashes: bool = False, legacy_ok: bool = False) -> Optional[str]:
    """Why folder ``d`` is not completely written, in one phrase naming the file, or None when it is: its manifest
    reads and every file it lists has the recorded size (and SHA-256 with ``verify_hashes``). ``legacy_ok``: a
    folder without a manifest (written before manifests existed, under its final name) counts as complete."""
    d = Path(d)
    if not d.is_dir():
        return f"{d} does not exist"
    m = d / MANIFEST
    if not m.is_file():
        return None if legacy_ok else f"{m} is missing (the folder was not completely written)"
    try:
        files = json.loads(m.read_text())["files"]
        items = list(files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{m} is corrupt ({type(e).__name__})"
    for rel, rec in items:
        p = d / rel
        try:
            if not p.is_file():
                return f"{p} is missing ({m} lists it)"
            if p.stat().st_size != rec["bytes"]:
                return f"{p} has {p.stat().st_size} bytes, {m} says {rec['bytes']}"
            if verify_hashes and _file_digest(p) != rec["sha256"]:
                return f"{p} does not match its SHA-256 in {m}"
        except (OSError, KeyError, TypeError) as e:
            return f"{m} is corrupt ({type(e).__name__} at {rel!r})"
    return None


def is_complete(d: str | Path, verify_hashes: bool = False, legacy_ok: bool = False) -> bool:
    """Whether folder ``d`` was completely written (:func:`manifest_problem` finds nothing)."""
    return manifest_problem(d, verify_hashes, legacy_ok) is None


def sibling(path: str | Path, tag: str) -> Path:
    """``<path>.<tag>`` beside ``path`` (``last`` -> ``last.tmp``, ``last.prev``)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{tag}")


def newest_complete(path: str | Path, verify_hashes: bool = True) -> Optional[Path]:
    """The newest complete version of a folder written by :func:`atomic_dir`: ``path`` itself, else
    ``<path>.prev`` (kept while a swap was interrupted), else None. A folder without a manifest under the final
    name counts as complete (written by an older version)."""
    path = Path(path)
    if is_complete(path, verify_hashes, legacy_ok=True):
        return path
    prev = sibling(path, "prev")
    if is_complete(prev, verify_hashes):
        return prev
    return None


def _folder_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.is_dir() else 0


@contextlib.contextmanager
def atomic_dir(path: str | Path, needed: Optional[int] = None, what: str = "") -> Iterator[Path]:
    """Write a folder as a whole: ``with atomic_dir("run/last") as d: write files into d``.

    The files go to ``<path>.tmp/``; when the block succeeds the manifest (sizes, SHA-256) is written last and the
    folders are swapped so that a complete version exists at every moment: the current ``<path>`` becomes
    ``<path>.prev``, ``<path>.tmp`` becomes ``<path>``, then ``<path>.prev`` is removed. After a crash,
    :func:`newest_complete` finds ``<path>`` or, inside the swap, ``<path>.prev``. On failure ``<path>.tmp`` is
    removed and ``<path>`` is untouched.

    Args:
        path: the final folder.
        needed: bytes the folder will need, if known: refused up front when the disk has less free.
        what: what the folder is, for messages ("checkpoint").

    Raises:
        ArtefactWriteError: full disk, I/O error or permission problem (one line: path, bytes needed).
    """
    path = Path(path)
    tmp, prev = sibling(path, "tmp"), sibling(path, "prev")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash: never complete under this name
        if needed:
            check_space(path, needed, what)
        tmp.mkdir()
    except OSError as e:
        raise (write_error(path, e, needed, what) or e) from None
    _state.last = None
    try:
        yield tmp
        write_manifest(tmp)
        _fsync_dir(tmp)
    except BaseException as e:
        size = _folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        err = write_error(path, e, max(needed or 0, size) or None, what)
        if err is not None:
            raise err from None
        raise
    _swap_in(path, tmp, prev)


def _swap_in(path: Path, tmp: Path, prev: Path) -> None:
    """``path`` -> ``prev``, ``tmp`` -> ``path``, remove ``prev``: a complete folder exists at every moment."""
    if path.exists():
        if prev.exists() and is_complete(path, legacy_ok=True):
            shutil.rmtree(prev)  # older than path, which is complete
        if prev.exists():  # path is a broken leftover, prev the last complete one: keep prev
            shutil.rmtree(path)
        else:
            os.rename(path, prev)
        _fsync_dir(path.parent)
        _swap_hook("prev", path)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    _swap_hook("renamed", path)
    if prev.exists():
        shutil.rmtree(prev, ignore_errors=True)
