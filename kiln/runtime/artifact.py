"""kiln artifacts: a directory with ``manifest.json``, ``weights.safetensors`` and backend files.

The manifest records the format version, the versions of kiln/torch/TVM that
wrote it, the target, the signature, the schedule of partitions, and the size
and sha256 of every other file; ``manifest_sha256`` covers the manifest itself,
and an optional ed25519 ``manifest_signature`` says who wrote it
(:mod:`.signing`). ``read_artifact`` checks all of that, and the whole
manifest (:mod:`.manifest`), before anything is loaded, and raises
:class:`~kiln.errors.ArtifactError` naming the file, field and problem. It reads
each file once, from one open directory, refusing links and wrong sizes before
reading; what runs afterwards is the bytes it verified, never the path again.

``write_artifact`` writes into a temporary sibling directory and renames it
into place, holding a lock beside the target, so a failure never leaves a
half-written artifact, concurrent saves take turns (the last one wins) and a
save killed half-way is repaired by the next save or load of that path. It
replaces only an earlier kiln artifact. Nothing is pickled.
See ``docs/artifact-format.md``, "Trust model".
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors import SafetensorError
from safetensors.torch import save as save_safetensors

from ..errors import ArtifactError
from .manifest import check_consistency, check_structure
from .signing import FIELD as SIGNATURE_FIELD
from .signing import PublicKey, SigningKey, canonical_json, sign_manifest, verify_manifest

log = logging.getLogger("kiln")

FORMAT_NAME = "kiln-artifact"
FORMAT_VERSION = 3  # 3: every dtype by kiln's name (f32, bf16, i64); 2 (torch names in tvm-vm specs) and 1 are refused
# What changed after each version this runtime refuses: said in the refusal.
_SUPERSEDED = {1: "version 1 stored one flat schedule of partitions",
               2: "version 2 named the dtypes of TVM kernel specs the torch way (float32), not kiln's (f32)"}
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
EXAMPLES = "example_inputs.safetensors"
MAX_JSON_BYTES = 256 << 20  # a manifest or index larger than this is refused unread
REBUILD = ("rebuild it with this kiln: `kiln compile FILE.py:FACTORY -o DIR`, kiln.compile(model, inputs).save(DIR), "
           "or for an LLM kiln.llm.compile_llm(model).save(DIR)")
DEFAULT_QUEUE = "cpu0"
_LOCK_FREE_READS = 3  # reads retried when a save replaced the directory meanwhile, before locking


@dataclass
class Artifact:
    """An artifact in memory: the manifest, the weights, and the other files' bytes."""

    manifest: dict
    weights: dict[str, torch.Tensor]
    files: dict[str, bytes] = field(default_factory=dict)
    example_inputs: list[torch.Tensor] | None = None
    path: Path | None = None  # where it was read from or last written to

    def __post_init__(self):
        if not isinstance(self.manifest, Manifest):
            self.manifest = Manifest(self.manifest)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(manifest: dict) -> bytes:
    """What ``manifest_sha256`` covers: everything else, the signature included."""
    return canonical_json(manifest, ("manifest_sha256",))


