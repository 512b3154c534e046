"""Seeded random programs: small ``nn.Module``s (1-6 ops) over the ops kiln's targets lower.

``generate(seed)`` is a pure function of the seed. The seed picks the case's
first op from ``PRIMARY`` (``seed % len(PRIMARY)``, so any run of consecutive
seeds covers every op family evenly), its dtype, shapes and constants; then up
to five more ops are applied to the values made so far (a short chain or DAG).
Each step is run eagerly while the program is built, so later steps see real
shapes, and a step that raises in eager ends the program (an ``eager_error``
case: kiln must raise too).

The module's forward replays the steps; casts to a floating dtype go through
``FuzzModule.float_as`` so that the fp64 reference (``reference(case)``) stays in
float64 throughout.
"""
from __future__ import annotations

import copy
import math
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

FLOAT, INT, BOOL = "float", "int", "bool"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int64: "int64", torch.int32: "int32",
               torch.bool: "bool", torch.float64: "fp64"}
DIMS = (1, 2, 3, 4, 5, 7, 8, 11, 16)
WIDE = (32, 64, 128, 33)  # rows long enough for vectorized / tiled schedules, in some cases
MAX_NUMEL = 50_000


def kind(t: torch.Tensor) -> str:
    return BOOL if t.dtype == torch.bool else FLOAT if t.is_floating_point() else INT


class Skip(Exception):
    """A recipe does not apply to the value it was offered."""


@dataclass
class Step:
    out: str
    args: tuple[str, ...]
    fn: Callable
    src: str
    family: str


