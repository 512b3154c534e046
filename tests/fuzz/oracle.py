"""Run one case eagerly, through kiln and in fp64, and classify kiln's result.

Outcomes, best first:

- ``match``: kiln within the dtype's tolerance of eager, or at least as close
  to the fp64 result as eager is (within ``MARGIN``); NaN positions equal.
- ``eager_error``: eager raises and kiln raises too (``same_kind`` says
  whether kiln's exception is of eager's type or a KilnError).
- ``refused``: a KilnError (e.g. UnsupportedOpError): allowed, but it counts
  against the match rate.
- ``mismatch``: kiln is off, but so is eager against fp64 (no verdict).
- ``foreign``: kiln raised an exception that is not a KilnError.
- ``wrong``: kiln returned a value beyond tolerance of eager and of fp64
  while eager is within tolerance of fp64, or a value where eager raises.
- ``crash``: the process died or hung (decided by the runner, not here).
"""
from __future__ import annotations

import random
import time
import traceback
import warnings

import torch

import kiln
from kiln.errors import KilnError

from .generator import DTYPE_NAMES, Case, generate, reference

OUTCOMES = ("match", "eager_error", "refused", "mismatch", "foreign", "wrong", "crash")
BAD = ("mismatch", "foreign", "wrong", "crash")  # not a match, and not an allowed refusal
FAILING = ("foreign", "wrong", "crash")  # what the test subset rejects (a mismatch has no verdict)
MARGIN = 2.0  # kiln may be up to this many times eager's distance from fp64

