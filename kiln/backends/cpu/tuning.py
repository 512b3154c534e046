"""Optional offline tuning of a partition's TIR kernels with MetaSchedule.

GEMM-class ops and attention are dispatched to PyTorch kernels before this
stage (``dispatch.py``), so what MetaSchedule sees here are the fused TIR
kernels that remain: norms, softmax, activations, RoPE, copies. Tuning runs
between ``fuse`` and ``schedule``:

    fuse -> tune (this module) -> schedule (kiln's rules, only for what tuning did not schedule)

``tune_kernels`` extracts one task per distinct kernel, loads the records of a
starting database, tunes only the kernels that have no record there (within a
budget of ``trials`` measured candidates in total), measures kiln's own rule
schedule of each tuned kernel as one more record (so the faster wins), applies the best record of
every kernel the database now covers (``relax.transform.MetaScheduleApplyDatabase``,
which marks them ``tirx.is_scheduled`` so kiln's rules leave them alone), and
returns the database in MetaSchedule's JSON format (a workload file and a
tuning-record file, pruned to the best record per kernel) for the artifact.

Nothing here pickles or forks: MetaSchedule's ``local`` builder and runner
send work to worker processes with cloudpickle, so kiln uses an in-process
builder and runner instead (``_InProcessBuilder`` / ``_InProcessRunner``), and
the ``random`` cost model (the ``xgb`` one needs xgboost, which kiln does not
depend on, and saves its state with numpy pickles). Without a learned cost
model the search is ``ReplayTrace``: random samples of the design space.
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import linecache
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import relax, s_tir, tirx
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner, RunnerFuture, RunnerInput
from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture
from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common, run_evaluator_common

from ...errors import TuningError
from ..tvm.schedule import applied_rule
from .schedule import default_rules

log = logging.getLogger("kiln")

# The file names MetaSchedule's JSONDatabase uses in a work directory.
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"

# Candidates measured per search round, at most. MetaSchedule's default (64) would
# spend a small budget on a single kernel's first round.
TRIALS_PER_ROUND = 16


@dataclass
class TuningDatabase:
    """A MetaSchedule JSON database as bytes: the workload table and the tuning-record table."""

    workloads: bytes = b""
    records: bytes = b""

    def empty(self) -> bool:
        return not self.records.strip()


@dataclass
class Tuning:
    """What to tune in one lowering: ``trials`` measured candidates in total, starting from ``databases``."""

    trials: int = 0
    databases: tuple[TuningDatabase, ...] = ()  # their records are merged; kernels found there are not re-tuned

    def active(self) -> bool:
        return self.trials > 0 or any(not db.empty() for db in self.databases)


# The artifact files of one partition's database: (workloads, records).
def database_file_names(partition: str) -> tuple[str, str]:
    return f"{partition}.tuning.workloads.json", f"{partition}.tuning.records.json"


_WORKLOADS_SUFFIX, _RECORDS_SUFFIX = (n.removeprefix("p") for n in database_file_names("p"))


def read_tuning_databases(path: str | os.PathLike) -> tuple[TuningDatabase, ...]:
    """The databases stored at ``path``: a kiln artifact (every partition's), or a MetaSchedule work dir.

    An artifact is read with ``kiln.runtime.read_artifact``, so its files are
    verified against their sha256 first; a MetaSchedule directory holds
    ``database_workload.json`` and ``database_tuning_record.json`` (what
    ``tune_relax(work_dir=...)`` writes).
    """
    from ...runtime import read_artifact  # the compile side may read artifacts; never the other way round
    from ...runtime.artifact import MANIFEST

    folder = Path(path)
    if not folder.is_dir():
        raise TuningError(f"tuning_database {str(path)!r} does not exist or is not a directory "
                          "(give a kiln artifact directory or a MetaSchedule database directory)")
    if (folder / MANIFEST).is_file():
        artifact = read_artifact(folder)
        databases = []
        for name in sorted(artifact.files):
            if name.endswith(_WORKLOADS_SUFFIX):
                records = name.removesuffix(_WORKLOADS_SUFFIX) + _RECORDS_SUFFIX
                if records not in artifact.files:
                    raise TuningError(f"tuning_database {str(path)!r}: {name} has no matching {records}")
                databases.append(TuningDatabase(artifact.files[name], artifact.files[records]))
        if not databases:
            raise TuningError(f"tuning_database {str(path)!r} is a kiln artifact without a tuning database "
                              "(it was compiled without tune_trials)")
        return tuple(databases)
    workloads, records = folder / WORKLOAD_FILE, folder / RECORD_FILE
    if workloads.is_file() and records.is_file():
        return (TuningDatabase(workloads.read_bytes(), records.read_bytes()),)
    raise TuningError(f"tuning_database {str(path)!r} is neither a kiln artifact (no {MANIFEST}) nor a MetaSchedule "
                      f"database directory (no {WORKLOAD_FILE} and {RECORD_FILE})")


@dataclass
class TuningResult:
    """What tuning did to one partition."""

    tasks: list[str] = field(default_factory=list)  # every distinct TIR kernel (one task each)
    from_database: list[str] = field(default_factory=list)  # had a record in the starting database: not re-tuned
    tuned: list[str] = field(default_factory=list)  # got a valid record from this run's trials
    applied: list[str] = field(default_factory=list)  # kernels (functions) scheduled from the database
    kept_rule: list[str] = field(default_factory=list)  # of those, where kiln's rule measured faster than tuning
    # per kernel tuned in this run: microseconds of kiln's rule schedule and of the best candidate, as measured
    kernel_us: dict[str, dict[str, float | None]] = field(default_factory=dict)
    trials: int = 0  # candidates measured in this run
    database: TuningDatabase = field(default_factory=TuningDatabase)

    def report(self) -> dict:
        return {"trials_run": self.trials, "tasks": len(self.tasks), "tuned": len(self.tuned),
                "from_database": len(self.from_database), "applied": len(self.applied),
                "kept_rule": len(self.kept_rule), "kernel_us": self.kernel_us}


def tune_kernels(mod: tvm.IRModule, target: tvm.target.Target, tuning: Tuning) -> tuple[tvm.IRModule, TuningResult]:
    """Tune and apply; ``mod`` is the Relax module after ``fuse`` (kernels not yet scheduled).

    Returns the module with every kernel the database covers scheduled by its
    best record, and what happened. ``tuning.trials == 0`` only applies the
    starting database.
    """
    result = TuningResult()
    _import_tensor_intrinsics()
    with tempfile.TemporaryDirectory(prefix="kiln-tune-") as work_dir:
        database = _load(work_dir, tuning.databases, target)
        tasks = ms.relax_integration.extract_tasks(mod, target)
        result.tasks = [t.task_name for t in tasks]
        todo = []
        for task in tasks:
            if _best(database, task.dispatched[0], target) is not None:
                result.from_database.append(task.task_name)  # reuse: never tuned again
            else:
                todo.append(task)
        if tuning.trials > 0 and todo:
            runner = _InProcessRunner()
            try:
                _tune(todo, target, work_dir, tuning.trials, database, runner)
            finally:
                _BUILT.clear()  # candidates built but never measured (a round cut short by an error)
            result.trials = runner.measured
            result.tuned = [t.task_name for t in todo if _best(database, t.dispatched[0], target) is not None]
            # kiln's own schedule competes with the candidates, so tuning never makes a kernel slower.
            tuned = [t for t in todo if t.task_name in result.tuned]
            candidates = {t.task_name: _mean_us(_best(database, t.dispatched[0], target)) for t in tuned}
            rules = _add_rule_baselines(tuned, target, database, runner)
            result.kernel_us = {name: {"rule": rules.get(name), "meta_schedule": us} for name, us in candidates.items()}
        before = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
        with target, database:
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        result.applied = sorted(name for name, f in before.items()
                                if not mod[name].same_as(f) and _is_scheduled(mod[name]))
        result.kept_rule = [name for name in result.applied if applied_rule(mod[name]) is not None]
        result.database = _dump(database, work_dir)
    log.info("kiln: tuning: %d kernels, %d from the database, %d tuned in %d trials, %d applied "
             "(%d of them kiln's rule, measured faster)", len(result.tasks), len(result.from_database),
             len(result.tuned), result.trials, len(result.applied), len(result.kept_rule))
    return mod, result


def _import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (MetaSchedule imports it in TuneContext and its builder) fast.

    It parses ~250 TVMScript functions, and each parse calls ``inspect.stack()``,
    which for every frame of the import machinery (``<frozen importlib...>``, not a
    file) scans all of ``sys.modules``: with torch loaded that import took 90 s here,
    3.5 s with this. The replacement reads the same frames and source lines
    (``linecache``, what ``inspect`` itself reads) without resolving modules; it is in
    place only for this one import.
    """
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return

    def stack(context: int = 1) -> list[inspect.FrameInfo]:
        frames, frame = [], sys._getframe(1)
        while frame is not None:
            filename, lineno = frame.f_code.co_filename, frame.f_lineno
            line = linecache.getline(filename, lineno) if context > 0 else ""
            frames.append(inspect.FrameInfo(frame, filename, lineno, frame.f_code.co_name,
                                            [line] if line else None, 0 if line else None, positions=None))
            frame = frame.f_back
        return frames

    original = inspect.stack
    inspect.stack = stack
    try:
        importlib.import_module("tvm.s_tir.tensor_intrin")
    finally:
        inspect.stack = original


def _mean_us(record) -> float | None:
    if record is None or not record.run_secs:
        return None
    return round(sum(float(t) for t in record.run_secs) / len(record.run_secs) * 1e6, 2)


def _add_rule_baselines(tasks, target: tvm.target.Target, database: ms.Database,
                        runner: "_InProcessRunner") -> dict[str, float]:
    """Measure kiln's rule schedule of each task like a candidate and commit it as a record.

    MetaSchedule's best record then is the faster of its candidates and kiln's
    rule: a small budget sampled at random often finds nothing better than the
    hand-written rules (RowReduction's rfactor'd sums), and applying it anyway
    would make tuning a slowdown. The rule's schedule is traced like any other,
    so its record replays (with its ``kiln.schedule_rule`` annotation) on reuse.
    Not counted as a trial. Returns the rule's microseconds per kernel.
    """
    measured = {}
    for task in tasks:
        workload_mod = task.dispatched[0]
        func = workload_mod["main"]
        sch = None
        for rule in default_rules():
            sch = rule.apply(func, target, False)
            if sch is not None:
                break
        if sch is None:
            continue  # no rule takes it: kiln would leave it unscheduled, any candidate is better
        try:
            # The record must replay from its JSON form, as it will on reuse.
            replayed = s_tir.Schedule(workload_mod)
            s_tir.Trace.apply_json_to_schedule(sch.trace.as_json(), replayed)
            args_info = ms.arg_info.ArgInfo.from_prim_func(func)
            costs = runner.time(ms.builder.local_builder.default_build(replayed.mod, target, None), args_info)
        except Exception as e:  # noqa: BLE001 - no baseline: the tuned schedule stands, as without this step
            log.debug("kiln: tuning: no baseline for %s: %s", task.task_name, str(e).splitlines()[0] if str(e) else e)
            continue
        database.commit_tuning_record(ms.database.TuningRecord(
            replayed.trace, database.commit_workload(workload_mod), costs, target, args_info))
        measured[task.task_name] = round(sum(costs) / len(costs) * 1e6, 2)
    return measured


def _is_scheduled(func) -> bool:
    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", 0))


def _best(database: ms.Database, mod: tvm.IRModule, target: tvm.target.Target):
    # Only this target's records are in the database (_load); get_top_k skips failed runs.
    if not database.has_workload(mod):
        return None
    records = database.get_top_k(database.commit_workload(mod), 1)
    return records[0] if records else None


def _load(work_dir: str, sources: tuple[TuningDatabase, ...], target: tvm.target.Target) -> ms.Database:
    """A JSON database in ``work_dir`` holding the records of ``sources`` that were tuned for ``target``.

    Records are re-committed one by one (not the files copied): that merges several
    databases (one per partition of an artifact), reports a malformed file here as
    kiln's error rather than deep inside tuning, and drops records tuned for another
    CPU (another ``mcpu`` or core count), which would be re-tuned here rather than
    applied blindly.
    """
    database = ms.database.JSONDatabase(work_dir=work_dir, module_equality="structural")
    skipped = set()
    for i, source in enumerate(sources):
        if source.empty():
            continue
        source_dir = os.path.join(work_dir, f"start{i}")
        os.makedirs(source_dir)
        with open(os.path.join(source_dir, WORKLOAD_FILE), "wb") as f:
            f.write(source.workloads)
        with open(os.path.join(source_dir, RECORD_FILE), "wb") as f:
            f.write(source.records)
        try:
            records = ms.database.JSONDatabase(work_dir=source_dir, allow_missing=False).get_all_tuning_records()
        except Exception as e:  # noqa: BLE001 - TVM raises ValueError/TVMError/InternalError for bad JSON
            message = str(e).strip().splitlines()
            raise TuningError("the tuning database is not a readable MetaSchedule JSON database: "
                              f"{message[-1] if message else type(e).__name__}") from None
        for record in records:
            if str(record.target) != str(target):
                skipped.add(str(record.target))
                continue
            workload = database.commit_workload(record.workload.mod)
            database.commit_tuning_record(ms.database.TuningRecord(
                record.trace, workload, record.run_secs, record.target, record.args_info))
    if skipped:
        log.warning("kiln: tuning database: ignored records tuned for %s (this target is %s)",
                    ", ".join(sorted(skipped)), target)
    return database


def _dump(database: ms.Database, work_dir: str) -> TuningDatabase:
    """The best record of every kernel, as a fresh pair of JSON files."""
    out_dir = os.path.join(work_dir, "out")
    os.makedirs(out_dir)
    pruned = ms.database.JSONDatabase(work_dir=out_dir)
    database.dump_pruned(pruned)
    files = []
    for name in (WORKLOAD_FILE, RECORD_FILE):
        path = os.path.join(out_dir, name)
        files.append(open(path, "rb").read() if os.path.exists(path) else b"")
    return TuningDatabase(*files)


def _tune(tasks, target, work_dir: str, trials: int, database: ms.Database, runner: "_InProcessRunner") -> None:
    # MetaSchedule's per-task loggers write a progress table per round; kiln logs one
    # summary line instead and keeps theirs for warnings (-v does not turn them on).
    quiet = logging.getLogger("kiln.tuning.meta_schedule")
    quiet.setLevel(logging.WARNING)
    contexts = [
        ms.TuneContext(
            mod=task.dispatched[0], target=target, space_generator="post-order-apply",
            # Random samples of the design space: with no learned cost model (see the module
            # docstring) evolutionary search would rank its population at random anyway, after
            # building hundreds of schedules per round.
            search_strategy=ms.search_strategy.ReplayTrace(max_fail_count=16),
            task_name=task.task_name, logger=quiet, rand_state=seed, num_threads=1,
        ).clone()
        for task, seed in zip(tasks, range(1, len(tasks) + 1))  # fixed seeds: repeatable runs
    ]
    ms.tune.tune_tasks(
        tasks=contexts,
        task_weights=[float(t.weight) for t in tasks],
        work_dir=work_dir,
        max_trials_global=trials,
        max_trials_per_task=trials,
        # The scheduler first gives every task one round: a budget smaller than
        # tasks x TRIALS_PER_ROUND is spread over the kernels instead of spent on the first.
        num_trials_per_iter=max(1, min(TRIALS_PER_ROUND, trials // len(tasks))),
        builder=_InProcessBuilder(trials),
        runner=runner,
        database=database,
        cost_model="random",
        # The default list adds RemoveBuildArtifact, which deletes the build's directory;
        # builds here are in memory (the runner drops each once measured).
        measure_callbacks=[ms.measure_callback.AddToDatabase(), ms.measure_callback.UpdateCostModel()],
        task_scheduler="gradient",
    )


# Built modules waiting to be measured, by the key the builder hands the runner as
# its "artifact path". In memory: nothing is exported, linked or sent to a process.
_BUILT: dict[str, tvm.runtime.Module] = {}
_KEYS = itertools.count()


@derived_object
class _InProcessBuilder(PyBuilder):
    """Builds each candidate with MetaSchedule's ``default_build`` in this process.

    It also holds the trial budget: MetaSchedule's task scheduler checks its global
    limit only between rounds, so a round may overshoot it; candidates past the
    budget are refused here (a failed build, never measured).
    """

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        results = []
        for build_input in build_inputs:
            if self.budget <= 0:
                results.append(BuilderResult(None, "kiln: over the trial budget"))
                continue
            self.budget -= 1
            try:
                module = ms.builder.local_builder.default_build(build_input.mod, build_input.target, None)
            except Exception as e:  # noqa: BLE001 - a candidate that fails to build is a failed trial, not a failed compile
                results.append(BuilderResult(None, f"kiln in-process builder: {type(e).__name__}: {e}"))
                continue
            key = f"kiln-in-process:{next(_KEYS)}"
            _BUILT[key] = module
            results.append(BuilderResult(key, None))
        return results


@derived_object
class _InProcessRunner(PyRunner):
    """Times each built candidate in this process (random inputs, TVM's ``time_evaluator``)."""

    def __init__(self) -> None:
        super().__init__()
        # Few, short timings: the kernels are memory-bound microseconds; 3 runs of
        # >= 20 ms each rank candidates well enough and keep a trial ~0.1 s.
        self.config = EvaluatorConfig(number=1, repeat=3, min_repeat_ms=20, enable_cpu_cache_flush=False)
        self.measured = 0

    def run(self, runner_inputs: list[RunnerInput]) -> list[RunnerFuture]:
        futures = []
        for runner_input in runner_inputs:
            module = _BUILT.pop(str(runner_input.artifact_path), None)
            self.measured += 1
            if module is None:
                futures.append(LocalRunnerFuture(error_message="kiln in-process runner: no built module"))
                continue
            try:
                futures.append(LocalRunnerFuture(res=self.time(module, runner_input.args_info)))
            except Exception as e:  # noqa: BLE001 - a candidate that fails to run is a failed trial
                futures.append(LocalRunnerFuture(error_message=f"kiln in-process runner: {type(e).__name__}: {e}"))
        return futures

    def time(self, module: tvm.runtime.Module, args_info) -> list[float]:
        """Seconds per call of ``module`` on random arguments shaped like ``args_info``."""
        fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure")
        device = tvm.runtime.device("cpu", 0)
        args = alloc_argument_common(fill, device, [a.as_json() for a in args_info], 1)
        return run_evaluator_common(module, device, self.config, args)