def _weights_bytes(weights: dict[str, torch.Tensor]) -> tuple[bytes, dict[str, str]]:
    """safetensors bytes with every storage once; tied weights become aliases."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in weights.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t.detach().contiguous().clone() if _shares_storage(t, weights) else t.detach().contiguous()
    return save_safetensors(unique), aliases


def _shares_storage(t: torch.Tensor, weights: dict[str, torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for w in weights.values() if w.numel() and w.untyped_storage().data_ptr() == ptr) > 1


def plain_name(name: str) -> bool:
    """Whether ``name`` names an entry of a directory itself: no separators, not ``.`` or ``..``."""
    return Path(name).name == name and name not in (".", "..")


# What a directory of some kind owns: the names its own index lists (None: it is not one).
Entries = Callable[[Path], "set[str] | None"]


def artifact_entries(path: Path) -> set[str] | None:
    """The names a kiln artifact at ``path`` owns, its manifest and the files it lists; None if it is not one."""
    try:
        manifest = read_json_document(path / MANIFEST, FORMAT_NAME, "a kiln artifact")
    except ArtifactError:
        return None
    files = manifest.get("files")
    return {MANIFEST, *files} if isinstance(files, dict) else None


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, entries: Entries, what: str) -> Iterator[Path]:
    """Build a directory in a temporary sibling that replaces ``path`` only if the block succeeds.

    ``path`` may be missing, empty, or an earlier directory of the same kind
    holding nothing but the names its own index lists (``entries``); anything
    else is refused and left untouched. The whole save holds ``.NAME.lock``
    beside ``path``, so two saves of one path take turns and the last one
    wins; every ``.NAME.tmp-*`` / ``.NAME.old-*`` sibling the lock's holder
    finds therefore belongs to a save that was killed, and is cleaned up (an
    ``.old-*`` copy is put back first when ``path`` itself is missing).
    On failure the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        _recover(path, entries)
        _check_replaceable(path, entries, what)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; this is an ordinary directory
        try:
            yield tmp
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.rename(path, old / "a")
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old / "a", path)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _check_replaceable(path: Path, entries: Entries, what: str) -> None:
    if path.is_symlink():
        raise ArtifactError(f"refusing to overwrite {path}: it is a symbolic link")
    if not path.exists():
        return
    if not path.is_dir():
        raise ArtifactError(f"refusing to overwrite {path}: it exists and is not {what}")
    present = set(os.listdir(path))
    if not present:
        return
    owned = entries(path)
    if owned is None:
        raise ArtifactError(f"refusing to overwrite {path}: it exists and is not {what}")
    if foreign := sorted(present - owned):
        raise ArtifactError(f"refusing to overwrite {path}: it is {what}, but it also holds files it does not "
                            f"list ({', '.join(foreign[:5])}); move them away first")


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold ``.NAME.lock`` beside ``path`` with ``flock`` (yields False if busy and not ``wait``).

    The holder unlinks the lock file when done, so no lock files are left behind.
    """
    lock = _lock_path(path)
    fd = _acquire(lock, wait)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _acquire(lock: Path, wait: bool) -> int | None:
    """An fd holding ``lock`` exclusively, or None if it is busy and not ``wait``.

    A process that locked a file its holder has unlinked meanwhile sees that
    the name now points elsewhere (or nowhere) and locks again.
    """
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            mine, current = os.fstat(fd), os.stat(lock)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
        except BlockingIOError:
            os.close(fd)
            return None
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _stale_siblings(path: Path) -> list[tuple[str, Path]]:
    """``(kind, dir)`` for the ``.NAME.tmp-*`` and ``.NAME.old-*`` directories beside ``path``."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-[a-z0-9_]+")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [(m.group(1), path.parent / name) for name in names if (m := pattern.fullmatch(name))]


def _recover(path: Path, entries: Entries) -> None:
    """Under the lock: put back a replaced directory a killed save left in ``.old-*``, and delete its leftovers."""
    stale = _stale_siblings(path)
    if not os.path.lexists(path):
        olds = sorted((d for kind, d in stale if kind == "old"), key=lambda d: d.stat().st_mtime, reverse=True)
        for old in olds:
            kept = old / "a"
            owned = entries(kept) if kept.is_dir() else None
            if owned is not None and owned <= set(os.listdir(kept)):  # whole: every file its index lists
                os.rename(kept, path)
                log.warning("kiln: restored %s from %s, left by a save that was interrupted", path, old.name)
                break
    for _, d in stale:
        shutil.rmtree(d, ignore_errors=True)


def tidy(path: Path, entries: Entries, wait: bool) -> None:
    """Repair what a killed save of ``path`` left, if anything, and if the lock can be had (best effort).

    Loads call this: with ``wait`` when ``path`` is missing (a save may be
    replacing it right now), without it otherwise. A lock file left by a
    killed save is removed too (by taking the lock and releasing it).
    """
    if not _stale_siblings(path) and not os.path.lexists(_lock_path(path)):
        return
    try:
        with _locked(path, wait) as held:
            if held:
                _recover(path, entries)
    except OSError as e:  # a read-only directory: nothing to repair from here
        log.debug("kiln: cannot tidy %s: %s", path, e)


