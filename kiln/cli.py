"""The ``kiln`` command line: compile a model, run an artifact, inspect what each pass does.

    kiln compile FILE.py:FACTORY --target cpu -o DIR [--pipeline NAME] [--skip PASS ...] [--tune N] [--tuning-db PATH]
                 [--gemm-kernels {measure,mkl,onednn}]
    kiln run DIR [--repeat N]
    kiln inspect FILE.py:FACTORY --target cpu [--pipeline NAME] [--skip PASS ...] [--tune N] [--tuning-db PATH]
                 [--gemm-kernels {measure,mkl,onednn}] [--dump-dir D] [--tir KERNEL]

``FACTORY`` is a function in ``FILE.py`` that takes no arguments and returns
``(model, example_inputs)``. Every :class:`~kiln.errors.KilnError` is printed
as ``error: <message>`` with exit status 1 (whatever a factory raises or exits
with becomes a ``FactoryError``); usage errors exit with 2; Ctrl-C prints
``interrupted`` and exits with 130, as a shell reports a SIGINT.

``kiln run`` is the runtime side only. The compiler (``kiln.api``,
``kiln.passes``, ``kiln.backends``) is imported inside the commands that need
it, never at the top of this module, so running an artifact never loads it.
"""
from __future__ import annotations

import argparse
from collections import Counter
import difflib
import importlib.util
import logging
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .errors import FactoryError, KilnError

# Output that is not a terminal (a file, a pipe, a test) is not wrapped at 80 columns.
_PIPE_WIDTH = 200

# The names `kiln inspect --dump-dir` writes; only these are replaced in a folder it reuses.
_DUMP_FILE = re.compile(r"\d{3}_\w+\.(txt|diff)|graph\.(svg|html|dot)")


