"""Per-backend options: ``CompileOptions(backend_options={"cpu": CpuOptions(...)})`` reaches the cpu backend."""
import pytest
import torch
from torch import nn

from kiln.api import Compilation, CompileOptions
from kiln.backends.cpu import CpuOptions, GemmKernels
from kiln.errors import KilnError, TuningError, UnknownNameError


def test_the_cpu_options_object_reaches_the_cpu_backend_and_its_lowering():
    mine = CpuOptions(gemm_kernels="onednn")
    compilation = Compilation("cpu", options=CompileOptions(backend_options={"cpu": mine}))
    cpu, torch_backend = compilation.backends
    assert cpu.name == "cpu" and cpu.options is mine and mine.gemm_kernels is GemmKernels.ONEDNN
    assert torch_backend.options is None  # the torch backend has no options
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), torch.randn(3, 8)
    compilation.trace(model, (x,))
    compilation.optimize()
    compiled = compilation.lower()
    (task,) = compiled.manifest["programs"]["main"]["tasks"]
    assert [g["kernel"] for g in task["report"]["gemm_kernels"]] == ["onednn", "onednn"]
    torch.testing.assert_close(compiled(x), model(x))


def test_a_backend_without_an_entry_gets_its_defaults():
    (cpu, _) = Compilation("cpu").backends
    assert cpu.options == CpuOptions() and cpu.options.gemm_kernels is GemmKernels.MEASURE


@pytest.mark.parametrize("kwargs, error, match", [
    ({"gemm_kernels": "fast"}, UnknownNameError, r"CpuOptions\.gemm_kernels 'fast'.*measure, mkl, onednn"),
    ({"tune_trials": -1}, TuningError, r"CpuOptions\.tune_trials must be .* not -1"),
    ({"tuning_database": 3}, TuningError, r"CpuOptions\.tuning_database must be a path .* not int"),
])
def test_bad_cpu_option_values_name_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        CpuOptions(**kwargs)


def test_an_unknown_backend_name_is_refused_with_the_known_ones():
    with pytest.raises(UnknownNameError, match=r"backend name in CompileOptions\.backend_options: 'tpu'; "
                                               r"known backends: .*cpu.*torch"):
        CompileOptions(backend_options={"tpu": CpuOptions()})


def test_options_of_the_wrong_type_name_the_backend_and_the_expected_class():
    with pytest.raises(KilnError, match=r"backend_options\['cpu'\] must be a kiln\.backends\.cpu\.options\.CpuOptions,"
                                        r" not dict"):
        CompileOptions(backend_options={"cpu": {"tune_trials": 4}})
    with pytest.raises(KilnError, match=r"backend_options\['torch'\]: backend 'torch' takes no options"):
        CompileOptions(backend_options={"torch": CpuOptions()})
    with pytest.raises(KilnError, match=r"backend_options must be a dict .* not list"):
        CompileOptions(backend_options=[CpuOptions()])
