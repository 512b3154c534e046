"""Ed25519 signatures over an artifact's manifest: who wrote it, not only whether it is intact.

The sha256 sums in a manifest detect corruption, but anyone who can write the
directory can re-hash a foreign library. A signature made with a private key
the writer keeps, checked against public keys the loader trusts
(``kiln.load(path, trusted_keys=[...])``), detects that: the manifest records
every file's sha256, so signing the manifest covers every file.

The signed bytes are the manifest's canonical JSON (sorted keys, no spaces)
without ``manifest_sha256`` and ``manifest_signature``; ``manifest_signature``
is ``{"algorithm": "ed25519", "public_key": HEX, "signature": HEX}``. The
public key there only says which key signed; it is never trusted by itself.
Keys come and go as bytes: raw (32 bytes) or PEM (``public_key_bytes``,
``private_key_bytes``; ``load_public_key``, ``load_signing_key`` read both).
"""
from __future__ import annotations

import json
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import ArtifactError

ALGORITHM = "ed25519"
FIELD = "manifest_signature"
_UNSIGNED_FIELDS = ("manifest_sha256", FIELD)

SigningKey = Ed25519PrivateKey | bytes | str
PublicKey = Ed25519PublicKey | bytes | str


def generate_signing_key() -> Ed25519PrivateKey:
    """A new random ed25519 private key; keep it secret, publish ``public_key_bytes(key)``."""
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey, encoding: str = "raw") -> bytes:
    """The public half of ``key`` as ``"raw"`` (32 bytes) or ``"pem"`` (SubjectPublicKeyInfo) bytes."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    if encoding == "raw":
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if encoding == "pem":
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    raise ValueError(f"encoding must be 'raw' or 'pem', not {encoding!r}")


def private_key_bytes(key: Ed25519PrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM bytes (store them where only the signer can read them)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_public_key(key: PublicKey) -> Ed25519PublicKey:
    """An ed25519 public key from a key object, raw 32 bytes, or PEM bytes/text."""
    return _load(key, Ed25519PublicKey, Ed25519PublicKey.from_public_bytes, serialization.load_pem_public_key,
                 "public")


def load_signing_key(key: SigningKey) -> Ed25519PrivateKey:
    """An ed25519 private key from a key object, raw 32 bytes, or unencrypted PEM bytes/text."""
    return _load(key, Ed25519PrivateKey, Ed25519PrivateKey.from_private_bytes,
                 lambda data: serialization.load_pem_private_key(data, password=None), "private")


def _load(key, cls, from_raw, from_pem, kind: str):
    if isinstance(key, cls):
        return key
    data = key.encode() if isinstance(key, str) else key
    if not isinstance(data, bytes):
        raise ArtifactError(f"an ed25519 {kind} key must be a key object, raw 32 bytes or PEM, "
                            f"not {type(key).__name__}")
    try:
        loaded = from_pem(data) if data.lstrip().startswith(b"-----BEGIN") else from_raw(data)
    except ValueError as e:
        raise ArtifactError(f"not an ed25519 {kind} key (raw 32 bytes or PEM): {e}") from None
    if not isinstance(loaded, cls):
        raise ArtifactError(f"the PEM key is a {type(loaded).__name__}, not an ed25519 {kind} key")
    return loaded


def canonical_json(manifest: dict, without: tuple[str, ...]) -> bytes:
    """The manifest's canonical JSON (sorted keys, no spaces) without the fields ``without``."""
    body = {k: v for k, v in manifest.items() if k not in without}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def signed_bytes(manifest: dict) -> bytes:
    """What the signature covers: the canonical JSON of everything but the checksum and the signature."""
    return canonical_json(manifest, _UNSIGNED_FIELDS)


def sign_manifest(manifest: dict, key: SigningKey) -> dict:
    """The ``manifest_signature`` entry for ``manifest`` (whose ``files`` are final) signed with ``key``."""
    key = load_signing_key(key)
    return {"algorithm": ALGORITHM, "public_key": public_key_bytes(key).hex(),
            "signature": key.sign(signed_bytes(manifest)).hex()}


def verify_manifest(manifest: dict, trusted_keys: Iterable[PublicKey], where: str) -> None:
    """Raise ArtifactError unless ``manifest`` carries an ed25519 signature by one of ``trusted_keys``."""
    trusted = [load_public_key(k) for k in trusted_keys]
    entry = manifest.get(FIELD)
    if entry is None:
        raise ArtifactError(f"{where} is not signed, and trusted_keys were given: refusing an unsigned artifact")
    if not isinstance(entry, dict) or entry.get("algorithm") != ALGORITHM:
        raise ArtifactError(f"{where}: field {FIELD} is not an {ALGORITHM} signature")
    try:
        signature = bytes.fromhex(entry["signature"])
        signer = bytes.fromhex(entry["public_key"])
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"{where}: field {FIELD} needs hex strings 'public_key' and 'signature'") from None
    keys = [k for k in trusted if public_key_bytes(k) == signer]
    if not keys:
        raise ArtifactError(f"{where} is signed by key {signer.hex()[:16]}..., which is not one of the "
                            f"{len(trusted)} trusted keys")
    try:
        keys[0].verify(signature, signed_bytes(manifest))
    except InvalidSignature:
        raise ArtifactError(f"{where}: the signature does not match the manifest (it was changed after "
                            "it was signed, or the signature was forged)") from None