class FuzzModule(nn.Module):
    """Replays a list of steps; each step's fn is ``fn(module, *arg_values)``."""

    def __init__(self):
        super().__init__()
        self.steps: list[Step] = []
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.reference = False  # the fp64 copy: float casts go to float64

    def float_as(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if self.reference else dtype

    def forward(self, *inputs):
        env = dict(zip(self.input_names, inputs))
        for s in self.steps:
            env[s.out] = s.fn(self, *(env[a] for a in s.args))
        return tuple(env[n] for n in self.output_names)


@dataclass
class Case:
    seed: int
    dtype: str
    module: FuzzModule
    inputs: tuple[torch.Tensor, ...]
    header: list[str]
    eager_error: str | None = None  # the exception a step raised while the program was built
    families: list[str] = field(default_factory=list)

    def source(self) -> str:
        m = self.module
        lines = [f"# seed {self.seed} · {self.dtype} · ops: {', '.join(self.families)}", *self.header]
        lines += [f"{s.out} = {s.src.format(*s.args)}" for s in m.steps]
        lines.append(f"return ({', '.join(m.output_names)},)")
        if self.eager_error:
            lines.append(f"# eager raises: {self.eager_error}")
        return "\n".join(lines)


def reference(case: Case) -> tuple[FuzzModule, tuple[torch.Tensor, ...]]:
    """The same program in float64: parameters, float buffers, float inputs and float casts."""
    module = copy.deepcopy(case.module).double()
    module.reference = True
    return module, tuple(t.double() if t.is_floating_point() else t for t in case.inputs)


def _fmt(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"float('{value}')"
    if isinstance(value, torch.dtype):
        return str(value)
    return repr(value)


def _tensor_text(t: torch.Tensor) -> str:
    return f"{list(t.shape)} {DTYPE_NAMES.get(t.dtype, t.dtype)}" + (f" = {t.tolist()}" if t.numel() <= 16 else "")


class Gen:
    """The state of one program being built."""

    def __init__(self, seed: int, dtype: str):
        self.seed = seed
        self.rng = random.Random(seed)
        self.tg = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.fdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.idtype = torch.int32 if dtype == "int32" else torch.int64
        self.specials = self.rng.random() < 0.15  # NaN / Inf in float inputs
        self.empty = self.rng.random() < 0.05  # a zero-size dimension in some input
        # Features added later draw from their own stream, so that earlier seeds keep their programs.
        self.later = random.Random(seed ^ 0x1A7E)
        self.wide = self.later.random() < 0.2  # dims up to 128 (else up to 16)
        self.m = FuzzModule()
        self.vals: dict[str, torch.Tensor] = {}
        self.inputs: list[torch.Tensor] = []
        self.header: list[str] = []
        self.error: str | None = None
        self.families: list[str] = []
        self._n = 0

    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    # -- shapes and tensors ----------------------------------------------------------------------
    def shape(self, rank: int) -> list[int]:
        dims = [self.rng.choice(DIMS + WIDE if self.wide else DIMS) for _ in range(rank)]
        while math.prod(dims) > (8192 if self.wide else 1024):
            dims[dims.index(max(dims))] //= 2
        if self.empty and rank and self.rng.random() < 0.6:
            dims[self.rng.randrange(rank)] = 0
        return dims

    def randn(self, shape, dtype=None, positive=False) -> torch.Tensor:
        t = torch.randn(shape, generator=self.tg)
        if positive:
            t = t.abs() + 0.1
        if self.specials and t.numel():
            flat = t.view(-1)
            for _ in range(self.rng.randint(1, 3)):
                flat[self.rng.randrange(flat.numel())] = self.rng.choice([math.nan, math.inf, -math.inf])
        return t.to(dtype or self.fdtype)

    def randint(self, shape, lo=-20, hi=20, dtype=None) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=self.tg, dtype=dtype or self.idtype)

    def index(self, size: int, shape, negative=True, bad=0.1) -> torch.Tensor:
        """Indices into a dimension of ``size``: in range (negative ones too when allowed), sometimes not."""
        lo = -size if negative else 0
        t = torch.randint(lo, max(size, lo + 1), shape, generator=self.tg)
        if self.rng.random() < bad and t.numel():
            t.view(-1)[self.rng.randrange(t.numel())] = self.rng.choice([size, -size - 1, 1000])
        return t

    def broadcast_shape(self, shape: list[int]) -> list[int]:
        """A shape that broadcasts against ``shape`` (dims set to 1, leading dims dropped or added)."""
        out = [1 if self.rng.random() < 0.3 else d for d in shape]
        r = self.rng.random()
        if r < 0.25 and out:
            out = out[self.rng.randrange(len(out)):]
        elif r < 0.35:
            out = [self.rng.choice([1, 2])] + out
        return out

    # -- program pieces ------------------------------------------------------------------------
    def input(self, t: torch.Tensor) -> str:
        name = f"x{len(self.inputs)}"
        self.inputs.append(t)
        self.m.input_names.append(name)
        self.vals[name] = t
        nonfinite = int((~t.isfinite()).sum()) if t.is_floating_point() else 0
        self.header.append(f"{name}: input {_tensor_text(t)}" + (f"  # {nonfinite} NaN/Inf" if nonfinite else ""))
        return name

    def fresh(self, k: str, rank: int | tuple[int, int] = (1, 4), shape=None) -> str:
        if shape is None:
            shape = self.shape(rank if isinstance(rank, int) else self.rng.randint(*rank))
        if k == FLOAT:
            return self.input(self.randn(shape))
        if k == BOOL:
            return self.input(torch.rand(shape, generator=self.tg) < 0.5)
        return self.input(self.randint(shape))

    def buffer(self, t: torch.Tensor) -> str:
        name = self._name("c")
        self.m.register_buffer(name, t)
        self.header.append(f"self.{name} = tensor {_tensor_text(t)}")
        return f"self.{name}"

    def module(self, prefix: str, make: Callable[[], nn.Module], desc: str, dtype: torch.dtype) -> str:
        """A submodule ``make()``, initialized from the case's seed."""
        name = self._name(prefix)
        with torch.random.fork_rng():
            torch.manual_seed(self.rng.getrandbits(32))
            mod = make()
            with torch.no_grad():
                if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):  # not the 1 / 0 defaults: catch ignored params
                    for pname, p in mod.named_parameters():
                        p.copy_(torch.randn(p.shape) * 0.5 + (1.0 if pname == "weight" else 0.0))
        self.m.add_module(name, mod.to(dtype))
        self.header.append(f"self.{name} = {desc}  # {DTYPE_NAMES[dtype]}")
        return f"self.{name}"

    def op(self, family: str, src: str, fn: Callable, *args: str) -> str:
        """Add ``out = fn(module, *args)``; ``src`` formats with the arg names. Runs it eagerly now."""
        out = self._name("v")
        self.m.steps.append(Step(out, args, fn, src, family))
        self.families.append(family)
        try:
            value = fn(self.m, *(self.vals[a] for a in args))
        except Exception as e:  # noqa: BLE001 - the case becomes an eager_error case
            self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            return out
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"step {src} made a {type(value).__name__}")
        self.vals[out] = value
        return out

    def call(self, family: str, fname: str, fn: Callable, args: list[str], *consts, **kwconsts) -> str:
        """``fname(arg0, ..., *consts, **kwconsts)``."""
        text = ", ".join(["{}"] * len(args) + [_fmt(c) for c in consts] + [f"{k}={_fmt(v)}" for k, v in kwconsts.items()])
        return self.op(family, f"{fname}({text})", lambda m, *vs: fn(*vs, *consts, **kwconsts), *args)

    def method(self, family: str, x: str, name: str, *consts, suffix="", **kwconsts) -> str:
        """``x.name(*consts, **kwconsts)``."""
        text = ", ".join([_fmt(c) for c in consts] + [f"{k}={_fmt(v)}" for k, v in kwconsts.items()])
        return self.op(family, f"{{}}.{name}({text}){suffix}",
                       lambda m, v: getattr(v, name)(*consts, **kwconsts), x)

    def arg(self, x: str | None, kinds: tuple[str, ...], rank: tuple[int, int] = (1, 4)) -> str:
        """``x`` if it is of one of ``kinds`` and a rank in ``rank``, else Skip; a fresh input when None."""
        if x is None:
            k = FLOAT if FLOAT in kinds and self.dtype in ("fp32", "bf16") else INT if INT in kinds else kinds[0]
            return self.fresh(k, rank)
        t = self.vals[x]
        if kind(t) not in kinds or not rank[0] <= t.dim() <= rank[1]:
            raise Skip
        return x

    def dim(self, x: str, negative: float = 0.5) -> int:
        r = self.vals[x].dim()
        d = self.rng.randrange(r)
        return d - r if self.rng.random() < negative else d

    def dtype_of(self, x: str) -> torch.dtype:
        return self.vals[x].dtype

    def other(self, x: str, k: str | None = None) -> str:
        """A second operand for ``x``: an earlier value that broadcasts with it, or a fresh input that does."""
        t = self.vals[x]
        k = k or kind(t)
        mates = [n for n, v in self.vals.items() if n != x and kind(v) == k and _broadcasts(v.shape, t.shape)]
        if mates and self.rng.random() < 0.4:
            return self.rng.choice(mates)
        shape = self.broadcast_shape(list(t.shape))
        if k == FLOAT:
            return self.input(self.randn(shape, dtype=t.dtype if t.is_floating_point() else None))
        if k == BOOL:
            return self.input(torch.rand(shape, generator=self.tg) < 0.5)
        return self.input(self.randint(shape, dtype=t.dtype))


