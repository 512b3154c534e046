"""What an artifact may make the runtime do: only admitted ops, only verified native code, only trusted signers."""
import pytest
import torch
import torch.fx as fx

import kiln
from kiln.backends.pytorch import TorchBackend
from kiln.errors import ArtifactError
from kiln.ir.serialize import graph_from_json
from kiln.runtime import CompiledModel, read_artifact
from kiln.runtime import signing
from kiln.runtime.artifact import _canonical, _sha256


def _call(target, args, kwargs=None, node="linear"):
    """An edit turning the graph's call ``node`` into ``target(*args, **kwargs)``, as a hostile writer would."""

    def edit(m):
        entry = next(n for n in m["programs"]["main"]["tasks"][0]["spec"]["graph"]["nodes"] if n["name"] == node)
        entry.update(target=target, args=args)
        entry.pop("kwargs", None)
        if kwargs:
            entry["kwargs"] = kwargs
    return edit


X = {"node": "input_1"}
W = {"node": "p_0_weight"}


@pytest.mark.parametrize("target, args, kwargs, why", [
    # reads a file outside the artifact (shared=True would map it writable)
    ("aten.from_file.default", ["/etc/hostname"], {"shared": True, "size": 4, "dtype": {"dtype": "u8"}},
     "it does file or console I/O"),
    ("aten.save.default", [X, "/tmp/kiln-leak"], None, "it does file or console I/O"),
    # write storage the artifact does not own: the caller's input, a weight
    ("aten.fill_.Scalar", [X, 7.0], None, "it writes its arguments in place"),
    ("aten.copy_.default", [W, X], None, "it writes its arguments in place"),
    ("aten.add.out", [X, X], {"out": W}, "it writes its arguments in place"),
    ("aten.set_.source_Tensor", [W, X], None, "it writes its arguments in place"),
    # a functional op reading past its input's storage
    ("aten._reshape_alias.default", [X, [100000], [1]], None, "it reads memory without bounds checks"),
])
def test_torch_graph_ops_outside_the_allow_list_are_refused_at_load(torch_saved, no_kernel_loads, rewrite_manifest,
                                                                     target, args, kwargs, why):
    rewrite_manifest(torch_saved, _call(target, args, kwargs))
    with pytest.raises(ArtifactError, match=rf"tasks\[0\].*node linear: op '{target}' is not allowed in an "
                                            rf"artifact graph: {why}"):
        kiln.load(torch_saved)


def test_the_graph_loader_itself_refuses_them(torch_compiled):
    """Also without read_artifact (an in-memory graph): checked when the graph is built, before any node runs."""
    graph = torch_compiled[2].manifest["partitions"][0]["spec"]["graph"]
    bad = {"nodes": [dict(n) for n in graph["nodes"]]}
    node = next(n for n in bad["nodes"] if n["op"] == "call_function")
    node.update(target="aten.fill_.Scalar", args=[X, 7.0])
    with pytest.raises(ArtifactError, match=r"node linear: op 'aten.fill_.Scalar' is not allowed"):
        graph_from_json(bad)


def test_admitted_ops_still_run(torch_saved, torch_compiled, rewrite_manifest):
    rewrite_manifest(torch_saved, _call("aten.mul.Tensor", [{"node": "linear"}, -1.0], node="relu"))
    m, x, _ = torch_compiled
    torch.testing.assert_close(kiln.load(torch_saved)(x), m[2](-m[0](x)))


def test_the_torch_backend_never_places_what_the_loader_refuses():
    g = fx.Graph()
    x = g.placeholder("x")
    nodes = {t: g.call_function(t, (x, 1.0)) for t in (torch.ops.aten.fill_.Scalar, torch.ops.aten.add.Tensor)}
    path = g.call_function(torch.ops.aten.from_file.default, ("/etc/hostname",))
    backend = TorchBackend()
    assert not backend.supports(nodes[torch.ops.aten.fill_.Scalar])
    assert not backend.supports(path)
    assert backend.supports(nodes[torch.ops.aten.add.Tensor])


# --- 13: native code comes from the verified bytes, never from the path again ---

def test_a_library_replaced_after_verification_is_never_loaded(compiled, saved, monkeypatch):
    import tvm

    m, x, _ = compiled
    artifact = read_artifact(saved)  # hashes part0_cpu.so
    (saved / "part0_cpu.so").write_bytes(b"\x7fELF foreign code")  # ... then someone swaps it
    loaded_from = []
    real = tvm.runtime.load_module
    monkeypatch.setattr(tvm.runtime, "load_module", lambda p: loaded_from.append(p) or real(p))
    out = CompiledModel(artifact)(x)
    torch.testing.assert_close(out["logits"], m(x)["logits"])
    assert loaded_from and not any(str(saved) in p for p in loaded_from), loaded_from


# --- 14: signatures ---

@pytest.fixture(scope="module")
def key():
    return signing.generate_signing_key()


@pytest.fixture
def signed(compiled, key, tmp_path):
    return compiled[2].save(tmp_path / "signed", signing_key=key)


