"""kiln artifacts: a directory with ``manifest.json``, ``weights.safetensors`` and backend files.

The manifest records the format version, the versions of kiln/torch/TVM that
wrote it, the target, the signature, the schedule of partitions, and the size
and sha256 of every other file; ``manifest_sha256`` covers the manifest itself.
``read_artifact`` checks all of that before anything is loaded, and raises
:class:`~kiln.errors.ArtifactError` naming the file and the problem.
``write_artifact`` writes into a temporary directory and renames it into place,
so a failure never leaves a half-written artifact. Nothing is pickled.
See ``docs/artifact-format.md``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..errors import ArtifactError

FORMAT_NAME = "kiln-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
EXAMPLES = "example_inputs.safetensors"


@dataclass
class Artifact:
    """An artifact in memory: the manifest, the weights, and the other files' bytes."""

    manifest: dict
    weights: dict[str, torch.Tensor]
    files: dict[str, bytes] = field(default_factory=dict)
    example_inputs: list[torch.Tensor] | None = None
    path: Path | None = None  # where it was read from or last written to


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


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


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, marker: str, what: str) -> Iterator[Path]:
    """Build a directory in a temporary sibling that replaces ``path`` only if the block succeeds.

    ``path`` may be missing, empty, or an earlier directory of the same kind
    (it holds ``marker``); anything else is refused rather than overwritten.
    On failure the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    if path.exists() and not (path / marker).is_file() and (not path.is_dir() or any(path.iterdir())):
        raise ArtifactError(f"refusing to overwrite {path}: it exists and is not {what}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; this is an ordinary directory
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / "a")
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_artifact(artifact: Artifact, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_directory(path, MANIFEST, "a kiln artifact") as tmp:
        weights_blob, aliases = _weights_bytes(artifact.weights)
        blobs = {WEIGHTS: weights_blob, **artifact.files}
        if artifact.example_inputs is not None:
            blobs[EXAMPLES] = save_safetensors({f"input{i}": t.contiguous() for i, t in enumerate(artifact.example_inputs)})
        manifest = dict(artifact.manifest)
        manifest["weight_aliases"] = aliases
        manifest["files"] = {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in sorted(blobs.items())}
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)
        manifest["manifest_sha256"] = _sha256(_canonical(manifest))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    artifact.manifest = manifest
    artifact.path = path
    return path


def read_json_document(path: Path, format_name: str, what: str) -> dict:
    """A kiln JSON file (a manifest, an index) whose field ``format`` is ``format_name``.

    Versions are checked by the caller, which knows what each one means.
    """
    if not path.is_file():
        raise ArtifactError(f"{path.parent} is missing {path.name}: not {what}, or an incomplete copy")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON (truncated or corrupted): {e}") from None
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise ArtifactError(f"{path} is not {what} (field 'format' is not {format_name!r})")
    return data


def read_artifact(path: str | os.PathLike) -> Artifact:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"no kiln artifact at {path}: not a directory")
    mpath = path / MANIFEST
    manifest = read_json_document(mpath, FORMAT_NAME, "a kiln artifact")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: artifact format version {version!r} is not supported by this runtime "
            f"(it reads version {FORMAT_VERSION}; the artifact was written by kiln {manifest.get('kiln_version')!r}); "
            "re-compile the model with this kiln")
    if manifest.get("manifest_sha256") != _sha256(_canonical(manifest)):
        raise ArtifactError(f"{mpath} was modified after it was written (its checksum 'manifest_sha256' does not match)")
    blobs: dict[str, bytes] = {}
    for name, entry in manifest.get("files", {}).items():
        fpath = path / name
        if Path(name).name != name:
            raise ArtifactError(f"{mpath}: file name {name!r} is not a plain file name")
        if not fpath.is_file():
            raise ArtifactError(f"{path} is missing {name}, listed in its manifest")
        data = fpath.read_bytes()
        if len(data) != entry["bytes"]:
            raise ArtifactError(f"{fpath} is truncated or padded: the manifest says {entry['bytes']} bytes, "
                                f"the file has {len(data)}")
        if _sha256(data) != entry["sha256"]:
            raise ArtifactError(f"{fpath} does not match its sha256 in the manifest (tampered with or corrupted)")
        blobs[name] = data
    if WEIGHTS not in blobs:
        raise ArtifactError(f"{mpath} lists no {WEIGHTS}")
    weights = dict(load_safetensors(blobs.pop(WEIGHTS)))
    for alias, name in manifest.get("weight_aliases", {}).items():
        weights[alias] = weights[name]
    examples = None
    if EXAMPLES in blobs:
        loaded = load_safetensors(blobs.pop(EXAMPLES))
        examples = [loaded[f"input{i}"] for i in range(len(loaded))]
    return Artifact(manifest, weights, blobs, examples, path)
