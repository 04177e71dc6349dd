"""The layering stated in the README, read from the import statements of every module (top-level and
function-local imports alike): models -> domain (with convert beside it) -> data -> training / inference ->
evaluation / serving -> entry points. A module may import its own layer and the layers below it, never one above."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lower rank = lower layer. Packages not listed (stdlib, third party) are not checked.
LAYERS = {
    "cxrllava_jax.errors": 0,
    "cxrllava_jax.files": 1,  # output and input file helpers; raise the errors above
    "cxrllava_jax.hub": 1,  # model references: local directories or Hugging Face Hub ids
    "cxrllava_jax.sharding": 0,
    "cxrllava_jax.accelerator": 0,  # memory shares of processes on one accelerator, set before JAX starts
    "cxrllava_jax.models": 1,
    "cxrllava_jax.convert": 3,  # weight formats; reads the domain's tokenizer files
    "cxrllava_jax.domain": 2,
    "input_pipeline": 3,
    "cxrllava_jax.training": 4,
    "cxrllava_jax.inference": 4,
    "cxrllava_jax.evaluation": 5,  # scores reports that inference writes (eval.py --checkpoint)
    "cxrllava_jax.serving": 5,
    "cxrllava_jax.reference": 5,  # PyTorch references and tiny models for tests and benchmarks
    "cxrllava_jax.cli": 6,
    "cxrllava_jax": 6,  # the package's __init__
}


def layer_of(module: str):
    best = None
    for prefix in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return best


def imports_of(path: pathlib.Path, module: str):
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # `from cxrllava_jax import sharding` names a module, not the package
                yield node.lineno, f"{target}.{alias.name}"


def library_modules():
    for top in ("cxrllava_jax", "input_pipeline"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield path, module


def violations():
    found = []
    for path, module in library_modules():
        own = layer_of(module)
        assert own is not None, f"{module} is in no layer: add it to LAYERS"
        for lineno, target in imports_of(path, module):
            other = layer_of(target)
            if other is None or other == own:
                continue
            if LAYERS[other] > LAYERS[own]:
                found.append(f"{path.relative_to(ROOT)}:{lineno}: {own} (layer {LAYERS[own]}) imports "
                             f"{target} (layer {LAYERS[other]})")
            elif LAYERS[other] == LAYERS[own] and other != "cxrllava_jax":
                found.append(f"{path.relative_to(ROOT)}:{lineno}: {own} imports its sibling {target}")
    return found


def test_library_imports_point_down_the_layering():
    assert violations() == []


def test_library_never_imports_the_configs():
    """configs/ is not installed: library code that imports it would run only from the repository root."""
    found = [f"{path.relative_to(ROOT)}:{lineno}: {target}" for path, module in library_modules()
             for lineno, target in imports_of(path, module) if target == "configs" or target.startswith("configs.")]
    assert found == []


def test_no_package_level_cycles():
    edges = {}
    for path, module in library_modules():
        own = layer_of(module)
        for _, target in imports_of(path, module):
            other = layer_of(target)
            if other is not None and other != own:
                edges.setdefault(own, set()).add(other)

    def reachable(start):
        seen, stack = set(), [start]
        while stack:
            for nxt in edges.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    cycles = sorted(p for p in edges if p in reachable(p) and p != "cxrllava_jax")
    assert cycles == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The check itself can fail: a domain module importing training is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom cxrllava_jax.training import loop\n")
    targets = [t for _, t in imports_of(bad, "cxrllava_jax.domain.bad")]
    assert any(LAYERS[layer_of(t)] > LAYERS["cxrllava_jax.domain"] for t in targets if layer_of(t))


@pytest.mark.parametrize("entry", ["train.py", "eval.py"])
def test_entry_points_are_thin(entry):
    assert len((ROOT / entry).read_text().splitlines()) < 80  # flags and a dispatch; the work is in the library
