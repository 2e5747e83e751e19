"""fp16 ONNX: the fp32 graph with its backbone in half precision and float32 kept where numerics need it.

A small pass of our own rather than a generic converter: the generic one retypes tensors without retyping the
`Cast` nodes that produce them and mishandles constants shared across precisions, which ONNX Runtime then refuses.
Here the rule is simple. Nodes in the backbone's scope (engine.contract.FP16_SCOPE; see half_precision_nodes)
compute in fp16; the preprocessing, the head, the target selection and the CAM (cheap and precision-sensitive)
stay float32; a Cast is inserted on each edge that crosses between the two, and Cast pairs that cancel are removed.
Converting the fp32 ONNX (instead of tracing a mixed-precision Keras model) keeps tf2onnx's Conv+BatchNorm folding.
Inputs and outputs keep their types.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gradcam_engine.engine.contract import FP16_SCOPE

FP32_OPS = frozenset({"Softmax", "Sigmoid", "ArgMax", "OneHot", "TopK"})
# (op, input index) that the ONNX spec requires to stay float32 whatever the data type.
_FLOAT32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}
FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def half_precision_nodes(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes that compute in fp16: the backbone's, less a few ops that need float32.

    A node is in the backbone when its name or one of its outputs is in the scope. tf2onnx's optimizer renames
    what it fuses or inserts (a Conv that absorbed its BatchNorm becomes `Conv__119`, writing `Conv__119:0`), so
    such a generated node also counts when it reads a backbone weight, or when everything it reads comes from the
    backbone and everything that reads it is in the backbone (a layout Transpose between two backbone ops).
    """
    constants = {i.name for i in graph.initializer}
    producer = {out: n.name for n in graph.node for out in n.output}
    consumers: dict[str, list[str]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n.name)
    inside = {n.name for n in graph.node
              if any(_in_scope(x) for x in (n.name, *n.output))
              or (_generated(n) and any(_in_scope(x) for x in n.input if x in constants))}
    changed = True
    while changed:
        changed = False
        for n in graph.node:
            if n.name in inside or not _generated(n):
                continue
            data = [x for x in n.input if x and x not in constants]
            readers = [c for out in n.output for c in consumers.get(out, [])]
            if data and readers and all(producer.get(x) in inside for x in data) and all(r in inside for r in readers):
                inside.add(n.name)
                changed = True
    return {n.name for n in graph.node if n.name in inside and n.op_type not in FP32_OPS}


def _in_scope(name: str) -> bool:
    return name.startswith(FP16_SCOPE) or f"/{FP16_SCOPE}" in name


def _generated(node: onnx.NodeProto) -> bool:
    """tf2onnx names the nodes it creates `Op__N`, without the TensorFlow scope path."""
    return "/" not in node.name


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    floats = {v.name for v in [*graph.value_info, *graph.input, *graph.output]
              if v.type.tensor_type.elem_type == FLOAT}
    floats |= {i.name for i in graph.initializer if i.data_type == FLOAT}
    for node in graph.node:
        if node.op_type == "Cast" and _attr(node, "to") == FLOAT:
            floats.update(node.output)
    return floats


def _attr(node: onnx.NodeProto, name: str) -> int | None:
    return next((a.i for a in node.attribute if a.name == name), None)


# How much of the backbone's front may stay fp32 when full fp16 misses the precision gate: these fractions of its
# convolutions, tried in order. Rounding errors made early are amplified by every layer after them (a MobileNetV2
# with data-calibrated BatchNorm has gains of 8-20 in its first blocks), so fp32 at the front closes the gap where
# fp32 at the end changes nothing (measured: README, precision section).
FRONT_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)


def backbone_convolutions(graph: onnx.GraphProto) -> int:
    """How many Conv nodes the backbone has (depthwise ones included)."""
    half = half_precision_nodes(graph)
    return sum(1 for node in graph.node if node.op_type == "Conv" and node.name in half)


def front_steps(graph: onnx.GraphProto) -> list[int]:
    """How many leading backbone convolutions to keep in fp32 at each step of the fallback."""
    n = backbone_convolutions(graph)
    return sorted({max(1, int(np.ceil(n * f))) for f in FRONT_FRACTIONS}) if n else []


def front_nodes(graph: onnx.GraphProto, convolutions: int) -> set[str]:
    """The backbone's first `convolutions` Convs (in graph order, which is topological) and every backbone node they
    depend on: a front cut of the network that can stay fp32 while the rest computes in fp16."""
    half = half_precision_nodes(graph)
    convs = [n for n in graph.node if n.op_type == "Conv" and n.name in half][:convolutions]
    producer = {out: n for n in graph.node for out in n.output}
    keep: set[str] = set()
    todo = list(convs)
    while todo:
        node = todo.pop()
        if node.name in keep or node.name not in half:
            continue
        keep.add(node.name)
        todo.extend(producer[x] for x in node.input if x in producer)
    return keep