def _broadcasts(a, b) -> bool:
    try:
        return list(torch.broadcast_shapes(a, b)) == list(b)
    except RuntimeError:
        return False


# -- recipes: recipe(g, x) -> output name; x is None (make your own input) or a value to apply to ------
def linear(g: Gen, x):
    x = g.arg(x, (FLOAT,))
    n_in, n_out, bias = g.vals[x].shape[-1], g.rng.choice(DIMS), g.rng.random() < 0.6
    lin = g.module("lin", lambda: nn.Linear(n_in, n_out, bias=bias), f"nn.Linear({n_in}, {n_out}, bias={bias})",
                   g.dtype_of(x))
    return _submodule_call(g, "linear" if bias else "linear_nobias", lin, x)


def _submodule_call(g: Gen, family: str, name: str, x: str) -> str:
    return g.op(family, f"{name}({{}})", lambda m, v: getattr(m, name[5:])(v), x)


def layer_norm(g: Gen, x):
    x = g.arg(x, (FLOAT,))
    t = g.vals[x]
    shape = list(t.shape[-g.rng.randint(1, min(2, t.dim())):])
    affine, bias = g.rng.random() < 0.6, g.rng.random() < 0.7
    eps = g.rng.choice([1e-5, 1e-6, 1e-12])
    ln = g.module("ln", lambda: nn.LayerNorm(shape, eps=eps, elementwise_affine=affine, bias=bias),
                  f"nn.LayerNorm({shape}, eps={eps}, elementwise_affine={affine}, bias={bias})", t.dtype)
    family = "layer_norm" if affine and bias else "layer_norm_nobias" if affine else "layer_norm_noaffine"
    return _submodule_call(g, family, ln, x)


def rms_norm(g: Gen, x):
    x = g.arg(x, (FLOAT,))
    t = g.vals[x]
    if g.rng.random() < 0.4:
        eps = g.rng.choice([1e-5, 1e-6])
        return g.op("rms_norm_manual", f"{{0}} * torch.rsqrt({{0}}.pow(2).mean(-1, keepdim=True) + {eps})",
                    lambda m, v: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps), x)
    affine, eps = g.rng.random() < 0.7, g.rng.choice([None, 1e-6])
    rms = g.module("rms", lambda: nn.RMSNorm([t.shape[-1]], eps=eps, elementwise_affine=affine),
                   f"nn.RMSNorm([{t.shape[-1]}], eps={eps}, elementwise_affine={affine})", t.dtype)
    return _submodule_call(g, "rms_norm", rms, x)


def _activations(r: random.Random):
    """name -> (function name, function, constant args)."""
    return {
        "relu": ("torch.relu", torch.relu, ()),
        "gelu": ("F.gelu", F.gelu, ()),
        "gelu_tanh": ("F.gelu", lambda v: F.gelu(v, approximate="tanh"), ()),
        "silu": ("F.silu", F.silu, ()),
        "sigmoid": ("torch.sigmoid", torch.sigmoid, ()),
        "tanh": ("torch.tanh", torch.tanh, ()),
        "hardtanh": ("F.hardtanh", F.hardtanh, r.choice([(-1.0, 1.0), (-0.5, 2.0), (0.0, 6.0)])),
        "relu6": ("F.relu6", F.relu6, ()),
        "leaky_relu": ("F.leaky_relu", F.leaky_relu, (r.choice([0.01, 0.2]),)),
        "elu": ("F.elu", F.elu, (r.choice([1.0, 0.5]),)),
        "softplus": ("F.softplus", F.softplus, r.choice([(1.0, 20.0), (2.0, 1.0)])),
        "exp": ("torch.exp", torch.exp, ()),
        "neg": ("torch.neg", torch.neg, ()),
        "abs": ("torch.abs", torch.abs, ()),
        "sqrt": ("torch.sqrt", torch.sqrt, ()),
        "rsqrt": ("torch.rsqrt", torch.rsqrt, ()),
        "log": ("torch.log", torch.log, ()),
        "erf": ("torch.erf", torch.erf, ()),
        "sin": ("torch.sin", torch.sin, ()),
    }


