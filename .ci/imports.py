"""Import rules of nosq, checked from the source with ``ast`` (no import is executed).

1. Code imports nosq's packages by their one name, ``nosq.producer``/``nosq.manager``/
   ``nosq.workers``; the bare ``producer``/``manager``/``workers`` would load a second copy.
2. Layers: ``nosq.producer`` imports neither ``nosq.manager`` nor ``nosq.workers`` (``pip install
   nosq`` ships it alone); ``nosq.workers`` never imports ``nosq.manager``.
3. The manager never imports torch: no module of ``nosq.manager`` reaches ``torch`` through
   imports made at import time (torch runs only inside the actors).
4. No import cycle between nosq's modules, counting every import: at module level, inside
   functions and under ``TYPE_CHECKING``.

Usage: ``python .ci/imports.py [ROOT]`` (ROOT: the repository, by default this script's);
exit status 1 and one line per problem when a rule is broken.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("producer", "manager", "workers")
ELSEWHERE = ("tests", "benchmarks", "examples")  # rule 1 holds here too


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["nosq", *parts])


def imports(tree: ast.Module, this: str, is_package: bool) -> Iterator[tuple[str, bool, int]]:
    """(imported module, made at import time, line) for each import in ``tree``."""

    def walk(node: ast.AST, top: bool) -> Iterator[tuple[str, bool, int]]:
        for child in ast.iter_child_nodes(node):
            # at import time: module-level statements and the bodies of module-level if/try,
            # except ``if TYPE_CHECKING:``; never function bodies
            child_top = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                child_top = False
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, top, child.lineno
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = this.split(".") if is_package else this.split(".")[:-1]
                    package = package[: len(package) - (child.level - 1)]
                    base = ".".join([*package, base] if base else package)
                for alias in child.names:
                    yield f"{base}.{alias.name}", top, child.lineno  # a submodule, or a name in base
                yield base, top, child.lineno
            else:
                yield from walk(child, child_top)

    yield from walk(tree, True)


def main(root: Path = ROOT) -> int:
    problems: list[str] = []
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            modules[module_name(path, root)] = path
    edges: dict[str, set[str]] = {name: set() for name in modules}
    import_time: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for target, top, line in imports(tree, name, path.name == "__init__.py"):
            where = f"{path.relative_to(root)}:{line}"
            if target.split(".")[0] in PACKAGES:
                problems.append(f"{where}: imports {target.split('.')[0]!r}: write nosq.{target}")
            if target == "torch" or target.startswith("torch."):
                if top:
                    import_time[name].add("torch")
                continue
            if target not in modules:
                continue  # a name inside a module (kept through the module's own edge) or third party
            if target == name:
                continue
            layer, other = name.split(".")[1], target.split(".")[1]
            if (layer, other) in {("producer", "manager"), ("producer", "workers"), ("workers", "manager")}:
                problems.append(f"{where}: nosq.{layer} imports {target}: nosq.{layer} must not depend on "
                                f"nosq.{other}")
            if modules[target].name != "__init__.py":
                edges[name].add(target)
            if top:
                import_time[name].add(target)
    for directory in ELSEWHERE:
        for path in sorted((root / directory).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for target, _, line in imports(tree, "", False):
                if target.split(".")[0] in PACKAGES:
                    problems.append(f"{path.relative_to(root)}:{line}: imports {target.split('.')[0]!r}: "
                                    f"write nosq.{target}")
    problems.extend(torch_in_manager(import_time))
    problems.extend(cycles(edges))
    for problem in sorted(set(problems)):
        print(problem)
    return 1 if problems else 0


def torch_in_manager(import_time: dict[str, set[str]]) -> Iterator[str]:
    for name in sorted(import_time):
        if not name.startswith("nosq.manager"):
            continue
        seen, stack, parent = {name}, [name], {name: ""}
        while stack:
            current = stack.pop()
            for target in import_time.get(current, ()):
                if target == "torch":
                    chain = [current]
                    while parent[chain[-1]]:
                        chain.append(parent[chain[-1]])
                    yield f"{name} imports torch at import time: {' -> '.join([*reversed(chain), 'torch'])}"
                    stack.clear()
                    break
                if target not in seen:
                    seen.add(target)
                    parent[target] = current
                    stack.append(target)


def cycles(edges: dict[str, set[str]]) -> Iterator[str]:
    """One line per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    for component in found:
        yield "import cycle: " + " -> ".join(component)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT))
