"""NodeMeta's fields for what comes (queue, program, quant, role "comm") and QuantSpec's checks and forms."""
import pytest
import torch

from kiln.ir import QuantSpec, trace
from kiln.ir.meta import QUANT_LAYOUTS, ROLES, NodeMeta


def test_quant_spec_names_its_weights_axis_group_and_layout():
    spec = QuantSpec("nested", [8, 4, 2], scale="p_fc_scale8", axis=0, group_size=128, layout="nested-msb")
    assert spec.bits == (8, 4, 2)  # a list is kept as a tuple: the spec is hashable and frozen
    assert str(spec) == "nested 8/4/2b nested-msb g128 scale=p_fc_scale8"
    assert QuantSpec.from_json(spec.to_json()) == spec
    with pytest.raises(AttributeError):
        spec.bits = (4,)


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": ()}, r"bits must be bit-widths 1..16, not \(\)"),
    ({"bits": (8, 0)}, r"bits must be bit-widths 1..16, not \(8, 0\)"),
    ({"bits": (True,)}, r"bits must be bit-widths"),
    ({"bits": (4,), "layout": "packed"}, r"layout 'packed' is not one of " + ", ".join(QUANT_LAYOUTS)),
    ({"bits": (4,), "group_size": 0}, r"group_size must be a positive integer or None, not 0"),
])
def test_quant_spec_refuses_what_no_kernel_could_read(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec("symmetric", **kwargs)


def test_queue_program_and_quant_are_annotations_the_printer_shows():
    g = trace(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    (node,) = [n for n in g.compute_nodes()]
    meta: NodeMeta = g.meta(node)
    meta.queue, meta.program, meta.role = "npu0", "prefill_64", "comm"
    meta.quant = QuantSpec("symmetric", (4,), scale="p_weight_scale", group_size=32, layout="grouped")
    assert list(meta.annotations()) == ["queue", "program", "role", "quant"]
    assert ("{queue=npu0, program=prefill_64, role=comm, quant=symmetric 4b grouped g32 scale=p_weight_scale}"
            in g.text())
    assert "comm" in ROLES
