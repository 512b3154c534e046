"""A malformed artifact is refused at load with an ArtifactError naming the field, before any kernel loads."""
import json
import os
import resource
import struct

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import kiln
from kiln.errors import ArtifactError


def _prog(m):
    return m["programs"]["main"]


def _part(m):
    return _prog(m)["tasks"][0]


def _drop(key):
    return lambda m: m.pop(key)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["files"]["weights.safetensors"].pop("bytes"),
     r"field files\['weights.safetensors'\].bytes is missing"),
    (lambda m: m.update(files=list(m["files"])), "field files must be of type object, not an array"),
    (_drop("programs"), "field programs is missing"),
    (lambda m: _part(m).update(files=[]), r"field programs.main.tasks\[0\].files: \[\] should be non-empty"),
    (lambda m: _part(m).update(files=["part0_cpu.so"] * 2),
     r"field programs.main.tasks\[0\].files: \['part0_cpu.so', 'part0_cpu.so'\] is"),
    (lambda m: _part(m).update(inputs="x"), r"field programs.main.tasks\[0\].inputs must be of type array, not a string"),
    (lambda m: _prog(m)["signature"]["inputs"][0].update(dtype="f99"),
     r"field programs.main.signature.inputs\[0\].dtype: 'f99' is not"),
    (lambda m: m.update(weight_aliases={"p_c_weight": "nope"}),
     r"field weight_aliases\['p_c_weight'\] names 'nope', which is not in weights.safetensors"),
    (lambda m: _prog(m)["signature"].update(in_spec="{not json"),
     r"programs\['main'\]: field signature.in_spec: cannot rebuild"),
    (lambda m: _part(m).update(inputs=["ghost"]),
     r"programs\['main'\].tasks\[0\] \('part0_cpu'\): input 'ghost' is neither a program input, a control nor"),
    (lambda m: _prog(m)["outputs"].append({"value": "ghost"}), r"outputs\[2\] is 'ghost', which is neither"),
    (lambda m: _part(m).update(format="onnx"), "has kernel format 'onnx', which this runtime cannot load"),
    (lambda m: _part(m)["spec"].update(weights=_part(m)["spec"]["weights"][::-1]),
     "spec.weights does not list the partition's weights in order"),
    (lambda m: _part(m)["spec"].update(packed_f32_weights=[["ghost", 4]]),
     "spec.packed_f32_weights names 'ghost', which is not one of the partition's weights"),
    (lambda m: _part(m)["spec"].update(packed_f32_weights=[[_part(m)["spec"]["weights"][0], 0]]),
     r"spec.packed_f32_weights\[0\]\[1\]: 0 is less than the minimum of 1"),
    (lambda m: _part(m)["spec"].update(packed_onednn_f32_weights=[["ghost", 128]]),
     "spec.packed_onednn_f32_weights names 'ghost', which is not one of the partition's weights"),
    (lambda m: _part(m)["spec"].update(packed_onednn_f32_weights=[[_part(m)["spec"]["weights"][0]]]),
     r"spec.packed_onednn_f32_weights\[0\]"),
    (lambda m: _part(m)["spec"].update(packed_bf16_weights=["ghost"]),
     "spec.packed_bf16_weights names 'ghost', which is not one of the partition's weights"),
])
def test_malformed_manifests_are_refused_naming_the_field(saved, no_kernel_loads, rewrite_manifest, edit, message):
    rewrite_manifest(saved, edit)
    with pytest.raises(ArtifactError, match=message):
        kiln.load(saved)


@pytest.mark.parametrize("field", ["inputs", "weight_types", "outputs"])
def test_a_tvm_spec_dtype_not_in_kiln_names_is_refused_naming_the_field(saved, no_kernel_loads, rewrite_manifest, field):
    spec = json.loads((saved / "manifest.json").read_text())["programs"]["main"]["tasks"][0]["spec"]
    assert {t["dtype"] for t in spec["inputs"] + spec["weight_types"] + spec["outputs"]} == {"f32"}
    rewrite_manifest(saved, lambda m: _part(m)["spec"][field][0].update(dtype="float32"))  # torch's name: format 2
    with pytest.raises(ArtifactError, match=rf"field programs.main.tasks\[0\].spec.{field}\[0\].dtype: 'float32' is not "
                                            r"one of \['f32'"):
        kiln.load(saved)


def test_a_task_reading_a_value_it_does_not_wait_for_is_refused_at_load(torch_saved, no_kernel_loads,
                                                                        rewrite_manifest):
    """A task reading a value computed by a task its ``after`` does not name (it could run first)."""
    def reorder(m):
        first = json.loads(json.dumps(_part(m)))
        first.update(name="early", inputs=_part(m)["outputs"], outputs=["early_out"], after=[])
        _prog(m)["tasks"].insert(0, first)
    rewrite_manifest(torch_saved, reorder)
    with pytest.raises(ArtifactError, match=r"tasks\[0\] \('early'\): input 'linear_1' is computed by task "
                                            r"'part0_torch', which field after does not make it wait for"):
        kiln.load(torch_saved)


