"""The contract's boundaries: only `models/` and `convert/` know model families by name, and the
rest of the library reaches them through the registry and the Matcher interface."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import itmatch
from itmatch.models.registry import architectures

PACKAGE = Path(itmatch.__file__).parent
ALLOWED = ("models", "convert", "presets")


def code_words(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every identifier and every string literal that is not a docstring."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            words.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.arg)):
            words.append((node.lineno, getattr(node, "name", None) or node.arg))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.append((node.lineno, node.value))
    return words


def test_no_module_outside_models_names_a_model_family():
    names = set(architectures()) | {"vse-infty", "vse++", "vse-infinity"}
    pattern = re.compile(r"(?<![a-z])(" + "|".join(re.escape(n) for n in sorted(names)) + r")(?![a-z])", re.I)
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] in ALLOWED:
            continue
        found += [
            f"{path.relative_to(PACKAGE)}:{line}: {text!r}" for line, text in code_words(path) if pattern.search(text)
        ]
    assert not found, "model families named outside models/ and convert/:\n" + "\n".join(found)


def test_every_family_is_one_registry_entry_with_its_converter():
    from itmatch.models.registry import family, official_sources

    for name in architectures():
        entry = family(name)
        assert entry.model_class.architecture == name
        if entry.converter is not None:
            assert official_sources()[f"official-{name}"] == entry.converter
