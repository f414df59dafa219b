"""The one on-disk cache: ``$PAGEDLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/pagedlm``, else
``~/.cache/pagedlm``.

One folder per kind of artifact (``kernels``, ``tokenizers``, ``compiled``, ...), one entry per
key inside it. What every kind shares lives here:

* keys: ``key(*parts)`` hashes plain values (str, int, float, bool, None, bytes, and lists /
  tuples / dicts of them) the same way in every process; ``file_key(path)`` is a model file's
  identity (resolved path, size, mtime_ns: a stat, not a read of the file);
* writes are atomic (``atomic_write``, ``atomic_dir``: built under a temporary name in the same
  folder, then ``os.replace``), so a reader sees a whole entry or none;
* ``locked(path)``: a per-entry ``fcntl`` lock, so two processes filling the same entry build
  it once (the second waits, then finds it);
* ``cached_entry(...)``: load an entry, or build it under its lock; an entry that fails to load
  (stale, corrupt, half-deleted) is rebuilt and reported in one warning, and a cache that cannot
  be written costs a warning, never a failure.

``pagedlm cache list`` / ``pagedlm cache clear [--kind K]`` show and empty it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_KIND = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
LOCK_SUFFIX = ".lock"
CLAIM_SUFFIX = ".building"  # held while a builder process makes the entry (``claim``)
TMP_PREFIX = ".tmp-"


def cache_root() -> Path:
    """The cache root (not created here). ``PAGEDLM_CACHE_DIR`` wins; ``XDG_CACHE_HOME`` counts
    only when absolute, as the XDG spec says."""
    explicit = os.environ.get("PAGEDLM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "pagedlm"


def _check_kind(kind: object) -> str:
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise ValueError(f"invalid cache kind {kind!r}: use lower-case letters, digits, '_', '-' or '.'")
    return kind


def cache_dir(kind: str) -> Path:
    """The folder of one kind of entry, created if missing."""
    d = cache_root() / _check_kind(kind)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _canon(part: Any) -> Any:
    """A JSON-able form of a key part, the same in every process (no reprs with addresses)."""
    if part is None or isinstance(part, (str, bool, int)):
        return part
    if isinstance(part, float):
        return repr(part)  # exact, and distinct from the int of the same value
    if isinstance(part, bytes):
        return {"bytes": part.hex()}
    if isinstance(part, (list, tuple)):
        return [_canon(p) for p in part]
    if isinstance(part, dict):
        if not all(isinstance(k, str) for k in part):
            raise TypeError(f"cache key dicts need str keys, got {sorted(map(repr, part))}")
        return {k: _canon(v) for k, v in sorted(part.items())}
    if isinstance(part, os.PathLike):
        return os.fspath(part)
    raise TypeError(f"cannot use a {type(part).__name__} in a cache key: {part!r}; pass plain values")


def key(*parts: Any, length: int = 16) -> str:
    """A hex sha256 prefix of ``parts`` (plain values, in order)."""
    if not 8 <= length <= 64:
        raise ValueError(f"key length must be 8..64 hex digits, got {length!r}")
    blob = json.dumps([_canon(p) for p in parts], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_key(path: str | os.PathLike) -> str:
    """A model file's (or directory's) identity: resolved path, size and mtime_ns, hashed. It
    changes when the file is replaced or rewritten; it costs a stat, not a read."""
    real = os.path.realpath(os.fspath(path))
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise FileNotFoundError(f"cannot key a file that does not exist: {os.fspath(path)!r}") from None
    return key("file", real, st.st_size, st.st_mtime_ns)


def entry_name(label: str, k: str) -> str:
    """``label-key`` with the label reduced to safe characters (a readable name in ``list``)."""
    safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("._") or "entry"
    return f"{safe[:80]}-{k}"


# ---- atomic writes and locks ------------------------------------------------------------------

def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name beside ``path``; renamed onto ``path`` if the block succeeds,
    removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _publish(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` onto ``path``. A folder cannot be renamed over a
    non-empty one, so an old entry is first moved aside (callers hold ``locked(path)``)."""
    if path.exists() or path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "old.", dir=path.parent))
        os.replace(path, old / "entry")
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path``; it becomes ``path`` if the block succeeds (replacing
    an old entry there; hold ``locked(path)``), and is removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent))
    try:
        yield tmp
        _publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (through ``path.lock`` beside it) for the block; other
    processes (and threads with their own ``locked``) wait. The lock file is left in place:
    removing it could let two processes lock different files of the same name."""
    lock = Path(os.fspath(path) + LOCK_SUFFIX)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def claim(path: str | os.PathLike) -> int | None:
    """Claim the making of ``path`` for as long as this process lives (or until ``os.close`` of
    the returned descriptor): a lock on ``path.building``, taken without waiting. None when
    another process holds the claim. The kernel drops the lock when its holder dies, so a
    claim never outlives a crashed builder."""
    lock = Path(os.fspath(path) + CLAIM_SUFFIX)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def claimed(path: str | os.PathLike) -> bool:
    """Whether a live process (this one included) holds the claim on making ``path``."""
    lock = Path(os.fspath(path) + CLAIM_SUFFIX)
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken just now
    return False


def cached_entry(kind: str, name: str, load: Callable[[Path], T], build: Callable[[Path], T],
                 what: str = "entry") -> T:
    """The entry ``kind/name``: ``load(path)`` if it is there and loads, else ``build(tmp)``,
    which returns the value and writes the entry's files into the folder ``tmp`` (renamed to
    ``path`` once complete). An entry that fails to load is rebuilt with one warning; a cache
    that cannot be written logs one warning and still returns the built value."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"invalid cache entry name {name!r}")
    try:
        path = cache_dir(kind) / name
    except OSError as e:
        log.warning("pagedlm cache %s is not usable (%s); building the %s without it", cache_root(), e, what)
        with tempfile.TemporaryDirectory() as tmp:
            return build(Path(tmp))
    problem: Exception | None = None
    if path.exists():
        try:
            return load(path)
        except Exception as e:  # noqa: BLE001 (whatever a bad entry raises, it is rebuilt)
            problem = e
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(path))
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=path.parent)))
        except OSError as e:  # a read-only or full cache: build without it
            log.warning("pagedlm cache %s is not writable (%s); building the %s without it", cache_root(), e, what)
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            return build(tmp)
        if path.exists():
            # Another process may have (re)built it while this one waited for the lock.
            try:
                value = load(path)
                if problem is not None:
                    log.warning("cache entry %s was unreadable (%s: %s); another process has rebuilt it",
                                path, type(problem).__name__, problem)
                return value
            except Exception as e:  # noqa: BLE001
                problem = e
        built = tmp / "entry"
        built.mkdir()
        value = build(built)
        try:
            _publish(built, path)
        except OSError as e:
            log.warning("could not write the %s to the pagedlm cache (%s: %s); it will be rebuilt next time",
                        what, type(e).__name__, e)
            return value
    if problem is not None:
        log.warning("cache entry %s was unreadable (%s: %s); rebuilt it", path, type(problem).__name__, problem)
    return value