@pytest.mark.parametrize("encoding", ["raw", "pem", "object"])
def test_a_signed_artifact_loads_with_its_public_key(compiled, signed, key, encoding):
    m, x, _ = compiled
    public = key.public_key() if encoding == "object" else signing.public_key_bytes(key, encoding)
    out = kiln.load(signed, trusted_keys=[signing.generate_signing_key().public_key(), public])(x)
    torch.testing.assert_close(out["logits"], m(x)["logits"])


def test_an_unsigned_artifact_is_refused_when_keys_are_given(saved, key, no_kernel_loads):
    with pytest.raises(ArtifactError, match="is not signed, and trusted_keys were given"):
        kiln.load(saved, trusted_keys=[signing.public_key_bytes(key)])


def test_a_rehashed_foreign_library_is_refused(signed, key, no_kernel_loads, replace_file):
    """The forger re-hashes the library and the manifest (what the checksums alone cannot catch)."""
    replace_file(signed, "part0_cpu.so", b"\x7fELF foreign code")
    read_artifact(signed)  # the checksums pass: they protect against corruption only
    with pytest.raises(ArtifactError, match="the signature does not match the manifest"):
        kiln.load(signed, trusted_keys=[key.public_key()])


def test_an_artifact_signed_by_another_key_is_refused(signed, key, no_kernel_loads, rewrite_manifest):
    forger = signing.generate_signing_key()

    def resign(m):
        m[signing.FIELD] = signing.sign_manifest(m, forger)
    rewrite_manifest(signed, resign)
    with pytest.raises(ArtifactError, match=r"is signed by key [0-9a-f]{16}\.\.\., which is not one of the 1 "
                                            r"trusted keys"):
        kiln.load(signed, trusted_keys=[key.public_key()])


def test_a_signature_field_made_up_is_refused(signed, key, no_kernel_loads, rewrite_manifest):
    public = signing.public_key_bytes(key).hex()
    rewrite_manifest(signed, lambda m: m.update({signing.FIELD: {"algorithm": "ed25519", "public_key": public,
                                                                 "signature": "00" * 64}}))
    with pytest.raises(ArtifactError, match="the signature does not match"):
        kiln.load(signed, trusted_keys=[key.public_key()])


def test_saving_again_without_a_key_drops_the_signature(signed, key, tmp_path):
    cm = kiln.load(signed, trusted_keys=[key.public_key()])
    assert signing.FIELD in cm.manifest
    again = cm.save(tmp_path / "unsigned")
    assert signing.FIELD not in kiln.load(again).manifest
    with pytest.raises(ArtifactError, match="is not signed"):
        kiln.load(again, trusted_keys=[key.public_key()])


def test_signature_covers_the_manifest_without_checksum_or_itself(signed, key):
    m = read_artifact(signed).manifest
    entry = m[signing.FIELD]
    assert entry["algorithm"] == "ed25519" and bytes.fromhex(entry["public_key"]) == signing.public_key_bytes(key)
    key.public_key().verify(bytes.fromhex(entry["signature"]), signing.signed_bytes(m))
    assert m["manifest_sha256"] == _sha256(_canonical(m))  # which does cover the signature


def test_key_helpers_round_trip(key):
    raw, pem = signing.public_key_bytes(key), signing.public_key_bytes(key, "pem")
    assert len(raw) == 32 and pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert signing.public_key_bytes(signing.load_public_key(pem)) == raw
    assert signing.public_key_bytes(signing.load_public_key(raw)) == raw
    private = signing.private_key_bytes(key)
    assert signing.public_key_bytes(signing.load_signing_key(private)) == raw
    assert signing.public_key_bytes(signing.load_signing_key(private.decode())) == raw
    with pytest.raises(ArtifactError, match="not an ed25519 public key"):
        signing.load_public_key(b"short")
    with pytest.raises(ValueError, match="encoding must be"):
        signing.public_key_bytes(key, "der")


def test_kiln_run_checks_the_signature_with_trusted_key_files(signed, key, tmp_path, capsys):
    from kiln.cli import main

    good, other = tmp_path / "signer.pem", tmp_path / "other.pub"
    good.write_bytes(signing.public_key_bytes(key, "pem"))
    other.write_bytes(signing.public_key_bytes(signing.generate_signing_key()))
    assert main(["run", str(signed), "--repeat", "1", "--trusted-key", str(other), "--trusted-key", str(good)]) == 0
    assert main(["run", str(signed), "--repeat", "1", "--trusted-key", str(other)]) == 1
    assert "which is not one of the 1 trusted keys" in capsys.readouterr().err
    assert main(["run", str(signed), "--trusted-key", str(tmp_path / "missing.pem")]) == 1
    assert "cannot read the trusted key" in capsys.readouterr().err


def test_trusted_keys_must_be_a_list(signed, key):
    with pytest.raises(ArtifactError, match=r"trusted_keys is a list of public keys; got a single key \(pass \[key\]\)"):
        kiln.load(signed, trusted_keys=signing.public_key_bytes(key))
