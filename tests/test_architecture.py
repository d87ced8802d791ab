"""The shape docs/architecture.md promises, kept by a test: small classes, and no module reaching
into another's private names (a refactor that re-grows a 600-line class or re-couples two modules
fails here, not in review)."""

import ast
from pathlib import Path

import self_healing

PKG = Path(self_healing.__file__).parent
MAX_CLASS_LINES = 300
FIELD_DECLARATIONS = {"HealingConfig": 340}
"""HealingConfig is its ~60 documented fields; its checks live in config_checks.py."""


def _modules():
    for f in sorted(PKG.glob("*.py")):
        yield f, ast.parse(f.read_text())


def test_no_class_over_300_lines():
    big = [f"{f.name}: {n.name} {n.end_lineno - n.lineno + 1} lines"
           for f, tree in _modules() for n in ast.walk(tree)
           if isinstance(n, ast.ClassDef) and n.end_lineno - n.lineno + 1 > FIELD_DECLARATIONS.get(n.name, MAX_CLASS_LINES)]
    assert not big, big


def test_no_module_imports_another_modules_private_names():
    found = [f"{f.name}:{n.lineno}: from .{n.module} import {a.name}"
             for f, tree in _modules() for n in ast.walk(tree)
             if isinstance(n, ast.ImportFrom) and n.level == 1
             for a in n.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


def test_no_module_reads_a_private_attribute_of_a_sibling_module():
    """`from . import snapshot; snapshot._x` or `import self_healing.callback as cbm; cbm._x`."""
    found = []
    for f, tree in _modules():
        siblings = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1
                    and not n.module for a in n.names}
        for n in ast.walk(tree):
            if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in siblings
                    and n.attr.startswith("_") and not n.attr.startswith("__")):
                found.append(f"{f.name}:{n.lineno}: {n.value.id}.{n.attr}")
    assert not found, found
