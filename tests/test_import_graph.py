"""The package's import structure: no import cycles, and no module imports from a layer
above its own.

The graph is read from the source with `ast`, not by importing: every `import` and
`from ... import` statement of every module under shortv/, wherever it stands. Imports
under `if TYPE_CHECKING:` and inside functions count like top-level ones: a lazy import
still makes the module depend on the one it names (it only delays the failure), and "no
module imports from a layer above it" is about what a module needs, not about when it
loads it. `from X import name` is an edge to the submodule X.name where one exists,
otherwise to X. Importing a.b.c also runs the package a.b's `__init__`, so that is an
edge too (for packages other than the importer's own); the root package `shortv` is left
out of those implicit edges, since every submodule import runs it first by construction.

The layers, top to bottom, follow the issue's rule "CLI → workflows → session →
models/methods → ops". Where the rule leaves a choice, it is made here:

- `shortv/__init__.py` (the public API: it re-exports from every layer below) is a layer
  of its own, just under the CLI. The CLI is the public API's first client and reads
  `shortv.load` when it runs (tests replace it there to see what a command loads);
  nothing else in the package imports the public API: a module imports a name from the
  module that defines it (the version lives in shortv/version.py for that reason).
- `shortv.generate` sits between the session and the models. The generation loop is
  written against a protocol (`shortv.generate.GenerativeModel`: prefill, step, the
  tokenizer and template) and the batch data in `shortv.models.batch`; it never names a model
  family. `LLaVA.chat` / `LLaVA.generate` (public API) are conveniences over it, so the
  session imports generation, and the workflows (eval, serve) use both.
- The loaders' helpers (checkpoint reading, the weight store and hub, the model cards,
  the ShortV rankings) are part of the session: they exist to build a loaded model.
- The workflows' helpers (torchrun ranks, question files, output paths) sit with the
  workflows.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "shortv"

# Top to bottom. "name" is that module; "name.*" is a package with everything under it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("entry points", ("shortv.__main__", "shortv.cli.*")),
    ("public API", ("shortv",)),
    ("workflows", ("shortv.eval.*", "shortv.serve.*", "shortv.analysis.*", "shortv.lc", "shortv.bench",
                   "shortv.parallel", "shortv.questions", "shortv.paths")),
    ("session", ("shortv.session", "shortv.llava", "shortv.qwen_vl", "shortv.qwen_family",
                 "shortv.loading", "shortv.checkpoint", "shortv.store", "shortv.hub",
                 "shortv.zoo", "shortv.ranking", "shortv.family", "shortv.families",
                 "shortv.llava_family", "shortv.quantized_checkpoint")),
    ("generation", ("shortv.generate.*",)),
    ("models and methods", ("shortv.models.*", "shortv.image", "shortv.qwen_image", "shortv.qwen_tokenizer",
                            "shortv.tokenizer", "shortv.sentencepiece", "shortv.conversation",
                            "shortv.flops", "shortv.vision_flops", "shortv.methods.*")),
    ("ground", ("shortv.ops", "shortv.errors", "shortv.token_types", "shortv.version")),
)


def modules(package: Path) -> dict[str, tuple[Path, bool]]:
    """Every module under `package`: dotted name → (file, whether it is a package's __init__)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _base(name: str, is_package: bool, level: int) -> list[str]:
    """The package a relative import of `level` dots in module `name` starts from."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    return here[: len(here) - (level - 1)]


def imported(name: str, is_package: bool, tree: ast.AST, known: set[str], root: str) -> set[str]:
    """The modules of `known` that module `name` imports anywhere in its `tree`."""
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = ".".join([*_base(name, is_package, node.level), *([node.module] if node.module else [])]
                              ) if node.level else node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                targets.add(sub if sub in known else module)
    ours = {t for t in targets if t == root or t.startswith(root + ".")}
    unknown = ours - known
    assert not unknown, f"{name} imports {sorted(unknown)}, which is no module of {root}"
    return ours | set(_parent_packages(ours, name, root))


def _parent_packages(targets: Iterable[str], importer: str, root: str) -> Iterable[str]:
    """The packages (other than `root` and the importer's own) whose __init__ runs first."""
    for target in targets:
        parts = target.split(".")
        for i in range(2, len(parts)):
            package = ".".join(parts[:i])
            if not (importer == package or importer.startswith(package + ".")):
                yield package


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module → the modules of the same package it imports (itself excluded)."""
    found = modules(package)
    known = set(found)
    return {name: imported(name, is_package, ast.parse(path.read_text(), str(path)), known, package.name)
            - {name}
            for name, (path, is_package) in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as its modules in order (the first repeated at the end), or None."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack = [(start, iter(sorted(graph[start])))]
        path.append(start)
        on_path.add(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif child in on_path:
                return [*path[path.index(child):], child]
            elif child not in done:
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
                on_path.add(child)
    return None


def _matches(module: str, entry: str) -> bool:
    if entry.endswith(".*"):
        package = entry[:-2]
        return module == package or module.startswith(package + ".")
    return module == entry


def layer_of(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's layer (0 = top); every module must be in exactly one table entry."""
    entries = [(entry, depth) for depth, (_, names) in enumerate(LAYERS) for entry in names]
    layers, problems = {}, []
    for module in sorted(graph):
        places = [(entry, depth) for entry, depth in entries if _matches(module, entry)]
        if len(places) != 1:
            problems.append(f"{module} is in {len(places)} entries of LAYERS {[e for e, _ in places]}; "
                            "place it in exactly one layer of tests/test_import_graph.py")
        else:
            layers[module] = places[0][1]
    stale = [entry for entry, _ in entries if not any(_matches(m, entry) for m in graph)]
    problems += [f"LAYERS names {entry}, which matches no module" for entry in stale]
    assert not problems, "\n".join(problems)
    return layers


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE)


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer(graph):
    layer_of(graph)


def test_no_module_imports_from_a_layer_above(graph):
    layers = layer_of(graph)
    back = [f"{a} ({LAYERS[layers[a]][0]}) imports {b} ({LAYERS[layers[b]][0]})"
            for a in sorted(graph) for b in sorted(graph[a]) if layers[b] < layers[a]]
    assert not back, "imports from a layer above:\n" + "\n".join(back)


def test_the_reader_sees_every_kind_of_import(tmp_path):
    """The graph reader on a small package: relative imports at each depth, a submodule
    named in `from . import x`, imports under TYPE_CHECKING and inside functions, a
    package's __init__ run by importing its submodule, and outside modules ignored."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import f\n",
        "a.py": "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
        "b.py": "def g():\n    from . import c\n    import pkg.sub.d\n",
        "c.py": "from pkg import a\n",
        "sub/__init__.py": "from . import d\n",
        "sub/d.py": "from .. import c\nfrom ..a import f\nfrom . import e\n",
        "sub/e.py": "",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    assert import_graph(pkg) == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.c", "pkg.sub.d", "pkg.sub"},
        "pkg.c": {"pkg.a"},
        "pkg.sub": {"pkg.sub.d"},
        "pkg.sub.d": {"pkg.c", "pkg.a", "pkg.sub.e"},
        "pkg.sub.e": set(),
    }
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
