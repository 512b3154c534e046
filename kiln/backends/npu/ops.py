"""The NPU's op table and why it refuses a node: what a mobile NPU (Qualcomm HTP through QNN) compiles.

Kept small and honest:

- ``kiln::int8_linear``: int8 weights (per output channel) x int8 activations
  (one static per-tensor scale), int32 accumulation; its weight, scales and
  bias must be graph constants (placeholders: QNN bakes them into the
  graph), its scale a literal, its activations float32 or float16 (the
  graph's I/O; HTP has no bf16);
- ``aten.view`` / ``aten.reshape``, only next to an int8 matmul (fed by one,
  or feeding one, through other reshapes): alone on the NPU a reshape would
  only add two hand-offs.

Every other op is refused (float matmuls, attention, norms, softmax: the NPU's
float path is two orders of magnitude slower, mllm-NPU measures fp16 matmul
280x slower than int8), and so is any node with a symbolic dimension in an
input or output: an NPU graph is built for one static shape. A refusal is a
sentence naming the op and why.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ...ir.printer import op_name
from ...ir.serialize import target_name
from ...runtime.kernels.npu_emulated import NPU_OPS  # the runtime's op table: the ABI this backend emits

INT8_LINEAR = torch.ops.kiln.int8_linear.default
SHAPE_OPS = frozenset({torch.ops.aten.view.default, torch.ops.aten.reshape.default})
OPS = frozenset({INT8_LINEAR, *SHAPE_OPS})
assert {target_name(t) for t in OPS} == set(NPU_OPS), "the npu backend's op table and the runtime's differ"

ACTIVATION_DTYPES = (torch.float32, torch.float16)

_FLOAT_KINDS = [
    ({"aten.linear", "aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.matmul", "aten.addbmm",
      "kiln.nested_linear", "kiln.moe_experts", "kiln.grouped_mm"},
     "a float matmul; the NPU runs int8 x int8 matmuls only (kiln::int8_linear)"),
    ({"aten.scaled_dot_product_attention", "aten._scaled_dot_product_flash_attention_for_cpu"},
     "attention (float matmuls and softmax); it stays on the CPU"),
    ({"aten.layer_norm", "aten.native_layer_norm", "aten.rms_norm", "aten.group_norm", "aten.batch_norm",
      "aten._native_batch_norm_legit_no_training"},
     "a float normalization; it stays on the CPU"),
    ({"aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax"},
     "a float softmax; it stays on the CPU"),
]


def is_shape_op(node: fx.Node) -> bool:
    return node.target in SHAPE_OPS


def _base(name: str) -> str:
    return name.rsplit(".", 1)[0] if name.count(".") >= 2 else name


def _symbolic(node: fx.Node) -> str | None:
    """The first symbolic dimension among ``node``'s tensor inputs and outputs, described; None: all static."""
    def first(value):
        tensors = value if isinstance(value, (tuple, list)) else (value,)
        for t in tensors:
            if isinstance(t, torch.Tensor):
                for d in t.shape:
                    if not isinstance(d, int) and not (isinstance(d, torch.SymInt) and d.node.expr.is_number):
                        return d
        return None

    d = first(node.meta.get("val"))
    if d is not None:
        return f"symbolic dimension {d} in its output"
    for inp in node.all_input_nodes:
        d = first(inp.meta.get("val"))
        if d is not None:
            return f"symbolic dimension {d} in its input {inp.name}"
    return None


def refusal(node: fx.Node) -> str | None:
    """Why the NPU cannot run ``node`` (a ``call_function`` node with types); None: it can."""
    name = op_name(node.target)
    if node.target not in OPS:
        base = _base(name)
        why = next((why for names, why in _FLOAT_KINDS if base in names),
                   "outside the NPU's op set (kiln::int8_linear, aten.view, aten.reshape)")
        return f"{name}: {why}"
    symbolic = _symbolic(node)
    if symbolic is not None:
        return f"{name}: {symbolic}; the NPU compiles static shapes only"
    if node.target is INT8_LINEAR:
        return _int8_linear_refusal(node, name)
    if not (_fed_by_int8(node) or _feeds_int8(node)):
        return f"{name}: a reshape neither fed by nor feeding an int8 matmul; alone on the NPU it adds two hand-offs"
    return None


def _int8_linear_refusal(node: fx.Node, name: str) -> str | None:
    x, weight, weight_scale, bias, x_scale = (list(node.args) + [None] * 5)[:5]
    for role, arg in (("weight", weight), ("weight_scale", weight_scale), ("bias", bias)):
        if isinstance(arg, fx.Node) and arg.op != "placeholder":
            return (f"{name}: its {role} is computed in the graph (by {arg.name}); the NPU bakes weights into "
                    "its graph, so they must be constants")
    if isinstance(x_scale, fx.Node):
        return f"{name}: its activation scale is computed at run time; the NPU needs a static per-tensor scale"
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if isinstance(val, torch.Tensor) and val.dtype not in ACTIVATION_DTYPES:
        return (f"{name}: activations of dtype {str(val.dtype).removeprefix('torch.')}; the NPU graph's float "
                "I/O is float32 or float16")
    return None


def _fed_by_int8(node: fx.Node) -> bool:
    src = node.args[0] if node.args else None
    while isinstance(src, fx.Node) and src.target in SHAPE_OPS:
        src = src.args[0]
    return isinstance(src, fx.Node) and src.target is INT8_LINEAR and refusal(src) is None


def _feeds_int8(node: fx.Node) -> bool:
    todo, seen = [(u, node) for u in node.users], set()
    while todo:
        user, via = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.target is INT8_LINEAR and user.args and user.args[0] is via and refusal(user) is None:
            return True  # it reshapes the activations of an int8 matmul
        if user.target in SHAPE_OPS and user.args and user.args[0] is via:
            todo.extend((u, user) for u in user.users)
    return False