# (rtol, atol) by dtype: torch.testing.assert_close's defaults, bf16 with atol 1e-2 (one bf16 step near 1).
TOLERANCES = {torch.float32: (1.3e-6, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (1e-3, 1e-5),
              torch.float64: (1e-7, 1e-7)}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES.get(dtype, (0.0, 0.0))  # integers and bools: exact


def violation(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> float:
    """max |actual - expected| / (atol + rtol |expected|): <= 1 is within tolerance. NaN equals NaN only."""
    a, e = actual.double(), expected.double()
    if a.shape != e.shape:
        return float("inf")
    if not a.numel():
        return 0.0
    nan_a, nan_e = a.isnan(), e.isnan()
    if (nan_a != nan_e).any():
        return float("inf")
    same = (a == e) | nan_a  # equal infinities too
    diff = (a - e).abs().masked_fill(same, 0.0)
    allowed = atol + rtol * e.abs().masked_fill(nan_e, 0.0)
    ratio = torch.where(diff == 0, 0.0, diff / allowed)  # x / 0 = inf for exact dtypes
    return float(ratio.max())


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| (inf where only one is NaN, or the shapes differ)."""
    a, e = actual.double(), expected.double()
    if a.shape != e.shape:
        return float("inf")
    if not a.numel():
        return 0.0
    if (a.isnan() != e.isnan()).any():
        return float("inf")
    diff = (a - e).abs().masked_fill((a == e) | a.isnan(), 0.0)
    return float(diff.max())


def worst_index(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> tuple[int, ...]:
    """The index of the element furthest out of tolerance (a NaN in only one of them first)."""
    a, e = actual.double(), expected.double()
    diff = (a - e).abs().masked_fill((a == e) | (a.isnan() & e.isnan()), 0.0)
    diff = diff.masked_fill(a.isnan() != e.isnan(), float("inf")) / (atol + rtol * e.abs().nan_to_num(0.0))
    flat = torch.tensor(int(diff.nan_to_num(0.0).argmax()))
    return tuple(int(i) for i in torch.unravel_index(flat, a.shape)) if a.dim() else ()


def _exception(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:400] if text else ''}"


def _where(e: BaseException) -> str:
    """The innermost frames of ``e``'s traceback inside kiln (where a foreign exception came from)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/kiln/" in f.filename]
    return "; ".join(f"{f.filename.split('/kiln/')[-1]}:{f.lineno} {f.name}" for f in frames[-2:])


def compare(eager, got, fp64) -> dict:
    """Classify kiln's outputs ``got`` against eager's; ``fp64()`` gives the fp64 outputs (None: not available),
    called only when kiln and eager differ."""
    if not isinstance(got, (tuple, list)) or len(got) != len(eager):
        what = f"{len(got)} outputs" if isinstance(got, (tuple, list)) else f"a {type(got).__name__}"
        return {"outcome": "wrong", "reason": f"kiln returned {what}, eager a tuple of {len(eager)}"}
    result = {"outcome": "match", "err_kiln_eager": 0.0, "err_eager_fp64": None, "err_kiln_fp64": None}
    worst, ref = 0, None
    for i, (e, k) in enumerate(zip(eager, got)):
        if not isinstance(k, torch.Tensor) or k.shape != e.shape or k.dtype != e.dtype:
            what = f"{list(k.shape)} {DTYPE_NAMES.get(k.dtype)}" if isinstance(k, torch.Tensor) else type(k).__name__
            return {**result, "outcome": "wrong",
                    "reason": f"output {i}: kiln gives {what}, eager {list(e.shape)} {DTYPE_NAMES.get(e.dtype)}"}
        rtol, atol = tolerance(e.dtype)
        result["err_kiln_eager"] = max(result["err_kiln_eager"], max_error(k, e))
        if violation(k, e, rtol, atol) <= 1:
            continue
        ref = fp64() if ref is None else ref
        r = ref[i] if ref else None
        if r is None:
            outcome = "wrong"
        else:
            kr, er = violation(k, r, rtol, atol), violation(e, r, rtol, atol)
            result["err_eager_fp64"] = max(result["err_eager_fp64"] or 0.0, max_error(e, r))
            result["err_kiln_fp64"] = max(result["err_kiln_fp64"] or 0.0, max_error(k, r))
            if kr <= max(1.0, MARGIN * er):
                continue  # as close to the exact result as eager is
            outcome = "wrong" if er <= 1 else "mismatch"
            if outcome == "mismatch":  # how many times further from fp64 kiln is than eager
                result["fp64_distance_ratio"] = round(max(result.get("fp64_distance_ratio", 0), kr / er), 2)
        rank = OUTCOMES.index(outcome)
        if rank > worst:
            worst = rank
            at = worst_index(k, e, rtol, atol)
            values = f"kiln {k[at].item():.6g}, eager {e[at].item():.6g}" + (
                f", fp64 {r[at].item():.6g}" if r is not None else "")
            result.update(outcome=outcome, reason=f"output {i} differs; worst at {list(at)}: {values}")
    return result


def _fallback(cm, target: str) -> list[str]:
    """The ops of the partitions that the cpu target sent to torch."""
    if target == "torch":
        return []
    ops = []
    for p in cm.manifest["partitions"]:
        if p["backend"] == "torch":
            ops += (p.get("report") or {}).get("ops", ["?"])
    return ops


def run_case(seed: int, target: str = "cpu") -> dict:
    """Generate the case for ``seed``, run it, and return its JSON-able record."""
    case = generate(seed)
    record = {"seed": seed, "target": target, "dtype": case.dtype, "ops": sorted(set(case.families)),
              "program": case.source()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record.update(_run(case, target))
    return record


def _spaced(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a larger buffer)."""
    base = torch.empty(*t.shape, 2, dtype=t.dtype)
    base[..., 0] = t
    return base[..., 0]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b).all())


def _run(case: Case, target: str) -> dict:
    # Run-time inputs: sometimes non-contiguous (kiln compiled with contiguous ones; the values are the same).
    spaced = random.Random(case.seed ^ 0x1A7E0).random() < 0.15
    layout = _spaced if spaced else torch.Tensor.clone
    out = {"noncontiguous_inputs": spaced}
    eager_exc = None
    try:
        eager = case.module(*map(layout, case.inputs))
    except Exception as e:  # noqa: BLE001
        eager_exc = e
    out["eager_exception"] = _exception(eager_exc) if eager_exc else None

    def raised(e: BaseException, stage: str) -> dict:
        info = {**out, "stage": stage, "exception": _exception(e), "where": _where(e)}
        if eager_exc is not None:
            same = isinstance(e, (type(eager_exc), KilnError))
            return {**info, "outcome": "eager_error", "same_kind": same}
        return {**info, "outcome": "refused" if isinstance(e, KilnError) else "foreign"}

    # Sometimes compile with one tensor given for two inputs of the same type (the run gets distinct ones):
    # the compiled program must not assume its inputs alias (torch.export traces them as one).
    compile_inputs = list(case.inputs)
    if random.Random(case.seed ^ 0xA11A5).random() < 0.1:
        pairs = [(i, j) for j, b in enumerate(compile_inputs) for i, a in enumerate(compile_inputs[:j])
                 if a.shape == b.shape and a.dtype == b.dtype]
        if pairs:
            i, j = pairs[0]
            compile_inputs[j] = compile_inputs[i]
            out["aliased_compile_inputs"] = [i, j]
    start = time.perf_counter()
    try:
        cm = kiln.compile(case.module, tuple(compile_inputs), target=target)
    except Exception as e:  # noqa: BLE001
        return raised(e, "compile")
    out["compile_s"] = round(time.perf_counter() - start, 3)
    out["fallback"] = _fallback(cm, target)
    args = list(map(layout, case.inputs))
    try:
        got = cm(*args)
    except Exception as e:  # noqa: BLE001
        return raised(e, "run")
    if eager_exc is not None:
        return {**out, "outcome": "wrong", "reason": "kiln returned a value where eager raises"}
    for i, (a, t) in enumerate(zip(args, case.inputs)):
        if not _same(a, t):
            return {**out, "outcome": "wrong", "reason": f"kiln wrote to input {case.module.input_names[i]}"}
    second = _second_call(case, cm, got)
    if second is not None:
        return {**out, **second}

    def fp64():
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # int / int and other promotions to float: float64 too
        try:
            module, inputs = reference(case)
            return module(*inputs)
        except Exception as e:  # noqa: BLE001
            out["fp64_exception"] = _exception(e)
            return ()
        finally:
            torch.set_default_dtype(default)
    return {**out, **compare(eager, got, fp64)}


def _second_call(case: Case, cm, got) -> dict | None:
    """Call again with other float inputs: the first call's outputs must stay as they were (not a reused buffer)."""
    if not isinstance(got, tuple) or not all(isinstance(g, torch.Tensor) for g in got):
        return None
    kept = [g.clone() for g in got]
    others = [-t if t.is_floating_point() else t.clone() for t in case.inputs]
    try:
        case.module(*others)
    except Exception:  # noqa: BLE001 - eager raises on these inputs: nothing to check
        return None
    try:
        cm(*others)
    except Exception as e:  # noqa: BLE001
        kind = "refused" if isinstance(e, KilnError) else "foreign"
        return {"outcome": kind, "stage": "second call", "exception": _exception(e), "where": _where(e)}
    for i, (g, k) in enumerate(zip(got, kept)):
        if not _same(g, k):
            return {"outcome": "wrong", "reason": f"output {i} of the first call changed when kiln was called again"}
    return None