def write_artifact(artifact: Artifact, path: str | os.PathLike, signing_key: SigningKey | None = None) -> Path:
    """Write ``artifact`` to the directory ``path``, signed with ``signing_key`` (ed25519) if given."""
    path = Path(path)
    with atomic_directory(path, artifact_entries, "a kiln artifact") as tmp:
        weights_blob, aliases = _weights_bytes(artifact.weights)
        blobs = {WEIGHTS: weights_blob, **artifact.files}
        if artifact.example_inputs is not None:
            blobs[EXAMPLES] = save_safetensors({f"input{i}": t.contiguous() for i, t in enumerate(artifact.example_inputs)})
        manifest = {k: v for k, v in artifact.manifest.items() if k not in ("manifest_sha256", SIGNATURE_FIELD)}
        manifest["weight_aliases"] = aliases
        manifest["files"] = {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in sorted(blobs.items())}
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)
        if signing_key is not None:
            manifest[SIGNATURE_FIELD] = sign_manifest(manifest, signing_key)
        manifest["manifest_sha256"] = _sha256(_canonical(manifest))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    artifact.manifest = Manifest(manifest)
    artifact.path = path
    return path


def _read_file(path: Path, dir_fd: int | None = None, size: int | None = None, limit: int | None = None,
               missing: str | None = None) -> bytes:
    """The bytes of the regular file ``path`` (its name, relative to ``dir_fd`` if given).

    Links are refused (a file of an artifact is in its directory), and the
    size is checked on the open file before anything is read: ``size`` the
    exact size expected, ``limit`` the most accepted.
    """
    try:
        fd = os.open(path.name if dir_fd is not None else path,
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise ArtifactError(missing or f"{path} is missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ArtifactError(f"{path} is a symbolic link; an artifact's files must be regular files inside "
                                "it (a link can point anywhere)") from None
        raise ArtifactError(f"cannot open {path}: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactError(f"{path} is not a regular file")
        if size is not None and info.st_size != size:
            raise ArtifactError(f"{path} is truncated or padded: the manifest says {size} bytes, "
                                f"the file has {info.st_size}")
        if limit is not None and info.st_size > limit:
            raise ArtifactError(f"{path} is {info.st_size} bytes, more than the {limit} a kiln document may have")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(info.st_size)
    finally:
        os.close(fd)
    if len(data) != info.st_size:
        raise ArtifactError(f"{path} changed size while it was read")
    return data


def read_json_document(path: Path, format_name: str, what: str, dir_fd: int | None = None) -> dict:
    """A kiln JSON file (a manifest, an index) whose field ``format`` is ``format_name``.

    Versions are checked by the caller, which knows what each one means.
    """
    raw = _read_file(path, dir_fd, limit=MAX_JSON_BYTES,
                     missing=f"{path.parent} is missing {path.name}: not {what}, or an incomplete copy")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON (truncated or corrupted): {e}") from None
    except RecursionError:
        raise ArtifactError(f"{path} nests JSON too deeply to be {what}") from None
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise ArtifactError(f"{path} is not {what} (field 'format' is not {format_name!r})")
    return data


def read_artifact(path: str | os.PathLike, trusted_keys: Iterable[PublicKey] | None = None) -> Artifact:
    """Read and verify the artifact at ``path``; with ``trusted_keys``, it must be signed by one of them.

    Reads take no lock. One that fails while another process's save replaces
    the directory (its identity changed meanwhile) is retried, and if saves
    keep replacing it, read under the save lock, so a load never reports a
    half-replaced artifact as damaged.
    """
    path = Path(path)
    if isinstance(trusted_keys, (bytes, str)) or hasattr(trusted_keys, "public_bytes"):
        raise ArtifactError("trusted_keys is a list of public keys; got a single key (pass [key])")
    trusted_keys = None if trusted_keys is None else list(trusted_keys)
    for _ in range(_LOCK_FREE_READS):
        if not path.is_dir():
            tidy(path, artifact_entries, wait=True)  # a save may be replacing it, or one was killed half-way
        before = _identity(path)
        try:
            artifact = _read_verified(path, trusted_keys)
        except ArtifactError:
            if _identity(path) == before:
                raise
            continue
        tidy(path, artifact_entries, wait=False)
        return artifact
    try:
        with _locked(path):
            return _read_verified(path, trusted_keys)
    except OSError as e:
        raise ArtifactError(f"{path} kept changing while it was read (a save is replacing it), and it cannot "
                            f"be locked to read it whole: {e}") from None


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Which directory ``path`` is now: renaming one into place changes this (its ctime, if an inode is reused)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_ctime_ns


def _read_verified(path: Path, trusted_keys: list | None) -> Artifact:
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        raise ArtifactError(f"no kiln artifact at {path}: not a directory") from None
    try:
        manifest, blobs = _read_manifest_and_files(path, dir_fd, trusted_keys)
    finally:
        os.close(dir_fd)
    mpath = str(path / MANIFEST)
    if WEIGHTS not in blobs:
        raise ArtifactError(f"{mpath} lists no {WEIGHTS}")
    weights = _load_tensors(blobs.pop(WEIGHTS), path / WEIGHTS)
    for alias, name in manifest.get("weight_aliases", {}).items():
        if name not in weights or alias in weights:
            raise ArtifactError(f"{mpath}: field weight_aliases[{alias!r}] names {name!r}, which is "
                                + ("not in weights.safetensors" if name not in weights else
                                   "an alias of a weight stored under its own name"))
        weights[alias] = weights[name]
    examples = None
    if EXAMPLES in blobs:
        loaded = _load_tensors(blobs.pop(EXAMPLES), path / EXAMPLES)
        if set(loaded) != {f"input{i}" for i in range(len(loaded))}:
            raise ArtifactError(f"{path / EXAMPLES} must hold tensors input0, input1, ...; it has {sorted(loaded)[:5]}")
        examples = [loaded[f"input{i}"] for i in range(len(loaded))]
    check_consistency(manifest, weights, mpath)
    return Artifact(manifest, weights, blobs, examples, path)


def _read_manifest_and_files(path: Path, dir_fd: int, trusted_keys: list | None) -> tuple[dict, dict[str, bytes]]:
    mpath = path / MANIFEST
    manifest = read_json_document(mpath, FORMAT_NAME, "a kiln artifact", dir_fd)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        superseded = _SUPERSEDED.get(version) if type(version) is int else None
        raise ArtifactError(
            f"{mpath}: artifact format version {version!r} is not supported by this runtime "
            f"(it reads version {FORMAT_VERSION}; the artifact was written by kiln {manifest.get('kiln_version')!r}); "
            + (f"{superseded}; " if superseded else "") + REBUILD)
    if manifest.get("manifest_sha256") != _sha256(_canonical(manifest)):
        raise ArtifactError(f"{mpath} was modified after it was written (its checksum 'manifest_sha256' does not match)")
    if trusted_keys is not None:  # before any other file is even read
        verify_manifest(manifest, trusted_keys, str(mpath))
    check_structure(manifest, str(mpath))
    blobs: dict[str, bytes] = {}
    for name, entry in manifest["files"].items():
        if not plain_name(name):
            raise ArtifactError(f"{mpath}: file name {name!r} is not a plain file name")
        data = _read_file(path / name, dir_fd, size=entry["bytes"],
                          missing=f"{path} is missing {name}, listed in its manifest")
        if _sha256(data) != entry["sha256"]:
            raise ArtifactError(f"{path / name} does not match its sha256 in the manifest (tampered with or corrupted)")
        blobs[name] = data
    return manifest, blobs


def _load_tensors(data: bytes, where: Path) -> dict[str, torch.Tensor]:
    try:
        return dict(load_safetensors(data))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{where} is not a valid safetensors file: {e}") from None


# ---- building manifests: every v2 manifest is put together here --------------------------------------------------

def program_entry(signature: dict, tasks: list[dict], outputs: list[dict], **fields) -> dict:
    """A program of a manifest from a schedule of tasks (today's partitions, in a valid order).

    A task without ``queue`` runs on ``cpu0``; one without ``after`` waits for
    the tasks that compute its inputs. Fields given as None are left out.
    """
    producer: dict[str, str] = {}
    placed = []
    for task in tasks:
        task = dict(task)
        task.setdefault("queue", DEFAULT_QUEUE)
        if "after" not in task:
            task["after"] = list(dict.fromkeys(producer[n] for n in task["inputs"] if n in producer))
        producer.update(dict.fromkeys(task["outputs"], task["name"]))
        placed.append(task)
    return {"signature": signature, "tasks": placed, "outputs": outputs,
            **{k: v for k, v in fields.items() if v is not None}}


def new_manifest(programs: dict[str, dict], *, target: str, model: str | None, default_program: str | None = None,
                 **fields) -> dict:
    """A format-2 manifest over ``programs`` (name -> :func:`program_entry`); queues from the tasks' queue names."""
    from .. import __version__

    names = sorted({t["queue"] for p in programs.values() for t in p["tasks"]} or {DEFAULT_QUEUE})
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kiln_version": __version__,
            "target": target, "model": model, "programs": programs,
            "default_program": default_program or next(iter(programs)),
            "queues": {q: {"device": queue_device(q)} for q in names}, **fields}


def queue_device(queue: str) -> str:
    """The device a queue runs on: its name without the index (``cpu0`` -> ``cpu``)."""
    return queue.rstrip("0123456789")


def place_on_queues(manifest: dict, queues: dict[str, str], program: str | None = None) -> None:
    """Put the tasks named in ``queues`` (task -> queue) of ``program`` on those queues, declaring new ones.

    Placement proper chooses queues at compile time; this sets them on a
    built manifest (tests put a graph on two queues with it; ``cpu*`` and
    the emulated ``npu*`` queues run today). Rebuild the CompiledModel afterwards.
    """
    tasks = {t["name"]: t for t in manifest["programs"][program or manifest["default_program"]]["tasks"]}
    if unknown := sorted(set(queues) - set(tasks)):
        raise ArtifactError(f"no tasks {unknown} in program {program or manifest['default_program']!r}")
    for task, queue in queues.items():
        tasks[task]["queue"] = queue
        manifest["queues"].setdefault(queue, {"device": queue_device(queue)})


def declare_control(program: dict, name: str, default, *, min: int | None = None, max: int | None = None,
                    values: list | None = None, dtype: str = "i64") -> None:
    """Turn the program input ``name`` (a top-level positional argument) into a run-time control.

    The caller no longer passes it; the runtime feeds it as a 0-d integer
    tensor from the control's current value (an enum: the value's index in
    ``values``), which the caller or a policy sets between calls.
    """
    from torch.utils import _pytree as pytree

    from ..ir.signature import _load_treespec

    sig = program["signature"]
    names = [i["name"] for i in sig["inputs"]]
    if name not in names:
        raise ArtifactError(f"a control must be a program input; {name!r} is not one of {names}")
    spec = _load_treespec(sig["in_spec"])
    args, kwargs = pytree.tree_unflatten(list(range(len(names))), spec)
    position = names.index(name)
    if position not in args:
        raise ArtifactError(f"a control must be a top-level positional argument; {name!r} is not")
    rest = tuple(a for a in args if a != position)
    leaves, new_spec = pytree.tree_flatten((rest, kwargs))
    sig["inputs"] = [sig["inputs"][i] for i in leaves]
    sig["in_spec"] = pytree.treespec_dumps(new_spec)
    control = {"name": name, "dtype": dtype, "default": default,
               **({"values": list(values)} if values is not None else {"min": min, "max": max})}
    program.setdefault("controls", []).append(control)


def merge_programs(artifacts: dict[str, Artifact], default_program: str, **fields) -> Artifact:
    """One artifact whose programs are those of ``artifacts`` (name -> a one-program artifact), one weight store.

    Every tensor is stored once however many programs read it: equal
    contents are one tensor, saved once, its other names aliases
    (``weight_aliases``); a weight or file whose name another program
    already uses for different contents is stored as ``PROGRAM.NAME`` and
    the program's references renamed.
    """
    store: dict[str, torch.Tensor] = {}
    by_key: dict[tuple, torch.Tensor] = {}
    files: dict[str, bytes] = {}
    programs: dict[str, dict] = {}
    queues: dict[str, dict] = {}
    first = next(iter(artifacts.values())).manifest
    for name, artifact in artifacts.items():
        m = artifact.manifest
        if m["target"] != first["target"]:
            raise ArtifactError(f"program {name!r} was compiled for target {m['target']!r}, the others for "
                                f"{first['target']!r}")
        if len(m["programs"]) != 1:
            raise ArtifactError(f"program {name!r}: merge artifacts of one program each")
        (program,) = json.loads(json.dumps(list(m["programs"].values())))
        wmap: dict[str, str] = {}
        for w, t in artifact.weights.items():
            t = by_key.setdefault(_content_key(t), t)  # one tensor per contents: saved once, other names alias it
            if w in store and store[w] is not t:
                wmap[w] = f"{name}.{w}"
            store[wmap.get(w, w)] = t
        fmap: dict[str, str] = {}
        for f, data in artifact.files.items():
            if f in files and files[f] != data:
                fmap[f] = f"{name}.{f}"
            files[fmap.get(f, f)] = data
        _rename(program, wmap, fmap)
        programs[name] = program
        queues.update(m["queues"])
    manifest = {k: first[k] for k in ("format", "format_version", "kiln_version", "torch_version", "tvm_version",
                                      "target", "model") if k in first}
    manifest.update(programs=programs, default_program=default_program, queues=queues, **fields)
    return Artifact(manifest, store, files, None)


def _content_key(t: torch.Tensor) -> tuple:
    data = t.detach().contiguous().reshape(-1)
    digest = _sha256(data.view(torch.uint8).numpy().tobytes()) if data.numel() else ""
    return str(t.dtype), tuple(t.shape), digest


def _rename(program: dict, weights: dict[str, str], files: dict[str, str]) -> None:
    produced = {i["name"] for i in program["signature"]["inputs"]} | {c["name"] for c in program.get("controls", ())}
    for task in program["tasks"]:
        task["weights"] = [weights.get(w, w) for w in task["weights"]]
        if task["format"] == "tvm-vm":
            task["spec"]["weights"] = [weights.get(w, w) for w in task["spec"]["weights"]]
        for key in ("files", "compiler_files"):
            if key in task:
                task[key] = [files.get(f, f) for f in task[key]]
        produced.update(task["outputs"])
    for out in program["outputs"]:
        if out.get("value") in weights and out["value"] not in produced:
            out["value"] = weights[out["value"]]
    if "weight_sources" in program:
        program["weight_sources"] = {weights.get(k, k): v for k, v in program["weight_sources"].items()}


class Manifest(dict):
    """A manifest; ``m["partitions"]``, ``m["signature"]``, ``m["outputs"]``, ``m["passes"]`` and
    ``m["fallbacks"]`` read the default program's (its tasks, for partitions), as format 1 had them."""

    _PROGRAM_FIELDS = {"partitions": "tasks", "signature": "signature", "outputs": "outputs", "passes": "passes",
                       "fallbacks": "fallbacks", "controls": "controls"}

    def __missing__(self, key):
        field = self._PROGRAM_FIELDS.get(key)
        programs = dict.get(self, "programs")
        if field is None or not isinstance(programs, dict) or dict.get(self, "default_program") not in programs:
            raise KeyError(key)
        return programs[self["default_program"]][field]