def main(argv: list[str] | None = None) -> int:
    """Run the ``kiln`` command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    out, err = _console(stderr=False), _console(stderr=True)
    logger = logging.getLogger("kiln")
    handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
    saved_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        args.command(args, out, err)
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the user stopped it: a traceback would only say where it was
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
    return 0


def _console(stderr: bool) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console.width = _PIPE_WIDTH
    return console


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: a compiler for PyTorch models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show kiln's debug log")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    factory_help = ("FILE.py:FACTORY, where FACTORY() returns (model: nn.Module, example_inputs: tuple); "
                    "a single tensor counts as a 1-tuple")

    p = commands.add_parser("compile", help="compile a model and save the artifact",
                            description="Trace a model, run the pass pipeline, lower it and save the artifact.")
    p.add_argument("factory", metavar="FILE.py:FACTORY", help=factory_help)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="artifact directory to write")
    _add_pipeline_options(p)
    p.set_defaults(command=_compile)

    p = commands.add_parser("run", help="run a saved artifact on its stored example inputs",
                            description="Load an artifact (without the compiler), run it on the example "
                                        "inputs stored in it, and time it.")
    p.add_argument("artifact", metavar="DIR", help="artifact directory written by `kiln compile`")
    p.add_argument("--repeat", type=_int_at_least(1), default=10, metavar="N",
                   help="timed runs after one warm-up run (default: 10)")
    p.add_argument("--trusted-key", action="append", metavar="FILE",
                   help="an ed25519 public key (raw 32 bytes or PEM); the artifact must be signed by one of "
                        "the keys given (repeatable)")
    p.add_argument("--trace", metavar="FILE.json",
                   help="write a timeline of every task of the warm-up and timed runs (queue, start, end) as Chrome "
                        "trace-event JSON, which Perfetto and chrome://tracing open")
    p.set_defaults(command=_run)

    p = commands.add_parser("inspect", help="show what every pass does to a model",
                            description="Run the pipeline with snapshots and eager drift checks; show per "
                                        "pass what changed, the time it took and the drift, then how "
                                        "each partition was lowered.")
    p.add_argument("factory", metavar="FILE.py:FACTORY", help=factory_help + "; or a saved artifact directory: its "
                   "programs' tasks, and with --timeline the timelines of a chunked prefill's orders")
    _add_pipeline_options(p)
    p.add_argument("--timeline", metavar="DIR",
                   help="(artifact with a scheduled chunked prefill) write the in-order and out-of-order timelines "
                        "as Chrome trace-event JSON: predicted from ScheduleBlocks' task costs, and measured here "
                        "on one prefill each")
    p.add_argument("--chunks", type=_int_at_least(1), default=4,
                   help="chunks of the prompt the timelines cover (default 4; at most the chain's longest)")
    p.add_argument("--dump-dir", metavar="D",
                   help="write the IR before and after every pass, diffs, and pictures of the final graph; "
                        "earlier dumps there are replaced")
    p.add_argument("--tir", metavar="KERNEL", help="print the TIR of one kernel named in the lowering report")
    p.set_defaults(command=_inspect)
    return parser


def _add_pipeline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="cpu", help="target to compile for (default: cpu)")
    p.add_argument("--pipeline", metavar="NAME", help="named pass pipeline (default: the target's own)")
    p.add_argument("--skip", nargs="+", action="extend", default=[], metavar="PASS",
                   help="passes of the pipeline not to run")
    p.add_argument("--tune", type=_int_at_least(0), default=0, metavar="N",
                   help="tune the cpu target's TIR kernels with MetaSchedule, N measured trials in total "
                        "(default 0: no tuning; expect minutes for hundreds of trials)")
    p.add_argument("--tuning-db", metavar="PATH",
                   help="reuse a tuning database: a kiln artifact compiled with --tune, or a MetaSchedule "
                        "database directory; its kernels are applied, not tuned again")
    p.add_argument("--quantize", type=_plans, metavar="PLAN=BITS,...",
                   help="nested weight quantization with these bit-width plans, the first the default: "
                        "an integer gives every layer group those bits (w4=4), a number with a point is an "
                        "average-bit budget allocated by measured sensitivity (mixed=4.5); e.g. w8=8,mixed=4.5,w2=2")
    p.add_argument("--int8", nargs="?", const="", type=_int8_options, metavar="KEY=VALUE,...",
                   help="int8 linears (w8a8, static per-tensor activation scales calibrated on the example inputs) "
                        "with their activation outlier channels in float beside them (extract_outliers); optional "
                        "kiln.Int8Quantization fields, e.g. threshold=6,max_fraction=0.01,float_path=all "
                        "(float_path: auto, all, none or layer names joined by +; exclude: names joined by +)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: GEMMs and attention in bf16 where the CPU has bf16 units (AMX / AVX512-BF16), norms, "
                        "softmax and the rest in fp32 (lower_precision); fp32 (default): the model's own dtype")
    p.add_argument("--gemm-kernels", choices=("measure", "mkl", "onednn"), default="measure",
                   help="cpu target: each GEMM's kernel; measure (default): the fastest of MKL, MKL in column "
                        "blocks and oneDNN, timed per shape here; mkl: eager's kernel only (bitwise eager GEMMs); "
                        "onednn: oneDNN wherever it applies")


def _plans(text: str) -> dict:
    plans = {}
    for item in text.split(","):
        name, sep, bits = item.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"{item!r} is not PLAN=BITS (e.g. w4=4 or mixed=4.5)")
        try:
            plans[name.strip()] = float(bits) if "." in bits else {"default": int(bits)}
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: {bits!r} is not a number of bits") from None
    return plans


_INT8_FIELDS = {"threshold": float, "ratio": float, "max_fraction": float, "min_gain": float,
                "float_path": lambda v: v if v in ("auto", "all", "none") else tuple(v.split("+")),
                "exclude": lambda v: tuple(v.split("+"))}


def _int8_options(text: str) -> dict:
    """``--int8``'s ``KEY=VALUE,...``: keyword arguments of kiln.Int8Quantization (checked there)."""
    fields = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _INT8_FIELDS:
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE with KEY one of {', '.join(_INT8_FIELDS)}")
        try:
            fields[key] = _INT8_FIELDS[key](value.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: {value!r} is not a number") from None
    return fields


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value
    return parse


# ---- FILE.py:FACTORY ---------------------------------------------------------------------------

def load_factory(spec: str):
    """Import ``FILE.py`` and call ``FACTORY()``; returns ``(model, example_inputs)`` checked.

    Raises :class:`~kiln.errors.FactoryError` naming the file and factory for
    every way this can go wrong.
    """
    file, sep, name = spec.rpartition(":")
    if not sep or not file or not name:
        raise FactoryError(f"{spec!r} is not FILE.py:FACTORY: put a ':' between the file and the name of "
                           "the function that builds the model")
    path = Path(file)
    if not path.is_file():
        raise FactoryError(f"{path}: no such file")
    with _importable_siblings(path):
        module = _import_file(path)
        factory = getattr(module, name, None)
        if factory is None:
            defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                             and getattr(v, "__module__", None) == module.__name__)  # not what it imports
            raise FactoryError(f"{path} has no {name!r}; the callables it defines are: "
                               f"{', '.join(defined) or '(none)'}")
        if not callable(factory):
            raise FactoryError(f"{path}:{name} is not a function (it is of type {type(factory).__name__})")
        try:
            result = factory()
        except KeyboardInterrupt:
            raise
        except SystemExit as e:  # else kiln would exit with the factory's status and no word why
            raise FactoryError(f"factory {path}:{name} called {_exit_call(e)}") from None
        except BaseException as e:  # an Exception, or a library's own BaseException
            raise FactoryError(f"{path}:{name}() raised {type(e).__name__}: {e}") from e
    return _check_factory_result(result, f"{path}:{name}()")