def to_fp16(model: onnx.ModelProto, keep_float32: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """fp32 ONNX -> fp16 ONNX with float32 I/O and float32 islands for the sensitive parts (and for the backbone
    nodes named in keep_float32, see front_nodes)."""
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    floats = _float_tensors(model)
    half_names = half_precision_nodes(graph) - keep_float32
    half_nodes = [n for n in graph.node if n.name in half_names]
    half_set = {id(n) for n in half_nodes}
    inits = {i.name: i for i in graph.initializer}

    # 1. Which float tensors live in fp16: outputs of fp16 nodes, and constants read only by fp16 nodes.
    half_tensors = {out for n in half_nodes for out in n.output if out in floats}
    readers: dict[str, set[bool]] = {}
    for n in graph.node:
        for i, name in enumerate(n.input):
            keep32 = id(n) not in half_set or (n.op_type, i) in _FLOAT32_INPUTS
            readers.setdefault(name, set()).add(not keep32)
    for name, init in inits.items():
        if init.data_type == FLOAT and readers.get(name) == {True}:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), name))
            half_tensors.add(name)

    # 2. Retype the fp16 nodes whose output type is an attribute.
    for n in half_nodes:
        if n.op_type == "Cast" and _attr(n, "to") == FLOAT:
            next(a for a in n.attribute if a.name == "to").i = HALF
        if n.op_type in ("Constant", "ConstantOfShape"):
            for a in n.attribute:
                if a.t.data_type == FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))

    # 3. Casts on every float edge that crosses between the precisions.
    new_nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}__as_{'fp16' if to == HALF else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=to, name=casts[key]))
        return casts[key]

    for out in graph.output:  # outputs keep float32: the fp16 producer writes an internal tensor, cast back
        if out.name in half_tensors:
            producer = next(n for n in graph.node if out.name in n.output)
            internal = f"{out.name}__fp16"
            producer.output[list(producer.output).index(out.name)] = internal
            for n in graph.node:
                for i, name in enumerate(n.input):
                    if name == out.name:
                        n.input[i] = internal
            half_tensors.add(internal)
            floats.add(internal)
            casts[(internal, FLOAT)] = out.name
            new_nodes.append(helper.make_node("Cast", [internal], [out.name], to=FLOAT, name=f"{out.name}__as_fp32"))

    for n in graph.node:
        in_half = id(n) in half_set
        for i, name in enumerate(n.input):
            if not name or name not in floats:
                continue
            wants_half = in_half and (n.op_type, i) not in _FLOAT32_INPUTS
            is_half = name in half_tensors
            if wants_half and not is_half:
                n.input[i] = cast(name, HALF)
            elif not wants_half and is_half:
                n.input[i] = cast(name, FLOAT)
    graph.node.extend(new_nodes)
    _toposort(graph)
    del graph.value_info[:]  # stale types: infer them again, so the round-trip pass knows every tensor's type
    model = onnx.shape_inference.infer_shapes(model)
    remove_cascaded_casts(model)
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


def _toposort(graph: onnx.GraphProto) -> None:
    """Order nodes so every input is produced before use (the inserted Casts were appended at the end)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"fp16 pass left a cycle or a dangling input at {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def remove_cascaded_casts(model: onnx.ModelProto) -> int:
    """Bypass Cast(Cast(x)) pairs that return to x's own type (fp16 -> fp32 -> fp16 round trips); returns count."""
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    for n in graph.node:
        if n.op_type == "Cast":
            types[n.output[0]] = _attr(n, "to")
    producers = {out: n for n in graph.node for out in n.output}
    graph_outputs = {o.name for o in graph.output}
    removed = 0
    for n in list(graph.node):
        first = producers.get(n.input[0]) if n.op_type == "Cast" else None
        if first is None or first.op_type != "Cast" or n.output[0] in graph_outputs:
            continue
        source = first.input[0]
        if source not in types or types[source] != types[n.output[0]]:
            continue
        for other in graph.node:  # readers of the round trip read the original
            for i, name in enumerate(other.input):
                if name == n.output[0]:
                    other.input[i] = source
        graph.node.remove(n)
        removed += 1
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    for n in list(graph.node):  # a first Cast nobody reads any more
        if n.op_type == "Cast" and not any(o in used for o in n.output):
            graph.node.remove(n)
    return removed
