"""Exact pruning: zero the weights and biases that cannot change a model's output.

After soft weight-sharing many units are dead in a way the prior cannot see: a unit with no
incoming weights and a bias <= 0 before a ReLU always outputs 0, so its outgoing weights do
nothing; a unit (or filter) whose outgoing weights are all zero feeds nothing, so its own
weights and bias do nothing. Zeroing them leaves every output bit-identical and makes the
file smaller (LeNet-5-Caffe: about 10% of its non-zeros).

The links between layers come from ``torch.fx``: a Linear or Conv layer whose output reaches
exactly one Linear or Conv layer through ReLU, max-pooling, flattening, dropout or identity
only. Anything else (a residual add, BatchNorm, a layer used twice) is left alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from .errors import SwsError

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RELU_FUNCS = {F.relu, torch.relu, "relu"}
_POOL_FUNCS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d}
_SHAPE_METHODS = {"flatten", "view", "reshape", "contiguous"}
_SHAPE_FUNCS = {torch.flatten, torch.reshape}


@dataclass
class _Link:
    producer: str  # module names
    consumer: str
    relu: bool
    block: int  # consumer columns per producer unit (spatial positions after a flatten)


def _passes(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[bool, bool]:
    """(passes unit identity through, is a ReLU) for a node between two layers."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.ReLU):
            return True, True
        return isinstance(m, nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d | nn.Dropout | nn.Identity | nn.Flatten), False
    if node.op == "call_function":
        if node.target in _RELU_FUNCS:
            return True, True
        if node.target is F.dropout:
            return True, False
        return node.target in _POOL_FUNCS or node.target in _SHAPE_FUNCS, False
    if node.op == "call_method":
        if node.target == "relu":
            return True, True
        return node.target in _SHAPE_METHODS, False
    return False, False


def _links(model: nn.Module, example: torch.Tensor) -> list[_Link]:
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types on code it cannot trace
        raise SwsError(f"exact pruning needs a model torch.fx can trace: {type(exc).__name__}: {exc}") from None
    ShapeProp(gm).propagate(example)
    modules = dict(gm.named_modules())
    layer_nodes = {n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], _LAYERS)}
    uses: dict[str, int] = {}
    for n in layer_nodes:
        uses[n.target] = uses.get(n.target, 0) + 1
    out = []
    for n in layer_nodes:
        if uses[n.target] != 1:
            continue
        cur, relu, shape = n, False, None
        while True:
            users = list(cur.users)
            if len(users) != 1:
                break
            u = users[0]
            if u in layer_nodes:
                if u.args[0] is cur and uses[u.target] == 1:
                    prod, cons = modules[n.target], modules[u.target]
                    units = prod.out_features if isinstance(prod, nn.Linear) else prod.out_channels
                    if isinstance(cons, nn.Linear):
                        block, ok = (cons.in_features // units, cons.in_features % units == 0) if units else (0, False)
                        if shape is not None and len(shape) > 2:
                            ok = ok and shape[1] == units and block == int(torch.Size(shape[2:]).numel())
                    else:
                        block, ok = 1, cons.groups == 1 and cons.in_channels == units and shape is None
                    if ok:
                        out.append(_Link(n.target, u.target, relu, block))
                break
            passes, is_relu = _passes(u, modules)
            if not passes or any(isinstance(a, fx.Node) and a is not cur for a in u.args[1:]):
                break
            if u.op in ("call_method", "call_function") and u.target in (_SHAPE_METHODS | _SHAPE_FUNCS | {operator.getitem}):
                meta = cur.meta.get("tensor_meta")
                if meta is None:
                    break
                shape = tuple(meta.shape) if shape is None else shape
            elif isinstance(modules.get(u.target) if u.op == "call_module" else None, nn.Flatten):
                shape = tuple(cur.meta["tensor_meta"].shape) if shape is None else shape
            relu = relu or is_relu
            cur = u
    return out


@torch.no_grad()
def remove_dead_units_(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Zero, in place, every weight and bias that provably cannot change ``model``'s output
    (see the module docstring); ``example_input`` (one batch) gives the shapes between layers.
    Returns the number of non-zero weights and biases zeroed per layer.

    Example:
        >>> removed = swsformat.remove_dead_units_(model, torch.zeros(1, 1, 28, 28))  # doctest: +SKIP
    """
    was_training = model.training
    model.eval()
    try:
        links = _links(model, example_input)
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    zeroed: dict[str, int] = {}

    def rows(m: nn.Module) -> torch.Tensor:
        return m.weight.reshape(m.weight.shape[0], -1)

    def cols(m: nn.Module, block: int) -> torch.Tensor:
        """(consumer outputs, producer units, block) view of the consumer's weight."""
        w = m.weight
        if isinstance(m, nn.Linear):
            return w.reshape(w.shape[0], -1, block)
        return w.reshape(w.shape[0], w.shape[1], -1)

    def zero(name: str, t: torch.Tensor, where: torch.Tensor) -> None:
        n = int((t[where] != 0).sum())
        if n:
            t[where] = 0
            zeroed[name] = zeroed.get(name, 0) + n

    changed = True
    while changed:
        before = sum(zeroed.values())
        for link in links:
            prod, cons = modules[link.producer], modules[link.consumer]
            w_in = rows(prod)
            c = cols(cons, link.block)
            no_input = (w_in != 0).sum(1) == 0
            bias = prod.bias
            if link.relu:  # constant output max(0, bias) = 0: its outgoing weights see only zeros
                dead = no_input & (bias <= 0) if bias is not None else no_input
                zero(link.consumer, c, (slice(None), dead))
                if bias is not None:
                    zero(link.producer, bias, dead)
            unused = (c != 0).sum((0, 2)) == 0  # feeds nothing: its weights and bias do nothing
            zero(link.producer, w_in, unused)
            if bias is not None:
                zero(link.producer, bias, unused)
        changed = sum(zeroed.values()) > before
    return zeroed


@torch.no_grad()
def remove_dead_units_verified_(model: nn.Module, inputs: torch.Tensor | list[torch.Tensor],
                                batch_size: int = 1000) -> dict[str, int]:
    """:func:`remove_dead_units_`, then proof on ``inputs`` (a tensor of samples, run in batches
    of ``batch_size``, or a list of batches): the model's outputs must be bit-identical before
    and after, or every weight is put back and SwsError raised."""
    if isinstance(inputs, torch.Tensor):
        inputs = list(inputs.split(batch_size))
    if not inputs:
        raise SwsError("exact pruning needs at least one input batch to trace and verify on")
    was_training = model.training
    model.eval()
    try:
        before = [model(x) for x in inputs]
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        removed = remove_dead_units_(model, inputs[0])
        after = [model(x) for x in inputs]
        if not all(torch.equal(a, b) for a, b in zip(before, after)):
            model.load_state_dict(saved)
            raise SwsError("exact pruning changed the model's outputs; nothing was removed (please report this model)")
    finally:
        model.train(was_training)
    return removed