def test_deeply_nested_manifest_json_is_refused(saved, no_kernel_loads):
    (saved / "manifest.json").write_text('{"format": "kiln-artifact", "x": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ArtifactError, match="manifest.json nests JSON too deeply to be a kiln artifact"):
        kiln.load(saved)


def test_deeply_nested_graph_arguments_are_refused(torch_saved, no_kernel_loads, rewrite_manifest):
    def nest(m):
        node = next(n for n in _part(m)["spec"]["graph"]["nodes"] if n["op"] == "call_function")
        deep = 1.0
        for _ in range(500):
            deep = [deep]
        node["args"].append(deep)
    rewrite_manifest(torch_saved, nest)
    with pytest.raises(ArtifactError, match=r"field programs.main.tasks\[0\].spec.graph.nodes\[5\].args\[3\]"):
        kiln.load(torch_saved)


def test_a_corrupt_safetensors_header_is_refused(saved, no_kernel_loads, replace_file):
    data = (saved / "weights.safetensors").read_bytes()
    replace_file(saved, "weights.safetensors", struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(ArtifactError, match="weights.safetensors is not a valid safetensors file"):
        kiln.load(saved)


@pytest.mark.parametrize("change, found", [
    (lambda w: w.t().contiguous(), r"torch.float32 \[16, 4\]; the partition was compiled for torch.float32 \[4, 16\]"),
    (lambda w: w.double(), r"torch.float64 \[4, 16\]; the partition was compiled for torch.float32 \[4, 16\]"),
])
def test_a_weight_of_the_wrong_shape_or_dtype_is_refused_at_load(saved, no_kernel_loads, replace_file, change, found):
    """Before, TVM's match_cast failed at the first call."""
    weights = load_safetensors((saved / "weights.safetensors").read_bytes())
    name = next(n for n, w in weights.items() if tuple(w.shape) == (4, 16))
    weights[name] = change(weights[name])
    replace_file(saved, "weights.safetensors", save_safetensors(weights))
    with pytest.raises(ArtifactError, match=rf"weight '{name}' in weights.safetensors is {found}"):
        kiln.load(saved)


def test_a_torch_graph_weight_of_the_wrong_shape_is_refused_at_load(torch_saved, no_kernel_loads, replace_file):
    weights = load_safetensors((torch_saved / "weights.safetensors").read_bytes())
    weights["p_0_bias"] = torch.zeros(7)
    replace_file(torch_saved, "weights.safetensors", save_safetensors(weights))
    with pytest.raises(ArtifactError, match=r"weight 'p_0_bias' .* is torch.float32 \[7\]; the partition was compiled "
                                            r"for torch.float32 \[6\]"):
        kiln.load(torch_saved)


# --- 16: sizes before reading; links refused ---

def _sparse(path, size=2 << 30):
    with open(path, "wb") as f:
        f.truncate(size)  # no blocks allocated
    return path


def test_a_symlink_to_a_huge_file_is_refused_unread(saved, no_kernel_loads, tmp_path):
    (saved / "weights.safetensors").unlink()
    (saved / "weights.safetensors").symlink_to(_sparse(tmp_path / "huge"))
    with pytest.raises(ArtifactError, match="weights.safetensors is a symbolic link"):
        kiln.load(saved)


def test_a_symlinked_manifest_is_refused(saved, no_kernel_loads, tmp_path):
    outside = tmp_path / "elsewhere.json"
    (saved / "manifest.json").rename(outside)
    (saved / "manifest.json").symlink_to(outside)
    with pytest.raises(ArtifactError, match="manifest.json is a symbolic link"):
        kiln.load(saved)


def test_a_file_of_the_wrong_size_is_refused_without_reading_it(saved, no_kernel_loads):
    expected = os.path.getsize(saved / "weights.safetensors")
    _sparse(saved / "weights.safetensors")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(ArtifactError, match=f"weights.safetensors is truncated or padded: the manifest says {expected} "
                                            f"bytes, the file has {2 << 30}"):
        kiln.load(saved)
    # not read: the 2 GiB file would show in the peak RSS (no wall-clock bound: tests assert behaviour)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 << 10


def test_a_directory_in_place_of_a_file_is_refused(saved, no_kernel_loads):
    (saved / "weights.safetensors").unlink()
    (saved / "weights.safetensors").mkdir()
    with pytest.raises(ArtifactError, match="weights.safetensors is not a regular file"):
        kiln.load(saved)