def activation(g: Gen, x):
    x = g.arg(x, (FLOAT,))
    acts = _activations(g.rng)
    name = g.rng.choice(sorted(acts))
    fname, fn, consts = acts[name]
    if name == "gelu_tanh":
        return g.op(name, "F.gelu({}, approximate='tanh')", lambda m, v: fn(v), x)
    return g.call(name, fname, fn, [x], *consts)


def softmax(g: Gen, x):
    x = g.arg(x, (FLOAT,))
    d = g.dim(x)
    if g.rng.random() < 0.5:
        return g.call("softmax", "torch.softmax", torch.softmax, [x], d)
    return g.call("log_softmax", "F.log_softmax", F.log_softmax, [x], dim=d)


_MULTI_DIM = ("sum", "mean", "amax", "amin", "logsumexp", "var", "std")


def reduction(g: Gen, x):
    x = g.arg(x, (FLOAT, INT))
    t = g.vals[x]
    names = ["sum", "mean", "amax", "amin", "max", "min", "var", "std", "logsumexp", "prod"]
    if kind(t) == INT:
        names = ["sum", "amax", "amin", "max", "min"] + (["prod"] if max(t.shape) <= 5 else [])
    name, keep = g.rng.choice(names), g.rng.random() < 0.5
    if name in ("sum", "mean", "amax") and g.rng.random() < 0.1:
        return g.method(name, x, name)  # over everything
    if name in _MULTI_DIM and t.dim() > 1 and g.rng.random() < 0.4:
        first = g.dim(x)
        dims = [first, g.rng.choice([d for d in range(t.dim()) if d != first % t.dim()])]
        dims[1] -= t.dim() if g.rng.random() < 0.5 else 0
        dim = tuple(dims)
    else:
        dim = g.dim(x)
    if name in ("max", "min"):
        return g.op(f"{name}_dim", f"{{}}.{name}({dim}, keepdim={keep}).values",
                    lambda m, v: getattr(v, name)(dim, keepdim=keep).values, x)
    if name in ("var", "std"):
        return g.method(name, x, name, dim, correction=g.rng.choice([0, 1]), keepdim=keep)
    return g.method(name, x, name, dim, keepdim=keep)


def _scalar(g: Gen, x: str):
    if kind(g.vals[x]) == INT:
        return g.rng.choice([2, 3, -1, 7])
    return g.rng.choice([0.5, 2.0, -1.5, 3.0])


_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
           "maximum": torch.maximum, "minimum": torch.minimum}
_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def binary(g: Gen, x):
    x = g.arg(x, (FLOAT, INT), rank=(0, 4))
    name = g.rng.choice(["add", "sub", "mul", "div", "maximum", "minimum", "rsub", "pow"])
    if name == "rsub":
        c = 2.5 if kind(g.vals[x]) == FLOAT else 3
        return g.op("rsub", f"{c} - {{}}", lambda m, v: c - v, x)
    if name == "pow":
        return power(g, x)
    if name in _SYMBOL and g.rng.random() < 0.4:  # with a python scalar
        c, sym = _scalar(g, x), _SYMBOL[name]
        return g.op(name, f"{{}} {sym} {c}", lambda m, v: _BINARY[name](v, c), x)
    y = x if g.rng.random() < 0.1 else g.other(x)
    if name in _SYMBOL:
        return g.op(name, f"{{}} {_SYMBOL[name]} {{}}", lambda m, a, b: _BINARY[name](a, b), x, y)
    return g.call(name, f"torch.{name}", _BINARY[name], [x, y])


def power(g: Gen, x):
    x = g.arg(x, (FLOAT, INT), rank=(0, 4))
    if kind(g.vals[x]) == INT:
        c = g.rng.choice([2, 3, 0, -1])
        return g.op("pow", f"{{}} ** {c}", lambda m, v: v ** c, x)
    r = g.rng.random()
    if r < 0.6:
        c = g.rng.choice([2, 3, 0.5, -1, 2.5, 0])
        return g.op("pow", f"{{}} ** {c}", lambda m, v: v ** c, x)
    if r < 0.8:
        return g.op("pow", "2.0 ** {}", lambda m, v: 2.0 ** v, x)
    return g.call("pow", "torch.pow", torch.pow, [x, g.other(x)])


def where(g: Gen, x):
    x = g.arg(x, (FLOAT, INT), rank=(0, 4))
    t = g.vals[x]
    fill = float("-inf") if kind(t) == FLOAT and g.rng.random() < 0.3 else _scalar(g, x)
    if g.rng.random() < 0.5:
        c = 0.3 if kind(t) == FLOAT else 2
        if g.rng.random() < 0.5:
            return g.op("where", f"torch.where({{0}} > {c}, {{0}}, {_fmt(fill)})",
                        lambda m, v: torch.where(v > c, v, fill), x)
        y = g.other(x)
        return g.op("where", f"torch.where({{0}} > {c}, {{0}}, {{1}})", lambda m, v, w: torch.where(v > c, v, w), x, y)
    mask_value = torch.rand(g.broadcast_shape(list(t.shape)), generator=g.tg) < 0.5
    if g.rng.random() < 0.5:  # a mask input instead of a constant
        mask_in = g.input(mask_value)
        return g.op("masked_fill", f"{{}}.masked_fill({{}}, {_fmt(fill)})",
                    lambda m, v, k: v.masked_fill(k, fill), x, mask_in)
    mask = g.buffer(mask_value)
    return g.op("masked_fill", f"{{}}.masked_fill({mask}, {_fmt(fill)})",
                lambda m, v: v.masked_fill(getattr(m, mask[5:]), fill), x)