# ---- listing and clearing --------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    path: Path
    size: int  # bytes, all files under it
    mtime: float

    @property
    def age_s(self) -> float:
        return max(0.0, time.time() - self.mtime)


def _size(p: Path) -> int:
    if p.is_symlink() or not p.is_dir():
        return p.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(p):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def entries(kind: str | None = None) -> list[Entry]:
    """Every entry under the root (or of one kind), skipping lock files and unfinished writes."""
    root = cache_root()
    if not root.is_dir():
        return []
    kinds = [_check_kind(kind)] if kind is not None else sorted(p.name for p in root.iterdir() if p.is_dir())
    out = []
    for k in kinds:
        d = root / k
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.name.endswith((LOCK_SUFFIX, CLAIM_SUFFIX)) or p.name.startswith(TMP_PREFIX):
                continue
            try:
                out.append(Entry(k, p.name, p, _size(p), p.lstat().st_mtime))
            except OSError:  # removed while listing
                continue
    return out


def clear(kind: str | None = None) -> tuple[int, int]:
    """Remove every entry (of one kind): (entries removed, bytes freed). Lock files stay only
    while a kind's folder does; an emptied kind folder is removed."""
    removed = freed = 0
    for e in entries(kind):
        freed += e.size
        if e.path.is_dir() and not e.path.is_symlink():
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                e.path.unlink()
        removed += 1
    root = cache_root()
    kinds = [kind] if kind is not None else ([p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else [])
    for k in kinds:
        d = root / k
        if d.is_dir():
            for p in d.iterdir():
                if p.name.endswith((LOCK_SUFFIX, CLAIM_SUFFIX)) or p.name.startswith(TMP_PREFIX):
                    # A lock held right now stays valid: flock is on the open file, not the name.
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            p.unlink()
            with contextlib.suppress(OSError):
                d.rmdir()
    return removed, freed


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _human_age(s: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= span:
            return f"{s / span:.1f}{unit}"
    return f"{s:.0f}s"


# ---- `pagedlm cache` --------------------------------------------------------------------------

def cmd_cache(args: argparse.Namespace) -> int:
    root = cache_root()
    if args.cache_command == "list":
        found = entries(args.kind)
        print(f"cache root: {root}")
        if not found:
            print("nothing cached" + (f" of kind {args.kind!r}" if args.kind else ""))
            return 0
        print(f"{'KIND':<12} {'SIZE':>10} {'AGE':>7}  NAME")
        for e in found:
            print(f"{e.kind:<12} {_human_size(e.size):>10} {_human_age(e.age_s):>7}  {e.name}")
        print(f"{len(found)} entries, {_human_size(sum(e.size for e in found))}")
        return 0
    if args.cache_command == "warm":
        return _warm(args)
    removed, freed = clear(args.kind)
    what = f" of kind {args.kind!r}" if args.kind else ""
    print(f"removed {removed} entries{what} ({_human_size(freed)}) from {root}")
    return 0


def _warm(args: argparse.Namespace) -> int:
    """Build (or find) the compiled decode steps of a model's batch buckets now, in the builder
    process, so that engines started later load them at once."""
    from pagedlm.engine.engine import EngineConfig, LLMEngine

    eng = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, quantization=args.quantization,
                                 max_num_seqs=args.max_num_seqs, block_size=args.block_size, enforce_eager=False,
                                 compile_mode="background", num_kv_blocks=8))
    compiled = eng.runner.compiled
    if compiled is None or compiled.aot is None:
        print("pagedlm cache warm: this engine does not use cached compiled steps (CUDA, LoRA or parallel)",
              file=sys.stderr)
        return 2
    buckets = compiled.sizes if args.buckets is None else args.buckets
    bad = [b for b in buckets if b not in compiled.sizes]
    if bad:
        print(f"pagedlm cache warm: no decode bucket {bad[0]} with --max-num-seqs {args.max_num_seqs}; "
              f"buckets: {compiled.sizes}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if compiled.kernels_pending:  # a machine's first run: the buckets are keyed with the kernels
        print("waiting for pagedlm's CPU kernels to build (once per machine) ...", file=sys.stderr)
        eng.runner.wait_for_kernels()
    compiled.request(list(buckets))
    compiled.wait(list(buckets))
    for b in buckets:
        state = compiled.states()[b]
        why = f" ({compiled.aot_failed[b]})" if b in compiled.aot_failed else ""
        print(f"bucket {b:>4}: {state}{why}  {compiled.entry(b).name}")
    print(f"done in {time.perf_counter() - t0:.1f} s; cache: {cache_dir('compiled')}")
    return 0 if all(b not in compiled.aot_failed for b in buckets) else 1


def _buckets_arg(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--buckets takes sizes like 1,2,4; got {text!r}") from None
    if not out or any(b < 1 for b in out):
        raise argparse.ArgumentTypeError(f"--buckets takes positive sizes like 1,2,4; got {text!r}")
    return out


def _kind_arg(text: str) -> str:
    try:
        return _check_kind(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="list or clear pagedlm's on-disk cache (tokenizers, kernels, compiled steps)",
                       description=f"pagedlm's cache root is $PAGEDLM_CACHE_DIR, else $XDG_CACHE_HOME/pagedlm, else "
                                   f"~/.cache/pagedlm (now: {cache_root()}).")
    csub = p.add_subparsers(dest="cache_command", metavar="ACTION")
    csub.required = True
    lp = csub.add_parser("list", help="each entry: kind, size, age, name")
    lp.add_argument("--kind", type=_kind_arg, default=None, help="only this kind (e.g. tokenizers, kernels)")
    wp = csub.add_parser("warm", help="build a model's compiled decode steps now (later engines load them at once)")
    wp.add_argument("--model", default=None, help="HF directory or .gguf file (default: the default model)")
    wp.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    wp.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"])
    wp.add_argument("--max-num-seqs", type=int, default=64, help="largest batch bucket (default: 64)")
    wp.add_argument("--block-size", type=int, default=16, help="KV block size the engines use (default: 16)")
    wp.add_argument("--buckets", type=_buckets_arg, default=None, help="only these buckets, e.g. 1,2,4")
    cp = csub.add_parser("clear", help="remove cached entries")
    cp.add_argument("--kind", type=_kind_arg, default=None, help="only this kind (default: everything)")
    p.set_defaults(func=cmd_cache)


# Runs a module (argv[1]) as __main__ at idle priority from its first instruction: its imports
# (torch, ~2 s of CPU) then do not compete with the engine either. The engine stops a builder's
# process group while a step runs (SIGSTOP, then SIGCONT: CompiledDecode.builders_paused); should
# the engine die in between, the kernel sends this process SIGCONT (PR_SET_PDEATHSIG), which it
# passes on to its group (its compilers), at most once a second (it receives its own too).
IDLE_LAUNCH = ("import os, runpy, signal, sys, time\n"
               "try:\n    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
               "except (AttributeError, OSError):\n    pass\n"
               "_last = [0.0]\n"
               "def _cont(*_):\n"
               "    if time.monotonic() - _last[0] > 1.0:\n"
               "        _last[0] = time.monotonic()\n"
               "        os.killpg(0, signal.SIGCONT)\n"
               "try:\n"
               "    import ctypes\n"
               "    signal.signal(signal.SIGCONT, _cont)\n"
               "    ctypes.CDLL(None).prctl(1, int(signal.SIGCONT))\n"
               "except (AttributeError, OSError, ValueError):\n    pass\n"
               "sys.argv = sys.argv[1:]\nrunpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")
