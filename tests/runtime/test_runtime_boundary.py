"""The runtime loads and runs artifacts without the compiler, in a fresh process, never unpickling.

"The compiler" is kiln's compile side (``kiln.api``, ``kiln.passes``,
``kiln.backends``, tracing, ``kiln.llm.compile``), transformers (which only
``kiln.llm.hf`` and ``kiln.zoo``'s factories import), the example zoo, and
TVM's PyTorch importer (``tvm.relax.frontend.torch``). ``import tvm`` itself
loads the rest of TVM's Python packages (relax, dlight, meta_schedule), so
those cannot be told apart from the runtime's own use of TVM.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import kiln

COMPILER = ("kiln.passes", "kiln.api", "kiln.backends", "kiln.ir.tracing", "kiln.cli", "kiln.llm.compile",
            "kiln.llm.hf", "kiln.zoo", "transformers", "tvm.relax.frontend.torch")
KILN = Path(kiln.__file__).parent
# the runtime side's modules: every import in them, at the top or inside a function, stays off the compiler
RUNTIME_SOURCES = sorted((KILN / "runtime").rglob("*.py")) + [KILN / "llm" / "__init__.py", KILN / "llm" / "runtime.py"]
_LEAKED = f"leaked = sorted(m for m in sys.modules if m.startswith({COMPILER!r})); assert not leaked, leaked"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names), wherever the import statement is."""
    package = ".".join(path.relative_to(KILN.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names |= {module} | {f"{module}.{a.name}" for a in node.names}  # `from .. import api` is kiln.api
    return names


def test_runtime_sources_never_import_the_compiler_transformers_or_the_zoo():
    assert len(RUNTIME_SOURCES) > 5 and all(p.is_file() for p in RUNTIME_SOURCES), RUNTIME_SOURCES
    bad = {str(p.relative_to(KILN.parent)): sorted(m for m in _imports(p) if m.startswith(COMPILER))
           for p in RUNTIME_SOURCES}
    assert not {p: m for p, m in bad.items() if m}, bad


@pytest.mark.parametrize("module", ["kiln.runtime", "kiln.llm", "kiln.llm.runtime"])
def test_runtime_modules_import_without_the_compiler(module):
    subprocess.run([sys.executable, "-c", f"import sys, {module}; {_LEAKED}"], check=True)


def test_import_kiln_llm_imports_none_of_its_modules_until_a_name_is_used():
    code = ("import sys, kiln.llm; assert not [m for m in sys.modules if m.startswith('kiln.llm.')]; "
            "kiln.llm.CompiledLLM; assert 'kiln.llm.runtime' in sys.modules; " + _LEAKED)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_old_llm_modules_are_gone():
    assert not (KILN / "llm.py").exists() and not (KILN / "kv_cache.py").exists()
    with pytest.raises(ModuleNotFoundError):
        __import__("kiln.kv_cache")


def test_fresh_process_loads_and_matches_eager_without_compiler_or_pickle(tmp_path, fresh_python):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.LayerNorm(12), nn.Linear(12, 3)).eval()
    x = torch.randn(4, 6)
    kiln.compile(m, (x,)).save(tmp_path / "art")
    save_file({"x": x, "expected": m(x).detach()}, str(tmp_path / "io.safetensors"))
    out = fresh_python(f"""
        import sys
        import kiln
        from safetensors.torch import load_file
        io = load_file({str(tmp_path / 'io.safetensors')!r})
        cm = kiln.load({str(tmp_path / 'art')!r})
        torch.testing.assert_close(cm(io["x"]), io["expected"])
        {_LEAKED}
        print("ok")
    """)
    assert out.strip() == "ok"


def test_fresh_process_loads_and_generates_with_a_saved_llm_without_compiler_transformers_or_pickle(
        tmp_path, fresh_python):
    from kiln import zoo
    from kiln.llm import compile_llm

    model, (ids,) = zoo.llama(layers=1, seq=5)
    llm = compile_llm(model, prefill_buckets=(8,), capacity=16)  # target cpu: the artifact's kernels are TVM's
    llm.save(tmp_path / "llm")
    save_file({"ids": ids, "expected": llm.generate(ids, 4)}, str(tmp_path / "io.safetensors"))
    out = fresh_python(f"""
        import sys
        import kiln
        import kiln.llm
        from safetensors.torch import load_file
        io = load_file({str(tmp_path / 'io.safetensors')!r})
        for load in (kiln.load, kiln.llm.load):
            llm = load({str(tmp_path / 'llm')!r})
            assert type(llm).__name__ == "CompiledLLM", llm
            assert torch.equal(llm.generate(io["ids"], 4), io["expected"])
            k, v = llm.empty_cache()
            logits, k, v = llm.decode(io["ids"][:, :1], 0, k, v)
        assert "kiln.runtime.kernels.tvm_vm" in sys.modules  # TVM's runtime ran the programs
        {_LEAKED}
        print("ok")
    """)
    assert out.strip() == "ok"
