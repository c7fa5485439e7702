"""The public API's docstrings: numpydoc-valid, and every class and function has an example.

The examples themselves run as doctests (``--doctest-modules`` in ``pytest.ini``); this
file checks that they exist and that the docstrings follow numpydoc, with the same
checks ``doc/conf.py`` enforces in the Sphinx build.
"""

import ast
import importlib
import inspect
from pathlib import Path

import pytest
from numpydoc.validate import validate


def _ignored_checks():
    """The checks ``numpydoc_validation_checks`` in ``doc/conf.py`` leaves out (read from
    its source, so the build and this test cannot drift apart)."""
    tree = ast.parse((Path(__file__).parent.parent / "doc" / "conf.py").read_text())
    for node in tree.body:
        if (isinstance(node, ast.Assign)
                and [t.id for t in node.targets] == ["numpydoc_validation_checks"]):
            checks = ast.literal_eval(node.value)
            assert "all" in checks, "doc/conf.py no longer validates every check"
            return checks - {"all"}
    raise AssertionError("doc/conf.py sets no numpydoc_validation_checks")


IGNORED_CHECKS = _ignored_checks()

PUBLIC_MODULES = [
    "skmsif",
    "skmsif.baselines",
    "skmsif.datasets",
    "skmsif.model_selection",
    "skmsif.turnover",
    "skmsif.validation",
]


def _public_objects():
    """``(qualified name, object)`` of every public class and function, once each."""
    seen = {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                seen.setdefault(f"{obj.__module__}.{obj.__qualname__}", obj)
    return sorted(seen.items())


def _public_methods():
    """Qualified names of the methods and properties each public class defines itself."""
    names = []
    for qualified, obj in _public_objects():
        if inspect.isclass(obj):
            for name, member in vars(obj).items():
                if name.startswith("_"):
                    continue
                if inspect.isfunction(member) or isinstance(member, property):
                    names.append(f"{qualified}.{name}")
    return names


OBJECTS = _public_objects()


def test_every_module_lists_its_public_names():
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        assert module.__all__, module_name
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert not missing, f"{module_name}.__all__ names missing objects: {missing}"


@pytest.mark.parametrize("qualified", [q for q, _ in OBJECTS] + _public_methods())
def test_numpydoc_valid(qualified):
    errors = [f"{code}: {message}" for code, message in validate(qualified)["errors"]
              if code not in IGNORED_CHECKS]
    assert not errors, f"{qualified}:\n" + "\n".join(errors)


@pytest.mark.parametrize("qualified, obj", OBJECTS, ids=[q for q, _ in OBJECTS])
def test_has_a_doctest_example(qualified, obj):
    doc = inspect.getdoc(obj) or ""
    assert "\nExamples\n--------\n" in doc, f"{qualified} has no Examples section"
    examples = doc.split("\nExamples\n--------\n", 1)[1]
    assert ">>> " in examples, f"{qualified}'s Examples section has no doctest"