def clamp(g: Gen, x):
    x = g.arg(x, (FLOAT, INT), rank=(0, 4))
    isint = kind(g.vals[x]) == INT
    lo, hi = (-3, 3) if isint else (-0.5, 1.0)
    form = g.rng.choice(["both", "reversed", "min", "max", "tensor"])
    if form == "both":
        return g.method("clamp", x, "clamp", lo, hi)
    if form == "reversed":  # lo > hi: every element becomes hi
        return g.method("clamp_reversed", x, "clamp", hi, lo)
    if form == "min":
        return g.method("clamp_min", x, "clamp", min=lo)
    if form == "max":
        return g.method("clamp_max", x, "clamp", max=hi)
    return g.call("clamp_tensor", "torch.clamp", lambda v, lo_t: torch.clamp(v, min=lo_t), [x, g.other(x)])


_COMPARE = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


def compare(g: Gen, x):
    x = g.arg(x, (FLOAT, INT), rank=(0, 4))
    name = g.rng.choice(sorted(_COMPARE))
    fn = getattr(torch, name)
    if g.rng.random() < 0.5:
        c = 0 if kind(g.vals[x]) == INT else 0.25
        return g.op("compare", f"{{}} {_COMPARE[name]} {c}", lambda m, v: fn(v, c), x)
    return g.op("compare", f"{{}} {_COMPARE[name]} {{}}", lambda m, a, b: fn(a, b), x, g.other(x))


def logical(g: Gen, x):
    x = g.arg(x, (BOOL,), rank=(0, 4))
    form = g.rng.choice(["and", "or", "xor", "not", "any", "all"])
    if form == "not":
        return g.op("bool_not", "~{}", lambda m, v: ~v, x)
    if form in ("any", "all"):
        return g.method(f"bool_{form}", x, form, g.dim(x)) if g.vals[x].dim() else g.method(f"bool_{form}", x, form)
    sym = {"and": "&", "or": "|", "xor": "^"}[form]
    fn = {"and": torch.bitwise_and, "or": torch.bitwise_or, "xor": torch.bitwise_xor}[form]
    return g.op(f"bool_{form}", f"{{}} {sym} {{}}", lambda m, a, b: fn(a, b), x, g.other(x, BOOL))


