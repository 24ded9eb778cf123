"""One exception tree: every exception class of producer, manager and workers derives from
``NosqError`` and is drawn in the tree of ``producer/errors.py`` and of docs/operations.md."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

from nosq import producer
from nosq.producer import NosqError, errors

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nosq.producer", "nosq.manager", "nosq.workers")


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                if (inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == info.name
                        and not name.startswith("_")):
                    found[f"{info.name}.{name}"] = value
    return found


def _drawn(text: str) -> set[str]:
    """Class names on the lines of a tree drawn with ├── / └──."""
    return set(re.findall(r"(?:├──|└──)\s+(\w+)", text)) | {"NosqError"}


def test_every_exception_is_a_nosq_error() -> None:
    classes = _exception_classes()
    assert len(classes) >= 17, sorted(classes)  # the walk found the modules (a broken walk finds none)
    strays = sorted(path for path, cls in classes.items() if not issubclass(cls, NosqError))
    assert not strays, f"exception classes outside the tree (derive them from NosqError): {strays}"


def test_the_tree_is_drawn_in_errors_and_in_the_docs() -> None:
    names = {cls.__name__ for cls in _exception_classes().values()}
    in_code = _drawn(errors.__doc__ or "")
    docs = (ROOT / "docs" / "operations.md").read_text()
    in_docs = _drawn(docs[docs.index("## Errors"):])
    assert names - in_code == set(), "missing from producer/errors.py's tree"
    assert names - in_docs == set(), "missing from the tree in docs/operations.md (## Errors)"
    assert in_code == in_docs, "producer/errors.py and docs/operations.md draw different trees"


def test_the_tree_matches_the_classes() -> None:
    """Each drawn child sits under the parent the drawing says."""
    classes = {cls.__name__: cls for cls in _exception_classes().values()}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        match = re.match(r"^(\s*(?:│\s*)*)(?:├──|└──)\s+(\w+)", line)
        if match is None:
            if line.strip() == "NosqError":
                stack = [(0, "NosqError")]
            continue
        depth = len(match.group(1)) // 4 + 1
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parent = stack[-1][1]
        child = match.group(2)
        assert issubclass(classes[child], classes.get(parent, NosqError)), f"{child} is drawn under {parent}"
        stack.append((depth, child))
    assert set(errors.__all__) <= set(producer.__all__)