def _exit_call(e: SystemExit) -> str:
    """The ``sys.exit(...)`` call that raised ``e``, as written."""
    return "sys.exit()" if e.code is None else f"sys.exit({e.code!r})"


@contextmanager
def _importable_siblings(path: Path):
    # As with `python FILE.py`, the file may import modules that sit next to it.
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)


def _import_file(path: Path):
    module_name = f"kiln_factory_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise FactoryError(f"{path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses and pytree registration look their module up by name.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:  # as for the factory's call, in load_factory
        sys.modules.pop(module_name, None)
        if isinstance(e, KeyboardInterrupt):
            raise
        if isinstance(e, SystemExit):
            raise FactoryError(f"importing {path} called {_exit_call(e)}") from None
        raise FactoryError(f"importing {path} raised {type(e).__name__}: {e}") from e
    return module


def _check_factory_result(result, where: str):
    import torch

    if isinstance(result, tuple) and len(result) == 2:
        model, inputs = result
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        if isinstance(model, torch.nn.Module) and isinstance(inputs, tuple):
            return model, inputs
    raise FactoryError(f"{where} returned {_describe(result)}; it must return "
                       "(model: nn.Module, example_inputs: tuple)")


def _describe(value) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(type(v).__name__ for v in value) + ("," if len(value) == 1 else "") + ")"
    return type(value).__name__


# ---- kiln compile ------------------------------------------------------------------------------

def _compile(args, out: Console, err: Console) -> None:

    compilation = _compilation(args)
    model, inputs = load_factory(args.factory)
    start = time.perf_counter()
    with err.status(f"tracing {type(model).__name__}") as status:
        compilation.trace(model, inputs)
        compilation.optimize([_progress(status)])
        status.update(f"lowering, tuning {args.tune} trials" if args.tune else "lowering")
        compiled = compilation.lower()
        status.update(f"writing {args.output}")
        path = compiled.save(args.output)
    seconds = time.perf_counter() - start

    m = compiled.manifest
    passes = ", ".join(_pass_summary(r) for r in m["passes"]) or "(none)"
    partitions = ", ".join(f"{p['name']} ({p['backend']}, {p['format']})" for p in m["partitions"])
    files = [f for f in path.iterdir() if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    tuning = [p["report"]["tuning"] for p in m["partitions"] if "tuning" in (p.get("report") or {})]
    tuned = (f"\n  tuning      {sum(t['trials_run'] for t in tuning)} trials run, "
             f"{sum(t['tuned'] for t in tuning)} kernels tuned, {sum(t['from_database'] for t in tuning)} "
             f"from the database, {sum(t['applied'] for t in tuning)} of {sum(t['tasks'] for t in tuning)} "
             "applied" if tuning else "")
    out.print(Text(f"compiled {m['model']} for {m['target']} in {seconds:.2f} s\n"
                   f"  passes      {passes}\n"
                   f"  partitions  {partitions}{tuned}\n"
                   f"  artifact    {path} ({_size(size)} in {_count(len(files), 'file')})"))


def _compilation(args):
    """The compilation the command line asks for; unknown target, pipeline and pass
    names are reported here, before the model is built (often the slowest step)."""
    from . import api
    from .backends.cpu import CpuOptions

    cpu = CpuOptions(tune_trials=args.tune, tuning_database=args.tuning_db, gemm_kernels=args.gemm_kernels)
    quantization = api.NestedQuantization(plans=args.quantize) if args.quantize else None
    int8 = api.Int8Quantization(**args.int8) if args.int8 is not None else None
    options = api.CompileOptions(pipeline=args.pipeline, skip_passes=tuple(args.skip), backend_options={"cpu": cpu},
                                 quantization=quantization, int8=int8, precision=args.precision)
    return api.Compilation(args.target, options=options)


def _pass_summary(record: dict) -> str:
    if record["skipped"]:
        return f"{record['name']} (skipped)"
    counts = [f"{sign}{record[k]}" for sign, k in (("+", "added"), ("-", "removed"), ("~", "rewritten"))
              if record[k]]
    if record.get("annotated"):
        counts.append(f"{record['annotated']} annotated")
    return f"{record['name']} ({' '.join(counts) if counts else 'no change'})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _progress(status):
    """An instrument that shows the running pass on a rich status line."""
    from .passes import Instrument  # compile side only: see the module docstring

    class ShowProgress(Instrument):
        def before_pipeline(self, graph, ctx):
            status.update(f"optimising {graph.name}")

        def before_pass(self, graph, pass_, ctx):
            status.update(f"pass {pass_.name}")

    return ShowProgress()


# ---- kiln run ----------------------------------------------------------------------------------

def _run(args, out: Console, err: Console) -> None:
    from contextlib import nullcontext

    import torch
    from torch.utils import _pytree as pytree

    from .runtime import load
    from .timing import median_ms

    keys = None
    if args.trusted_key:
        try:
            keys = [Path(f).read_bytes() for f in args.trusted_key]
        except OSError as e:
            raise KilnError(f"cannot read the trusted key {e.filename}: {e.strerror}") from None
    with err.status(f"loading {args.artifact}"):
        compiled = load(args.artifact, trusted_keys=keys)
    compiled = getattr(compiled, "model", compiled)  # an LLM: its CompiledModel (default program: decode)
    if compiled.example_inputs is None:
        raise KilnError(f"{args.artifact} holds no example inputs to run on "
                        "(it was compiled with keep_example_inputs=False)")
    call_args, call_kwargs = pytree.tree_unflatten(list(compiled.example_inputs), compiled.signature.in_spec)
    emulated = any(p["format"] == "npu-emulated" for p in compiled.manifest["partitions"])
    if emulated:
        from .runtime import npu

        npu.reset()
    with err.status(f"running {args.artifact}"):
        outputs = compiled(*call_args, **call_kwargs)
        with compiled.tracing() if args.trace else nullcontext() as trace:
            ms = median_ms({"kiln": lambda: compiled(*call_args, **call_kwargs)}, repeat=args.repeat,
                           warmup=1)["kiln"]

    m = compiled.manifest
    queues = compiled.default_program.queues
    out.print(Text(f"{m['model']} for {m['target']}: {_count(len(m['partitions']), 'task')} on "
                   f"{_count(len(queues), 'queue')} ({', '.join(queues)}), "
                   f"{_count(len(compiled.example_inputs), 'example input')}"))
    table = Table(title="outputs", title_justify="left")
    for column in ("output", "shape", "dtype"):
        table.add_column(column)
    for path, leaf in pytree.tree_flatten_with_path(outputs)[0]:
        name = pytree.keystr(path) or "output"
        if isinstance(leaf, torch.Tensor):
            table.add_row(Text(name), Text(str(tuple(leaf.shape))), Text(str(leaf.dtype).removeprefix("torch.")))
        else:
            table.add_row(Text(name), Text(repr(leaf)), Text(type(leaf).__name__))
    out.print(table)
    out.print(Text(f"median wall-clock time of {args.repeat} runs: {ms:.3f} ms"
                   + (" (measured here; the npu tasks emulated on this CPU)" if emulated else "")))
    if emulated:
        out.print(Text(npu.summary() + " (modeled times: the cost model's device, not this machine)"))
    if args.trace:
        try:
            trace.save(args.trace)
        except OSError as e:
            raise KilnError(f"cannot write the trace {args.trace}: {e.strerror}") from None
        out.print(Text(f"wrote the trace of {len(trace.events)} tasks to {args.trace} "
                       "(open it in https://ui.perfetto.dev or chrome://tracing)"))


# ---- kiln inspect ------------------------------------------------------------------------------

def _inspect(args, out: Console, err: Console) -> None:
    from .passes import Drift, Snapshot

    if Path(args.factory).is_dir():
        return _inspect_artifact(args, out, err)
    if args.timeline:
        raise KilnError("--timeline reads a saved artifact with a scheduled chunked prefill: give its directory "
                        "(compile_llm(..., chunk_size=C, schedule=...), then .save(DIR))")

    compilation = _compilation(args)
    model, inputs = load_factory(args.factory)
    name = type(model).__name__
    with err.status(f"running {name} eagerly") as status:
        reference = _eager_outputs(model, inputs)
        status.update(f"tracing {name}")
        graph = compilation.trace(model, inputs)
        flat_inputs = compilation.flat_inputs
        traced_drift = _traced_drift(graph, flat_inputs, reference)
        snapshot = Snapshot()
        records = compilation.optimize([snapshot, Drift(flat_inputs, reference), _progress(status)])
        status.update("lowering")
        compiled = compilation.lower()

    out.print(_pass_table(graph, records, traced_drift))
    for table in _notes_tables(records):
        out.print(table)
    for r in records:
        if r.name == "extract_outliers" and r.stats.get("int8"):
            out.print(_int8_table(r.stats))
    if compiled.manifest.get("quantization"):
        for table in _quantization_tables(compiled, flat_inputs, reference):
            out.print(table)
    for entry in compiled.manifest["partitions"]:
        out.print(_partition_tree(entry))
    if args.dump_dir:
        with err.status(f"writing {args.dump_dir}"):
            written = _write_dumps(Path(args.dump_dir), snapshot.initial, records, graph)
        out.print(Text(f"wrote {len(written)} files to {args.dump_dir}"))
    if args.tir:
        out.print(Text(_tir(compilation.lowered, compiled.manifest, args.tir)))


def _inspect_artifact(args, out: Console, err: Console) -> None:
    """A saved artifact: each program's tasks (queue, backend, modeled time); a chunked prefill's timelines."""
    import json
    import os

    import torch

    from . import load
    from .passes.schedule_blocks import chain_dag, in_order_schedule, list_schedule
    from .runtime.chain import IN_ORDER, SCHEDULED

    model = load(args.factory)
    compiled = getattr(model, "model", model)
    for name, program in compiled.programs.items():
        table = Table(title=f"program {name}: {len(program.entry['tasks'])} tasks on {', '.join(program.queues)}")
        for col in ("task", "queue", "backend", "modeled us"):
            table.add_column(col)
        for t in program.entry["tasks"]:
            us = t["report"].get("modeled_us")
            table.add_row(t["name"], t["queue"], t["backend"], "" if us is None else f"{us:.1f} (modeled)")
        out.print(table)
    if not args.timeline:
        return
    chain = getattr(model, "chain", None)
    if chain is None:
        raise KilnError(f"{args.factory} has no scheduled chunked prefill (compile_llm(..., chunk_size=C, "
                        "schedule='modeled' or 'measured'))")
    k = min(args.chunks, chain.max_steps)
    entry = model.chunk_graph.entry
    field = entry["chain"]
    costs, source = field["costs"]["us"], field["costs"]["source"]
    carry = {int(i): n for i, n in field["carry"]}
    dag = chain_dag(entry, carry, k, costs)
    folder = Path(args.timeline)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, schedule in (("in-order", in_order_schedule(dag, entry, field["costs"]["sync_us"])),
                            ("out-of-order", list_schedule(dag, field["costs"]["sync_us"]))):
        trace = schedule.to_trace(f"{label}, from {source} task costs")
        (folder / f"predicted-{label}.json").write_text(json.dumps(trace, indent=1))
        rows.append((f"predicted {label} ({source} costs)", schedule.makespan / 1e3))
    cores = {"npu0": [0], "cpu0": [1]} if len(os.sched_getaffinity(0)) >= 2 else None
    if cores and set(cores) == set(model.chunk_graph.queues):
        model.pin_queues(cores)
    prompt = torch.zeros(model.batch, k * model.chunk_size, dtype=torch.int64)  # the times do not depend on the ids
    for label, order in (("in-order", IN_ORDER), ("out-of-order", SCHEDULED)):
        model.prefill_order = order
        model.prefill(prompt)  # warm
        with compiled.tracing() as trace:
            model.prefill(prompt)
        trace.save(folder / f"measured-{label}.json")
        spans = [(s, e) for *_, s, e in trace.events]
        rows.append((f"measured {label} (this machine)", (max(e for _, e in spans) - min(s for s, _ in spans)) / 1e6))
    table = Table(title=f"chunked prefill of {k} chunks x {model.chunk_size} tokens; timelines in {folder} "
                        "(Perfetto / chrome://tracing)")
    table.add_column("order")
    table.add_column("ms", justify="right")
    for label, ms in rows:
        table.add_row(label, f"{ms:.2f}")
    out.print(table)
    out.print(Text("predicted times come from the task costs ScheduleBlocks used"
                   + (" (the npu cost model: modeled, not measured)" if source == "modeled" else
                      " (timed on the compiling machine)")
                   + (f"; measured: queues pinned {cores}" if cores else "; measured: queues unpinned")))


def _eager_outputs(model, inputs) -> list:
    import torch
    from torch.utils import _pytree as pytree

    from .ir.tracing import kv_cache_disabled

    # The tracer turns HF KV caches off; the reference must be the same computation.
    with torch.no_grad(), kv_cache_disabled(model, announce=False):
        try:
            outputs = model(*inputs)
        except Exception as e:
            raise KilnError(f"running {type(model).__name__} eagerly on the example inputs raised "
                            f"{type(e).__name__}: {e}") from e
    return pytree.tree_leaves(outputs)


def _traced_drift(graph, flat_inputs: list, reference: list) -> float:
    from .passes.instruments import max_abs_diff

    outputs = graph.run(flat_inputs)
    if len(outputs) != len(reference):
        raise KilnError(f"the traced graph returns {len(outputs)} values but the eager model {len(reference)}, "
                        "so their drift cannot be compared")
    return max_abs_diff(outputs, reference)


def _pass_table(graph, records: list, traced_drift: float) -> Table:
    table = Table(title=f"{graph.name}: {len(records)} passes", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("pass", no_wrap=True)
    table.add_column("time (ms)", justify="right")
    for column in ("added", "removed", "rewritten", "annotated"):
        table.add_column(column, justify="right")
    table.add_column("stats")
    table.add_column("drift vs eager", justify="right")
    table.add_row("", Text("(traced)"), "", "", "", "", "", "", _drift(traced_drift))
    for i, r in enumerate(records, 1):
        if r.skipped:
            table.add_row(str(i), Text(r.name), "skipped", "", "", "", "", "", "")
            continue
        # counts by reason ("refused_by_npu: <reason>") are listed per node in the notes tables below
        # (a report under a key, such as extract_outliers' layers, has its own table below)
        stats = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.stats.items()
                         if ": " not in k and not isinstance(v, (dict, list)))
        table.add_row(str(i), Text(r.name), f"{r.seconds * 1e3:.2f}", str(len(r.added)), str(len(r.removed)),
                      str(len(r.rewritten)), str(len(r.annotated)), Text(stats), _drift(r.extra.get("drift")))
    table.caption = f"{len(graph.compute_nodes())} compute nodes after the pipeline"
    return table


def _notes_tables(records: list) -> list[Table]:
    """A pass's per-node notes (the place pass: why each node did not go to the target's first backend)."""
    tables = []
    for r in records:
        if not r.notes:
            continue
        table = Table(title=f"pass {r.name}: notes on {len(r.notes)} nodes", title_justify="left")
        table.add_column("node", no_wrap=True)
        table.add_column("note")
        for node, note in r.notes.items():
            table.add_row(Text(node), Text(note))
        tables.append(table)
    return tables


def _int8_table(stats: dict) -> Table:
    """extract_outliers' report: per int8 linear, its outlier channels on the float path and its activation scale."""
    table = Table(title="int8 linears (extract_outliers): activation outlier channels on the float path",
                  title_justify="left")
    for column in ("layer", "node", "K", "threshold", "x_scale", "float channels", "rel. error int8 / +outliers",
                   "float path"):
        table.add_column(column, no_wrap=column in ("layer", "node"),
                         justify="right" if column in ("K", "threshold", "x_scale") else "left")
    for module, e in stats["layers"].items():
        idx = e["float_channels"]
        shown = ", ".join(map(str, idx[:8])) + (f", ... ({len(idx)})" if len(idx) > 8 else "")
        errors = (f"{e['rel_error_plain']:.3g} / {e['rel_error_outliers']:.3g}" if "rel_error_plain" in e else "")
        table.add_row(Text(module), Text(e["node"]), str(e["in_features"]), f"{e['threshold']:.3g}",
                      f"{e['x_scale']:.4g}", Text(f"{len(idx)}: [{shown}]" if idx else "0"), errors,
                      Text(e["float_path"]))
    left = stats.get("left_float_names") or []
    table.caption = (f"{stats['float_channels']} of {stats['channels']} input channels on the float path "
                     f"({stats['float_fraction']:.2%}), in {stats['float_path']} of {stats['int8']} int8 linears; "
                     f"left float: {', '.join(left) or 'none'}")
    return table


def _quantization_tables(compiled, flat_inputs: list, reference: list) -> list[Table]:
    """quantize_nested's report: each plan's bits and its drift against eager; each layer's bytes and view errors."""
    from .passes.instruments import max_abs_diff

    report = compiled.manifest["quantization"]
    plans = Table(title="bit-width plans (the run-time control 'plan')", title_justify="left")
    plans.add_column("plan", no_wrap=True)
    plans.add_column("avg bits", justify="right")
    plans.add_column("bits per group")
    plans.add_column("drift vs eager", justify="right")
    for name, plan in report["plans"].items():
        outputs = compiled.run(list(flat_inputs), controls={"plan": name})
        groups = " ".join(f"{g}={b}" for g, b in plan["bits"].items())
        plans.add_row(Text(name + (" (default)" if name == report["default_plan"] else "")),
                      f"{plan['avg_bits']:.2f}", Text(groups), _drift(max_abs_diff(outputs, reference)))
    layers = Table(title="nested weights", title_justify="left")
    for column in ("node", "group", "shape", "views", "bytes (float)"):
        layers.add_column(column, no_wrap=column == "node")
    views = report["views"]
    for bits in views:
        layers.add_column(f"{bits}-bit: bytes read, rel. error", justify="right")
    for node, layer in report["layers"].items():
        cells = [Text(node), Text(layer["group"]), "x".join(map(str, layer["shape"])),
                 "/".join(map(str, layer["views"])), f"{_size(layer['bytes'])} ({_size(layer['float_bytes'])})"]
        for bits in views:
            key = str(bits)
            cells.append(f"{_size(layer['bytes_read'][key])}, {layer['error'][key]['rel_rms']:.3g}"
                         if key in layer["error"] else "-")
        layers.add_row(*cells)
    total, float_total = sum(v["bytes"] for v in report["layers"].values()), \
        sum(v["float_bytes"] for v in report["layers"].values())
    layers.caption = (f"{_size(total)} held for every plan against {_size(float_total)} float "
                      f"({total / float_total:.1%}); left float: {', '.join(report['left_float']) or 'none'}")
    tables = [plans, layers]
    if "sensitivity" in report:
        sens = Table(title="sensitivity: the outputs' relative squared error, one group at a view, the rest float",
                     title_justify="left")
        sens.add_column("group", no_wrap=True)
        for bits in views:
            sens.add_column(f"{bits} bits", justify="right")
        for group, errors in report["sensitivity"].items():
            sens.add_row(Text(group), *(f"{errors[str(b)]:.3g}" for b in views))
        tables.append(sens)
    return tables


def _drift(value: float | None) -> str:
    if value is None:
        return ""
    return "0" if value == 0 else f"{value:.3g}"


def _partition_tree(entry: dict) -> Tree:
    tree = Tree(Text(f"partition {entry['name']}: backend {entry['backend']}, format {entry['format']}, "
                     f"{_count(len(entry['inputs']), 'input')}, {_count(len(entry['outputs']), 'output')}, "
                     f"{_count(len(entry['weights']), 'weight')}"))
    _add_report(tree, entry.get("report") or {})
    return tree


_HOW = {"dispatch": "ops sent to the library (PyTorch kernels)", "tir": "ops compiled to TIR kernels",
        "constant": "ops folded to constants at compile time"}


def _add_report(tree: Tree, report: dict) -> None:
    summarised = "nodes" in report  # per-op counts below already say what "dispatched" would
    for key, value in report.items():
        if key == "dispatched" and summarised:
            continue
        if key == "nodes" and isinstance(value, list) and all(isinstance(v, dict) and "how" in v for v in value):
            _add_node_summary(tree, value)
        elif key == "kernels" and isinstance(value, list) and all(isinstance(v, dict) for v in value):
            tuned = sum(1 for k in value if k.get("schedule") == "meta_schedule")
            recorded = sum(1 for k in value if k.get("tuning_database"))
            counts = (f", {tuned} tuned by MetaSchedule" if tuned else "") + \
                (f", {recorded} scheduled from the tuning database" if recorded else "")
            branch = tree.add(Text(f"TIR kernels ({len(value)}{counts}); print one with --tir KERNEL:"))
            for k in value:
                source = ", from the tuning database" if k.get("tuning_database") else ""
                branch.add(Text(f"{k['name']}  [{k.get('schedule', '?')}{source}]"))
        elif key == "gemm_kernels" and isinstance(value, list) and all(isinstance(v, dict) for v in value):
            branch = tree.add(Text(f"GEMM kernels ({len(value)} shapes; measured here, us per call):"))
            for g in value:
                measured = ", ".join(f"{k} {us:g}" for k, us in g.get("us", {}).items()) or "not measured"
                branch.add(Text(f"{g['gemm']} x{g['nodes']} -> {g['kernel']}  ({measured})"))
        elif isinstance(value, dict):
            _add_report(tree.add(Text(f"{key}:")), value)
        elif isinstance(value, (list, tuple)):
            tree.add(Text(f"{key} ({len(value)}): {', '.join(map(str, value))}"))
        else:
            tree.add(Text(f"{key}: {value}"))


def _add_node_summary(tree: Tree, nodes: list[dict]) -> None:
    """What happened to each op, grouped: e.g. ``aten.linear.default x15 -> kiln.linear``."""
    groups: dict[str, Counter] = {}
    for n in nodes:
        label = n["op"] + (f" -> {n['function']}" if n.get("function") else "")
        groups.setdefault(n["how"], Counter())[label] += 1
    for how, ops in groups.items():
        tree.add(Text(f"{_HOW.get(how, how)} ({sum(ops.values())}): "
                      + ", ".join(f"{op} x{count}" for op, count in sorted(ops.items()))))


def _tir(lowered: dict, manifest: dict, kernel: str) -> str:
    """The TIR text of ``kernel``, from the backends' in-memory ``details["tir"]``."""
    kernels: dict[str, str] = {}
    for part in lowered.values():
        kernels.update(part.details.get("tir", {}))
    if kernel in kernels:
        return kernels[kernel]
    if kernels:
        raise KilnError(f"no TIR kernel named {kernel!r}; the kernels are: {', '.join(sorted(kernels))}")
    backends = sorted({entry["backend"] for entry in manifest["partitions"]})
    raise KilnError(f"no TIR kernel named {kernel!r}: no partition was lowered to TIR kernels "
                    f"(backends used: {', '.join(backends) or 'none'})")


def _write_dumps(folder: Path, initial: str, records: list, graph) -> list[str]:
    """Write the snapshots, diffs and pictures of one inspection; returns the file names written."""
    from .ir import draw

    files = {"000_input.txt": initial}
    previous_name, previous = "000_input.txt", initial
    for i, r in enumerate(records, 1):
        ir = r.extra.get("ir")
        if ir is None:  # a skipped pass: nothing ran, nothing to show
            continue
        name = f"{i:03d}_{r.name}.txt"
        files[name] = ir
        diff = "".join(difflib.unified_diff(previous.splitlines(True), ir.splitlines(True), previous_name, name))
        if diff:
            files[f"{i:03d}_{r.name}.diff"] = diff
        previous_name, previous = name, ir
    files["graph.svg"] = draw.to_svg(graph)
    files["graph.html"] = draw.to_html(graph, f"kiln inspect: {graph.name} after the pipeline")
    files["graph.dot"] = draw.to_dot(graph)
    folder.mkdir(parents=True, exist_ok=True)
    # A stale snapshot of an earlier run (another pipeline) would read as part of this one.
    for old in folder.iterdir():
        if old.is_file() and _DUMP_FILE.fullmatch(old.name):
            old.unlink()
    for name, text in files.items():
        (folder / name).write_text(text)
    return list(files)
