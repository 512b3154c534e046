"""Artifacts: round trip, and refusal of anything missing, truncated, tampered with or of another version."""
import json

import pytest
import torch

import kiln
from kiln.errors import ArtifactError
from kiln.ir.meta import dtype_from_name as kiln_dtype
from kiln.runtime import artifact as artifact_mod
from kiln.runtime.artifact import _sha256


def test_round_trip_matches_eager(compiled, saved):
    m, x, _ = compiled
    loaded = kiln.load(saved)
    out, ref = loaded(x), m(x)
    assert set(out) == {"logits", "hidden"}
    torch.testing.assert_close(out["logits"], ref["logits"])
    torch.testing.assert_close(out["hidden"], ref["hidden"])
    assert sorted(p.name for p in saved.iterdir()) == ["example_inputs.safetensors", "manifest.json",
                                                       "part0_cpu.so", "weights.safetensors"]
    torch.testing.assert_close(loaded.example_inputs[0], x)


def test_manifest_records_versions_target_and_hashes(saved):
    m = json.loads((saved / "manifest.json").read_text())
    assert m["format"] == "kiln-artifact" and m["format_version"] == 3
    assert m["target"] == "cpu" and m["torch_version"] == torch.__version__
    assert m["tvm_version"].startswith("0.27")
    data = (saved / "weights.safetensors").read_bytes()
    assert m["files"]["weights.safetensors"] == {"bytes": len(data), "sha256": _sha256(data)}


def test_tampered_library_is_refused(saved, no_kernel_loads):
    lib = saved / "part0_cpu.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0x01
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"part0_cpu\.so does not match its sha256"):
        kiln.load(saved)


def test_tampered_weights_are_refused(saved, no_kernel_loads):
    w = saved / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights\.safetensors does not match its sha256 .*tampered"):
        kiln.load(saved)


def test_truncated_weights_are_refused(saved, no_kernel_loads):
    w = saved / "weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=rf"weights\.safetensors is truncated .*says {len(data)} bytes"):
        kiln.load(saved)


def test_truncated_manifest_is_refused(saved, no_kernel_loads):
    mp = saved / "manifest.json"
    mp.write_bytes(mp.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"manifest\.json is not valid JSON \(truncated"):
        kiln.load(saved)


def test_edited_manifest_is_refused(saved, no_kernel_loads, rewrite_manifest):
    def return_the_input(m):
        program = m["programs"]["main"]
        program["outputs"][0]["value"] = program["signature"]["inputs"][0]["name"]
    rewrite_manifest(saved, return_the_input, rehash=False)
    with pytest.raises(ArtifactError, match="modified after it was written"):
        kiln.load(saved)


def test_future_format_version_is_refused(saved, no_kernel_loads, rewrite_manifest):
    rewrite_manifest(saved, lambda m: m.update(format_version=4))
    with pytest.raises(ArtifactError, match="format version 4 is not supported by this runtime \\(it reads version 3"):
        kiln.load(saved)


def test_a_version_1_artifact_is_refused_naming_its_version_and_how_to_rebuild_it(saved, no_kernel_loads,
                                                                                    rewrite_manifest):
    def as_version_1(m):  # format 1: one flat schedule of partitions
        program = m.pop("programs")["main"]
        del m["default_program"], m["queues"]
        m.update(format_version=1, signature=program["signature"], outputs=program["outputs"],
                 partitions=program["tasks"])
    rewrite_manifest(saved, as_version_1)
    with pytest.raises(ArtifactError, match=r"artifact format version 1 is not supported by this runtime \(it reads "
                                            r"version 3.*\); version 1 stored one flat schedule of partitions; "
                                            r"rebuild it with this kiln: `kiln compile"):
        kiln.load(saved)


def test_a_version_2_artifact_is_refused_naming_its_version_the_change_and_how_to_rebuild_it(saved, no_kernel_loads,
                                                                                            rewrite_manifest):
    def as_version_2(m):  # format 2: tvm-vm specs named dtypes the torch way
        spec = m["programs"]["main"]["tasks"][0]["spec"]
        for t in spec["inputs"] + spec["weight_types"] + spec["outputs"]:
            t["dtype"] = str(kiln_dtype(t["dtype"])).removeprefix("torch.")
        m.update(format_version=2)
    rewrite_manifest(saved, as_version_2)
    with pytest.raises(ArtifactError, match=r"artifact format version 2 is not supported by this runtime \(it reads "
                                            r"version 3.*\); version 2 named the dtypes of TVM kernel specs the torch "
                                            r"way \(float32\), not kiln's \(f32\); rebuild it with this kiln: "):
        kiln.load(saved)


def test_missing_files_are_named(saved, no_kernel_loads, tmp_path):
    (saved / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match="is missing weights.safetensors, listed in its manifest"):
        kiln.load(saved)
    (saved / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="is missing manifest.json"):
        kiln.load(saved)
    with pytest.raises(ArtifactError, match="not a directory"):
        kiln.load(tmp_path / "nowhere")


def test_path_escape_in_file_list_is_refused(saved, no_kernel_loads, rewrite_manifest):
    rewrite_manifest(saved, lambda m: m["files"].update({"../evil.so": {"bytes": 1, "sha256": "0"}}))
    with pytest.raises(ArtifactError, match="not a plain file name"):
        kiln.load(saved)


def test_save_is_atomic_and_never_clobbers_other_directories(compiled, tmp_path, monkeypatch):
    _, _, cm = compiled
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        cm.save(other)
    assert (other / "keep.txt").read_text() == "mine"

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifact_mod, "_canonical", fail)
    with pytest.raises(OSError, match="disk full"):
        cm.save(tmp_path / "half")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_resave_replaces_an_artifact(compiled, saved):
    m, x, cm = compiled
    cm.save(saved)
    torch.testing.assert_close(kiln.load(saved)(x)["logits"], m(x)["logits"])


def test_tied_weights_are_stored_once(saved):
    m = json.loads((saved / "manifest.json").read_text())
    assert m["weight_aliases"] == {}  # export already dedups tied parameters
    from safetensors import safe_open

    with safe_open(str(saved / "weights.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 4
