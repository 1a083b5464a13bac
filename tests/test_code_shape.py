"""The shape of the code itself: layers import one way, and no function grows past a screenful.

Read from the source with ``ast`` (nothing is imported), so a violation anywhere in a file counts,
including imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: packages that sit below the model layers: metrics and rewards are used by backbones, training
#: and the Lightning pipeline, so importing any of those from here would close a cycle
LOWER_PACKAGES = ("metrics", "rewards")
FORBIDDEN_PREFIXES = ("ntrk_lightning.backbones", "ntrk_lightning.pipeline", "ntrk_lightning.training")

#: packages whose functions must stay short, and the limit (lines from ``def`` to the last line)
SHAPED_PACKAGES = ("ntrk_lightning", "rewards", "metrics")
MAX_FUNCTION_LINES = 80
#: temporary exceptions, "path:function" -> reason; empty when every function complies
ALLOWED_LONG_FUNCTIONS: dict[str, str] = {}


def _sources(packages: tuple[str, ...]) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``tree``: ``import a.b`` gives ``a.b``;
    ``from a import b`` gives ``a.b`` (b may be a module) — so both spellings are caught."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def forbidden_imports(source: str, filename: str = "<source>") -> list[str]:
    out = []
    for line, module in imported_modules(ast.parse(source, filename)):
        if any(module == p or module.startswith(p + ".") for p in FORBIDDEN_PREFIXES):
            out.append(f"{filename}:{line} imports {module}")
    return out


def imports_of(source: str, prefix: str, filename: str = "<source>") -> list[str]:
    return [f"{filename}:{line} imports {m}" for line, m in imported_modules(ast.parse(source, filename))
            if m == prefix or m.startswith(prefix + ".")]


def long_functions(source: str, filename: str = "<source>") -> list[tuple[str, int]]:
    """(``filename:qualname``, length in lines) of every function longer than the limit."""
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = child.end_lineno - child.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        out.append((f"{filename}:{name}", length))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source, filename), "")
    return out


def test_checks_catch_what_they_look_for():
    assert forbidden_imports("from ntrk_lightning.backbones.digits_unet import load_unet\n")
    assert forbidden_imports("def f():\n    import ntrk_lightning.training.quality as q\n")
    assert forbidden_imports("from ntrk_lightning import pipeline\n")
    assert not forbidden_imports("from ntrk_lightning.data.digits import real_images\n")
    assert not forbidden_imports("from ntrk_lightning import trainingwheels\n")
    body = "".join(f"    x = {i}\n" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"class A:\n    def f(self):\n    {body.replace(chr(10) + '    ', chr(10) + '        ')}")
    assert long_functions(f"def f():\n{body}") == [("<source>:f", MAX_FUNCTION_LINES + 1)]
    assert not long_functions(f"def f():\n{''.join(body.splitlines(True)[:-1])}")


@pytest.mark.parametrize("package", LOWER_PACKAGES)
def test_lower_layers_never_import_the_model_layers(package):
    bad = [hit for p in _sources((package,))
           for hit in forbidden_imports(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert not bad, "metrics/rewards must not import backbones, pipeline or training:\n" + "\n".join(bad)


def test_no_function_is_longer_than_the_limit():
    too_long = [(name, n) for p in _sources(SHAPED_PACKAGES)
                for name, n in long_functions(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))
                if name not in ALLOWED_LONG_FUNCTIONS]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {too_long}"
    stale = [k for k in ALLOWED_LONG_FUNCTIONS
             if not any(k == name for p in _sources(SHAPED_PACKAGES)
                        for name, _ in long_functions(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT))))]
    assert not stale, f"allowed long functions that are short now (drop them from the list): {stale}"


def test_rewards_never_import_metrics():
    """metrics -> rewards is the one direction (the digits feature network is a reward classifier's
    trunk); rewards -> metrics would close a cycle between the two packages."""
    assert imports_of("from metrics.images import as_float01\n", "metrics")
    bad = [hit for p in _sources(("rewards",))
           for hit in imports_of(p.read_text(encoding="utf-8"), "metrics", str(p.relative_to(ROOT)))]
    assert not bad, "rewards must not import metrics (shared helpers live in ntrk_lightning):\n" + "\n".join(bad)
