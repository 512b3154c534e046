"""The ``tvm-vm`` kernel format: a TVM Relax VM library built for this CPU and TVM version.

Loading registers the PyTorch kernels the library calls (``tvm_dispatch``),
checks that the library was built by this TVM for this CPU (code built for
another CPU can die with an illegal instruction, and another TVM's VM bytecode
is not compatible), loads the shared library and binds the weights once as
DLPack views. A call converts only the inputs; outputs come back as views of
the VM's freshly allocated output tensors (the VM never reuses them, so handing
them out is safe).

Threads: a ``relax.VirtualMachine`` is not reentrant. Each call pushes a frame
and writes a register file, a program counter and a return register kept in
the VM object itself, with no lock, and the call runs with the GIL released;
two threads calling one VM corrupt each other's registers (segfaults in
``StorageObj::AllocTensor``, ``Check failed: reg < frame->register_file.size()``).
So each calling thread gets its own VM, made from the one loaded library (the
executable, its constants and the compiled kernels are shared and read-only;
a VM costs ~15 us to make). The weights stay bound once, as shared views.
TVM's own thread pool for parallel loops is already one per calling thread.

TVM's pool against PyTorch's: the library's parallel loops run on TVM's
pool, its dispatched GEMMs and attention on PyTorch's OpenMP threads. Both
spin while they wait for work, so when both are multi-threaded they take
each other's cores (measured here, 2 cores: a 4-bit decode step 42 ms with
both at 2 threads, BERT 50 ms against 35). So each call sizes the calling
thread's TVM pool (``_size_tvm_pool``): when the program runs PyTorch on one
thread of a caller that has more (``CompileOptions.intra_op_threads=1``, or
``"measure"`` choosing it), TVM takes the caller's count (a decode step of
TVM's nested low-bit kernels went 24.9 -> 18.0 ms); otherwise one thread (what
TVM's default gives anyway on a 2-core x86 machine, where it halves the core
count for hyper-threads), so a caller that set PyTorch to one thread gets one
thread in all. Set ``TVM_NUM_THREADS`` to size it yourself: kiln then leaves
it alone.
"""
from __future__ import annotations

import os
import threading

import torch
import tvm
from tvm import relax
from tvm.target import codegen

from ...errors import ArtifactError, InputMismatchError
from ...ir.meta import dtype_from_name
from ..threads import caller_threads
from . import tvm_dispatch

FORMAT = "tvm-vm"
_ALIGNMENT = 64


def check_compatible(spec: dict) -> None:
    """Raise ArtifactError unless ``spec`` was built by this TVM, for this CPU, against these dispatch functions."""
    problems = []
    if spec.get("tvm_version") != tvm.__version__:
        problems.append(f"TVM {spec.get('tvm_version')!r} (this runtime has TVM {tvm.__version__!r})")
    host = codegen.llvm_get_system_cpu()
    if spec.get("mcpu") != host:
        problems.append(f"CPU {spec.get('mcpu')!r} (this machine is {host!r})")
    if spec.get("dispatch_abi") != tvm_dispatch.ABI:
        problems.append(f"kiln's dispatch functions ABI {spec.get('dispatch_abi')!r} (this runtime has ABI "
                        f"{tvm_dispatch.ABI}: the functions the library calls take other arguments)")
    if problems:
        raise ArtifactError("TVM library was built for " + " and ".join(problems)
                            + "; recompile the model on this machine")


_pool = threading.local()  # .threads: what this thread's TVM pool was last sized to (TVM's pools are per thread)
_SHARE_ALL_CORES = -3  # TVM's AffinityMode kSpecifyThreadShareAllCore: its threads float over the given cores


def _size_tvm_pool() -> None:
    """The calling thread's TVM pool: the caller's PyTorch thread count (``threads.caller_threads``, at most the
    process's cores) while the program runs PyTorch on one thread, else one thread (see the module docstring);
    nothing when ``TVM_NUM_THREADS`` is set. Resizing costs ~2-7 us."""
    if "TVM_NUM_THREADS" in os.environ:
        return
    cores = sorted(os.sched_getaffinity(0))
    want = min(caller_threads(), len(cores)) if torch.get_num_threads() == 1 else 1
    if getattr(_pool, "threads", None) != want:
        tvm.get_global_func("runtime.config_threadpool")(_SHARE_ALL_CORES, want, [str(c) for c in cores])
        _pool.threads = want


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous, 64-byte aligned tensor (a copy only when it is not one already).

    TVM's generated code assumes 64-byte aligned buffers and ``from_dlpack``
    refuses others; safetensors' memory-mapped weights are often misaligned.
    """
    t = t.contiguous()
    return t if t.data_ptr() % _ALIGNMENT == 0 else t.clone()


class TvmVmKernel:
    def __init__(self, spec: dict, library_path: str, weights: dict[str, torch.Tensor]):
        if spec.get("format") != FORMAT:
            raise ArtifactError(f"spec has format {spec.get('format')!r}, expected {FORMAT!r}")
        check_compatible(spec)
        missing = [name for name in spec["weights"] if name not in weights]
        if missing:
            raise ArtifactError(f"TVM library needs weights that were not given: {', '.join(missing)}")
        tvm_dispatch.register()
        try:
            library = tvm.runtime.load_module(library_path)
        except Exception as e:
            raise ArtifactError(f"cannot load TVM library {library_path}: {e}") from e
        self._library, self._entry = library, spec["entry"]
        self._per_thread = threading.local()
        self._main()  # the loading thread's VM: a missing entry function fails here, not at the first call
        # The VM keeps DLPack views, so the tensors must stay alive.
        self._weights = [_aligned(weights[name]) for name in spec["weights"]]
        self._bound = [tvm.runtime.from_dlpack(w) for w in self._weights]
        # linear weights packed once here: bf16 for oneDNN, f32 for MKL or oneDNN at a row count (tvm_dispatch)
        index = {name: i for i, name in enumerate(spec["weights"])}
        tvm_dispatch.pack_bf16_weights([self._weights[index[name]] for name in spec.get("packed_bf16_weights", ())])
        for field, (_, pack) in tvm_dispatch.F32_PACKINGS.items():
            pack([(self._weights[index[name]], rows) for name, rows in spec.get(field, ())])
        self._inputs = [(tuple(i["shape"]), dtype_from_name(i["dtype"])) for i in spec["inputs"]]
        self.spec = spec

    def __call__(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != len(self._inputs):
            raise InputMismatchError(f"TVM kernel takes {len(self._inputs)} inputs, got {len(inputs)}")
        args = []
        for i, (x, (shape, dtype)) in enumerate(zip(inputs, self._inputs)):
            if x.shape != shape or x.dtype != dtype:
                raise InputMismatchError(f"input {i}: expected {dtype} {list(shape)}, got {x.dtype} {list(x.shape)}")
            args.append(tvm.runtime.from_dlpack(_aligned(x)))
        _size_tvm_pool()
        outs = self._main()(*args, *self._bound)
        return [torch.from_dlpack(o) for o in outs]

    def _main(self):
        """The entry function of this thread's own VM (made on the thread's first call; see the module docstring)."""
        try:
            return self._per_thread.main
        except AttributeError:
            vm = relax.VirtualMachine(self._library, tvm.cpu())
            self._per_thread.main = main = vm[self._entry]  # the function holds its VM
            return main


def load(entry: dict, files, weights: dict[str, torch.Tensor]):
    """The runtime loader of the ``tvm-vm`` format: the partition's library is its one file."""
    (library,) = entry["files"]
    kernel = TvmVmKernel(entry["spec"], files.path(library), weights)
    return lambda *inputs: kernel(list(inputs))
