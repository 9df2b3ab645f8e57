"""The house layout (#27): no import circle, no import running back up, folders that only re-export."""

from __future__ import annotations

import ast
import importlib
import os
import warnings

import pytest

from conftest import REPO

PACKAGE = "pyro_monteclora"
ROOT = os.path.join(REPO, PACKAGE)

#: The rooms, lowest first: a module may import its own room and the rooms before it, never after.
ROOMS = [
    "_version", "_legacy", "config", "distributions", "quiet", "testing",
    "layers", "quantization", "calibration", "examples",
    "models", "io", "guides", "data",
    "monteclora",
    "prediction", "train", "inspection", "export",
    "cli",
]


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def _imports(module: str, path: str, known: dict[str, str]) -> set[str]:
    """Every module of the package that ``module`` imports, anywhere in its file (lazy imports too)."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets.add(source)
            targets |= {f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known}
    return {t for t in targets if t in known and t != module}


def _room(module: str) -> str:
    return module.split(".")[1]


@pytest.fixture(scope="module")
def graph():
    known = _modules()
    return {m: _imports(m, p, known) for m, p in known.items()}


def test_every_room_is_placed():
    rooms = {_room(m) for m in _modules() if m != PACKAGE}
    assert rooms == set(ROOMS), f"rooms not in ROOMS: {rooms - set(ROOMS)}; gone: {set(ROOMS) - rooms}"


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} -> {t}" for m, targets in graph.items() if m != PACKAGE for t in targets
        if t == PACKAGE or ROOMS.index(_room(t)) > ROOMS.index(_room(m))
    ]


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return circles


def test_no_import_runs_back_up(graph):
    assert not _upward(graph)


def test_no_import_circle(graph):
    assert not _circles(graph)


def test_the_checks_can_fail():
    """Today's circle (io.save <-> monteclora) would trip both checks."""
    save, core, layers = f"{PACKAGE}.io.save", f"{PACKAGE}.monteclora", f"{PACKAGE}.layers"
    bad = {save: {core, layers}, core: {save}, layers: set()}
    assert _upward(bad) == [f"{save} -> {core}"]
    assert _circles(bad) == [sorted([save, core])]


def test_folder_inits_only_re_export():
    """A folder's ``__init__`` holds a docstring, imports and ``__all__`` (train adds its callable-module hook)."""
    for module, path in _modules().items():
        if not path.endswith("__init__.py") or module in (PACKAGE, f"{PACKAGE}.train"):
            continue
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in tree.body[1:]:
            allowed = (ast.Import, ast.ImportFrom, ast.Assign)
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                continue  # io: the deprecated alias pyro_monteclora.io.load
            assert isinstance(node, allowed), f"{path}: line {node.lineno} is a {type(node).__name__}"


@pytest.mark.parametrize("old, new", [
    ("predictive", "prediction.predictive"), ("io_load", "io.read"), ("cli_parser", "cli.parser"),
    ("train.data", "train.batches"), ("kohya", "export.kohya"), ("data_files", "data.files"),
])
def test_old_module_paths_still_import(old, new):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert importlib.import_module(f"{PACKAGE}.{old}") is importlib.import_module(f"{PACKAGE}.{new}")


def test_an_old_path_warns_with_its_new_home():
    import sys

    sys.modules.pop(f"{PACKAGE}.io_save", None)
    with pytest.warns(DeprecationWarning, match="pyro_monteclora.io.save"):
        importlib.import_module(f"{PACKAGE}.io_save")


def test_documented_import_paths_keep_working():
    import pyro_monteclora
    from pyro_monteclora.io import load, save_pretrained  # noqa: F401  (load: an alias for a release)

    assert load is pyro_monteclora.load
    for name in pyro_monteclora.__all__:
        assert getattr(pyro_monteclora, name) is not None, name
    assert pyro_monteclora.predictive.Predictive is pyro_monteclora.Predictive
    assert callable(pyro_monteclora.train) and callable(pyro_monteclora.predict)
