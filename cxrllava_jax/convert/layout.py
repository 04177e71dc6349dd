"""Scanned <-> unrolled parameter layouts.

`nn.scan` stores a stack of layers as one subtree with a leading `layers` axis (`llm/layers/block`);
unrolled, the same weights are `llm/layers/block_0`, `block_1`, ... Checkpoints record their layout and
`relayout` converts to whichever the runtime asks for.
"""

import re

import numpy as np

from cxrllava_jax.errors import InputError
from cxrllava_jax.models.layers import STACK_NAMES

_NUMBERED = re.compile(rf"^({'|'.join(STACK_NAMES)})_(\d+)$")


def relayout(tree, scan: bool):
    return stack_layers(tree) if scan else unstack_layers(tree)


def unstack_layers(tree):
    """`name: leaves [L, ...]` -> `name_0 ... name_{L-1}`."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key in STACK_NAMES and isinstance(value, dict):
            num = _leading_dim(value)
            for i in range(num):
                out[f"{key}_{i}"] = _map(value, lambda a, i=i: a[i])
        else:
            out[key] = unstack_layers(value)
    return out


def stack_layers(tree):
    """`name_0 ... name_{L-1}` -> `name: leaves [L, ...]`."""
    if not isinstance(tree, dict):
        return tree
    groups: dict[str, dict[int, object]] = {}
    out = {}
    for key, value in tree.items():
        match = _NUMBERED.match(key)
        if match:
            groups.setdefault(match.group(1), {})[int(match.group(2))] = value
        else:
            out[key] = stack_layers(value)
    for name, layers in groups.items():
        if sorted(layers) != list(range(len(layers))):
            raise InputError(f"layers of {name!r} are not numbered 0..{len(layers) - 1}: {sorted(layers)}")
        ordered = [layers[i] for i in range(len(layers))]
        out[name] = _zip(ordered)
    return out


def _leading_dim(tree) -> int:
    leaf = tree
    while isinstance(leaf, dict):
        leaf = next(iter(leaf.values()))
    return leaf.shape[0]


def _map(tree, fn):
    return {k: _map(v, fn) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def _zip(trees: list):
    if isinstance(trees[0], dict):
        return {k: _zip([t[k] for t in trees]) for k in trees[0]}
    return np.stack([np.asarray(t) for t in trees])
