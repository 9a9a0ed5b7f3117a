"""The library's imports go one way: no module of qdtk (the CLI included) imports, at any depth
and from anywhere in its file (functions too), a module that imports it back."""

import ast
import importlib.util
from pathlib import Path

import qdtk


def modules() -> dict[str, Path]:
    """{dotted name: file} of every module of qdtk and of its subpackages, wherever they live
    (qdtk.cli is installed from cli/)."""
    roots = {"qdtk": Path(qdtk.__file__).parent}
    spec = importlib.util.find_spec("qdtk.cli")
    roots["qdtk.cli"] = Path(next(iter(spec.submodule_search_locations)))
    found = {}
    for package, root in roots.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found.setdefault(".".join(parts), path)
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The qdtk modules that `name` (at `path`) imports, resolved to the modules that exist
    (`from qdtk.x import y`: qdtk.x.y if it is a module, else qdtk.x)."""
    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "qdtk" and (hit := resolve(target)) not in (None, name):
                out.add(hit)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20 and "qdtk.cli.main" in graph  # the walk saw the library and the CLI
    assert any(graph.values())
    assert cycles(graph) == []


def test_the_cycle_finder_sees_every_import(tmp_path):
    """A circle counts however long; imports inside functions and relative ones count too."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}) == [
        ["a", "b", "c"]]
    path = tmp_path / "mod.py"
    path.write_text("import numpy\n\ndef f():\n    from . import sibling\n"
                    "    from qdtk.pkg.other import thing\n")
    known = {"qdtk.pkg", "qdtk.pkg.mod", "qdtk.pkg.sibling", "qdtk.pkg.other"}
    assert imported("qdtk.pkg.mod", path, known) == {"qdtk.pkg", "qdtk.pkg.sibling",
                                                     "qdtk.pkg.other"}


# The layers, bottom up: each module imports only from its own layer and the ones below.
LAYERS = [
    ("base", ("qdtk.errors", "qdtk.backend", "qdtk.threads")),
    ("formats and math", ("qdtk.formats", "qdtk.math")),
    ("layer driver", ("qdtk.solve", "qdtk.options")),
    ("torch corner", ("qdtk.torch",)),
    ("stages", ("qdtk.quantize", "qdtk.allocate", "qdtk.cluster", "qdtk.pack", "qdtk.pipeline",
                "qdtk.report")),
    ("CLI and package", ("qdtk.cli", "qdtk")),
]


def layer_of(module: str) -> int:
    """The layer of the longest prefix naming `module` (the package qdtk itself only exactly)."""
    hits = [(len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
            if module == p or (p != "qdtk" and module.startswith(p + "."))]
    assert hits, f"{module} is in no layer: add it to LAYERS"
    return max(hits)[1]


def test_the_arrows_go_down():
    graph = import_graph()
    up = sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
                for m, deps in graph.items() for d in deps
                if layer_of(d) > layer_of(m) and not (m == "qdtk.cli.main" and d == "qdtk"))
    assert up == []


def test_torch_lives_in_its_corner():
    """Only qdtk.torch's modules import torch or transformers (functions included)."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            if any(n.split(".")[0] in ("torch", "transformers") for n in names):
                found.append(name)
    assert found and all(n.startswith("qdtk.torch") for n in found), sorted(set(found))