def int_div(g: Gen, x):
    x = g.arg(x, (INT,), rank=(0, 4))
    c = g.rng.choice([5, 3, -3, 2, 7])
    form = g.rng.choice(["floor", "trunc", "floordiv", "truediv", "remainder", "fmod", "tensor"])
    if form in ("floor", "trunc"):
        return g.op(f"int_div_{form}", f"torch.div({{}}, {c}, rounding_mode='{form}')",
                    lambda m, v: torch.div(v, c, rounding_mode=form), x)
    if form == "floordiv":
        return g.op("int_floordiv", f"{{}} // {c}", lambda m, v: v // c, x)
    if form == "truediv":
        return g.op("int_truediv", f"{{}} / {c}", lambda m, v: v / c, x)
    if form == "remainder":
        return g.op("int_remainder", f"{{}} % {c}", lambda m, v: v % c, x)
    if form == "fmod":
        return g.op("int_fmod", f"torch.fmod({{}}, {c})", lambda m, v: torch.fmod(v, c), x)
    mode = g.rng.choice(["floor", "trunc"])  # by a tensor, which may hold 0: eager raises ZeroDivisionError
    return g.op(f"int_div_{mode}", f"torch.div({{}}, {{}}, rounding_mode='{mode}')",
                lambda m, a, b: torch.div(a, b, rounding_mode=mode), x, g.other(x))


def bitwise(g: Gen, x):
    x = g.arg(x, (INT,), rank=(0, 4))
    form = g.rng.choice(["and", "or", "xor", "not", "lshift", "rshift", "tensor"])
    if form == "not":
        return g.op("bitwise_not", "~{}", lambda m, v: ~v, x)
    if form == "tensor":
        return g.op("bitwise_and", "{} & {}", lambda m, a, b: a & b, x, g.other(x))
    sym, c = {"and": ("&", 7), "or": ("|", 5), "xor": ("^", 6), "lshift": ("<<", 2), "rshift": (">>", 1)}[form]
    fn = {"&": torch.bitwise_and, "|": torch.bitwise_or, "^": torch.bitwise_xor,
          "<<": torch.bitwise_left_shift, ">>": torch.bitwise_right_shift}[sym]
    return g.op(f"bitwise_{form}", f"{{}} {sym} {c}", lambda m, v: fn(v, c), x)


def cast(g: Gen, x):
    x = g.arg(x, (FLOAT, INT, BOOL), rank=(0, 4))
    t = g.vals[x]
    targets = {FLOAT: [torch.bfloat16 if t.dtype == torch.float32 else torch.float32, torch.bool],
               INT: [torch.int32 if t.dtype == torch.int64 else torch.int64, torch.float32, torch.bfloat16, torch.bool],
               BOOL: [torch.float32, torch.int64, torch.int32]}[kind(t)]
    if kind(t) == FLOAT and t.numel() and t.isfinite().all() and t.abs().max() < 1e4:
        targets.append(torch.int32)  # float -> int truncates; only for values that fit
    to = g.rng.choice(targets)
    family = f"cast_{DTYPE_NAMES[t.dtype]}_{DTYPE_NAMES[to]}"
    if to.is_floating_point:
        return g.op(family, f"{{}}.to({to})", lambda m, v: v.to(m.float_as(to)), x)
    return g.op(family, f"{{}}.to({to})", lambda m, v: v.to(to), x)


def _index_text(d: int, r: int, item: str) -> str:
    """``x[:, :, item]`` for dim ``d`` (``...`` for a negative d)."""
    if d < 0:
        return "[..., " + item + ", :" * (-d - 1) + "]"
    return "[" + ":, " * d + item + "]"


def _index_key(d: int, item):
    return (Ellipsis, item) + (slice(None),) * (-d - 1) if d < 0 else (slice(None),) * d + (item,)


def indexing(g: Gen, x):
    x = g.arg(x, (FLOAT, INT, BOOL))
    t = g.vals[x]
    d = g.dim(x)
    n = t.shape[d]
    form = g.rng.choice(["select", "slice", "narrow", "advanced", "advanced_input", "gather", "index_select"])
    if form == "select":
        i = g.rng.randrange(-n, n) if n and g.rng.random() < 0.95 else n
        return g.method("select", x, "select", d, i)
    if form == "slice":
        start = g.rng.choice([None, 1, -2, 0])
        stop = g.rng.choice([None, -1, n, 3])
        step = g.rng.choice([1, 2, 3])
        text = f"{'' if start is None else start}:{'' if stop is None else stop}" + (f":{step}" if step > 1 else "")
        key = _index_key(d, slice(start, stop, step))
        return g.op("slice", "{}" + _index_text(d, t.dim(), text), lambda m, v: v[key], x)
    if form == "narrow":
        start = g.rng.randrange(-n, n) if n else 0
        length = g.rng.randint(0, max(0, n - (start % n if n else 0)))
        return g.method("narrow", x, "narrow", d, start, length)
    if form in ("advanced", "advanced_input"):
        shape = [g.rng.randint(1, 4)] if g.rng.random() < 0.8 else [2, 2]
        idx = g.index(n, shape, bad=0.15)
        key_text = _index_text(d, t.dim(), "{}")
        if form == "advanced":
            buf = g.buffer(idx)
            return g.op("index_const", "{}" + key_text.replace("{}", buf),
                        lambda m, v: v[_index_key(d, getattr(m, buf[5:]))], x)
        i = g.input(idx)
        return g.op("index_tensor", "{}" + key_text, lambda m, v, k: v[_index_key(d, k)], x, i)
    if form == "gather":
        shape = list(t.shape)
        shape[d] = g.rng.randint(1, 4)
        i = g.input(g.index(n, shape, negative=False, bad=0.1))
        return g.call("gather", "torch.gather", lambda v, k: torch.gather(v, d, k), [x, i])
    idx = g.index(n, [g.rng.randint(1, 5)], negative=False, bad=0.1)
    if g.rng.random() < 0.5:
        buf = g.buffer(idx)
        return g.op("index_select", f"{{}}.index_select({d}, {buf})",
                    lambda m, v: v.index_select(d, getattr(m, buf[5:])), x)
    return g.op("index_select", f"{{}}.index_select({d}, {{}})", lambda m, v, k: v.index_select(d, k), x, g.input(idx))


def view(g: Gen, x):
    x = g.arg(x, (FLOAT, INT, BOOL), rank=(0, 4))
    t = g.vals[x]
    r, shape = t.dim(), list(t.shape)
    forms = ["reshape", "unsqueeze", "flatten"] + (["permute", "transpose", "mT", "squeeze"] if r >= 2 else [])
    if r and 1 in shape or r < 3:
        forms.append("expand")
    form = g.rng.choice(forms)
    if form == "reshape":
        if r >= 2 and g.rng.random() < 0.5:  # merge two neighbours
            i = g.rng.randrange(r - 1)
            new = shape[:i] + [shape[i] * shape[i + 1]] + shape[i + 2:]
        elif r and shape[-1] % 2 == 0 and shape[-1]:
            new = shape[:-1] + [2, shape[-1] // 2]
        else:
            new = [-1]
        if len(new) > 1 and g.rng.random() < 0.3 and 0 not in new:
            new[g.rng.randrange(len(new))] = -1
        return g.method("reshape", x, "reshape", new)
    if form == "unsqueeze":
        return g.method("unsqueeze", x, "unsqueeze", g.rng.randint(-r - 1, r))
    if form == "flatten":
        if r < 2:
            return g.method("flatten", x, "flatten")
        start = g.rng.randrange(r - 1)
        return g.method("flatten", x, "flatten", start, g.rng.choice([-1, start + 1]))
    if form == "permute":
        perm = list(range(r))
        g.rng.shuffle(perm)
        return g.method("permute", x, "permute", *perm)
    if form == "transpose":
        return g.method("transpose", x, "transpose", g.dim(x), g.dim(x))
    if form == "mT":
        return g.op("transpose", "{}.mT", lambda m, v: v.mT, x)
    if form == "squeeze":
        ones = [i for i, s in enumerate(shape) if s == 1]
        return g.method("squeeze", x, "squeeze", g.rng.choice(ones) if ones else g.dim(x))
    k = g.rng.choice([2, 3])
    if 1 in shape:
        new = [k if s == 1 else -1 for s in shape]
        return g.method("expand", x, "expand", *new)
    return g.method("expand", x, "expand", k, *([-1] * r))


def cat(g: Gen, x):
    x = g.arg(x, (FLOAT, INT, BOOL))
    t = g.vals[x]
    d = g.dim(x)
    stack = g.rng.random() < 0.3
    if stack:
        y = x if g.rng.random() < 0.3 else g.fresh(kind(t), shape=list(t.shape))
        dim = g.rng.randint(-t.dim() - 1, t.dim())
        return g.op("stack", f"torch.stack([{{}}, {{}}], {dim})", lambda m, a, b: torch.stack([a, b], dim), x, y)
    shape = list(t.shape)
    shape[d] = g.rng.choice([1, 2, 3, 0])
    y = g.fresh(kind(t), shape=shape)
    return g.op("cat", f"torch.cat([{{0}}, {{1}}, {{0}}], {d})", lambda m, a, b: torch.cat([a, b, a], d), x, y)


def cumsum(g: Gen, x):
    x = g.arg(x, (FLOAT, INT, BOOL))
    return g.method("cumsum", x, "cumsum", g.dim(x))


def embedding(g: Gen, x):
    if x is None:
        num = g.rng.choice([5, 11, 32])
        x = g.input(g.index(num, g.shape(g.rng.randint(1, 2)), negative=False, bad=0.1))
    elif kind(g.vals[x]) != INT or g.vals[x].dim() > 3 or not g.vals[x].numel():
        raise Skip
    else:
        num = max(int(g.vals[x].max()) + 1, 1) + g.rng.randint(0, 3)  # negative ids make eager raise
    width = g.rng.choice([4, 7, 16])
    emb = g.module("emb", lambda: nn.Embedding(num, width), f"nn.Embedding({num}, {width})", g.fdtype)
    return _submodule_call(g, "embedding", emb, x)


def conv(g: Gen, x):
    nd = g.rng.choice([1, 2]) if x is None else g.vals[x].dim() - 2
    if nd not in (1, 2):
        raise Skip
    if x is None:
        c = g.rng.choice([1, 2, 3, 4, 8])
        x = g.input(g.randn([g.rng.choice([1, 2]), c] + [g.rng.choice([1, 3, 5, 8, 11]) for _ in range(nd)]))
    x = g.arg(x, (FLOAT,), rank=(nd + 2, nd + 2))
    c = g.vals[x].shape[1]
    if not c:
        raise Skip
    groups = g.rng.choice([d for d in (1, 2, 4, c) if d and c % d == 0])
    out = groups * g.rng.choice([1, 2, 3])
    k, stride, pad, bias = g.rng.choice([1, 3]), g.rng.choice([1, 2]), g.rng.choice([0, 1]), g.rng.random() < 0.7
    cls = nn.Conv1d if nd == 1 else nn.Conv2d
    mod = g.module("conv", lambda: cls(c, out, k, stride=stride, padding=pad, groups=groups, bias=bias),
                   f"nn.{cls.__name__}({c}, {out}, {k}, stride={stride}, padding={pad}, groups={groups}, "
                   f"bias={bias})", g.dtype_of(x))
    return _submodule_call(g, f"conv{nd}d" + ("_k1" if k == 1 else "_k3"), mod, x)


def pool(g: Gen, x):
    nd = g.rng.choice([1, 2]) if x is None else g.vals[x].dim() - 2
    if nd not in (1, 2):
        raise Skip
    if x is None:
        x = g.input(g.randn([g.rng.choice([1, 2]), g.rng.choice([1, 2, 3])] +
                            [g.rng.choice([2, 4, 5, 7, 8]) for _ in range(nd)]))
    x = g.arg(x, (FLOAT,), rank=(nd + 2, nd + 2))
    k = g.rng.choice([2, 3])
    stride, pad = g.rng.choice([None, 1, 2]), g.rng.choice([0, 1])
    name = f"{g.rng.choice(['avg', 'max'])}_pool{nd}d"
    fn = getattr(F, name)
    return g.call(name, f"F.{name}", fn, [x], k, stride, pad)


def sdpa(g: Gen, x):
    if x is not None:
        x = g.arg(x, (FLOAT,), rank=(4, 4))
        q = kv = x
        s = sk = g.vals[x].shape[-2]
    else:
        b, h, s, d = g.rng.choice([1, 2]), g.rng.choice([1, 2, 4]), g.rng.choice([1, 3, 5, 8]), g.rng.choice([4, 8, 16])
        sk = s if g.rng.random() < 0.6 else g.rng.choice([2, 7])
        q, kv = g.input(g.randn([b, h, s, d])), g.input(g.randn([b, h, sk, d]))
    form = g.rng.choice(["plain", "causal", "bool_mask", "float_mask"])
    if form == "plain":
        return g.call("sdpa", "F.scaled_dot_product_attention", F.scaled_dot_product_attention, [q, kv, kv])
    if form == "causal":
        return g.call("sdpa_causal", "F.scaled_dot_product_attention", F.scaled_dot_product_attention, [q, kv, kv],
                      is_causal=True)
    mask = torch.rand(s, sk, generator=g.tg) < 0.7
    if form == "float_mask":
        mask = torch.zeros(s, sk).masked_fill(~mask, -math.inf).to(g.dtype_of(q))
    buf = g.buffer(mask)
    return g.op(f"sdpa_{form}", f"F.scaled_dot_product_attention({{0}}, {{1}}, {{1}}, attn_mask={buf})",
                lambda m, a, b: F.scaled_dot_product_attention(a, b, b, attn_mask=getattr(m, buf[5:])), q, kv)


def matmul(g: Gen, x):
    x = g.arg(x, (FLOAT,), rank=(1, 4))
    t = g.vals[x]
    if t.dim() >= 2 and g.rng.random() < 0.3:
        return g.op("matmul", "{0} @ {0}.mT", lambda m, v: v @ v.mT, x)
    if t.dim() == 3 and g.rng.random() < 0.5:
        y = g.input(g.randn([t.shape[0], t.shape[2], g.rng.choice(DIMS)], dtype=t.dtype))
        return g.call("bmm", "torch.bmm", torch.bmm, [x, y])
    y = g.input(g.randn([t.shape[-1], g.rng.choice(DIMS)], dtype=t.dtype))
    return g.op("matmul", "{} @ {}", lambda m, a, b: a @ b, x, y)


# name -> (recipe, the kinds of case it can start)
RECIPES = {
    "linear": (linear, (FLOAT,)),
    "layer_norm": (layer_norm, (FLOAT,)),
    "rms_norm": (rms_norm, (FLOAT,)),
    "activation": (activation, (FLOAT,)),
    "softmax": (softmax, (FLOAT,)),
    "reduction": (reduction, (FLOAT, INT)),
    "binary": (binary, (FLOAT, INT)),
    "power": (power, (FLOAT,)),
    "where": (where, (FLOAT, INT)),
    "clamp": (clamp, (FLOAT, INT)),
    "compare": (compare, (FLOAT, INT)),
    "logical": (logical, ()),
    "int_div": (int_div, (INT,)),
    "bitwise": (bitwise, (INT,)),
    "cast": (cast, (FLOAT, INT)),
    "indexing": (indexing, (FLOAT, INT)),
    "view": (view, (FLOAT, INT)),
    "cat": (cat, (FLOAT, INT)),
    "cumsum": (cumsum, (FLOAT, INT)),
    "embedding": (embedding, (FLOAT,)),
    "conv": (conv, (FLOAT,)),
    "pool": (pool, (FLOAT,)),
    "sdpa": (sdpa, (FLOAT,)),
    "matmul": (matmul, (FLOAT,)),
}
# How often each recipe starts a case (indexing, reductions and activations have the most forms).
_WEIGHTS = {"activation": 3, "reduction": 3, "indexing": 3, "binary": 2, "int_div": 2, "layer_norm": 2, "linear": 2,
            "conv": 2, "view": 2}
PRIMARY = [name for name, (_, kinds) in RECIPES.items() if kinds for _ in range(_WEIGHTS.get(name, 1))]


def _case_dtype(rng: random.Random, kinds) -> str:
    choices = ([("fp32", 5), ("bf16", 4)] if FLOAT in kinds else []) + ([("int64", 2), ("int32", 1)] if INT in kinds
                                                                       else [])
    return rng.choices([c for c, _ in choices], [w for _, w in choices])[0]


def generate(seed: int) -> Case:
    """The program for ``seed``: a first op from ``PRIMARY`` and up to five more."""
    primary = PRIMARY[seed % len(PRIMARY)]
    recipe, kinds = RECIPES[primary]
    g = Gen(seed, _case_dtype(random.Random(seed ^ 0x5EED), kinds))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        last = recipe(g, None)
        for _ in range(g.rng.choice([0, 1, 1, 2, 2, 3, 4]) + (g.later.random() < 0.1)):
            if g.error or g.vals[last].numel() > MAX_NUMEL:
                break
            made = [n for n in g.vals if n.startswith("v")]
            x = last if g.rng.random() < 0.7 or not made else g.rng.choice(made)
            for _ in range(30):
                name = g.rng.choice(sorted(RECIPES))
                try:
                    last = RECIPES[name][0](g, x)
                    break
                except Skip:
                    continue
    used = {a for s in g.m.steps for a in s.args}
    g.m.output_names = [s.out for s in g.m.steps if s.out not in used]
    return Case(seed, g.dtype, g.m, tuple(g.inputs), g.header, g.error, g.families)
