"""The package's layers, checked from the source: imports run one way (data → model → maps →
metrics → pipeline → cli | jobs | app), the command line alone parses arguments, and the library
never reaches up into the app."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "rd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at any depth (function-level imports included; imports
    only for type checkers excluded). ``from a import b`` names ``a.b`` when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {id(node) for block in ast.walk(tree)
               if isinstance(block, ast.If) and _is_type_checking(block)
               for stmt in block.body for node in ast.walk(stmt)}
    package = _module_name(path) if path.name == "__init__.py" else \
        _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package upwards
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.append(child if child in MODULES else base)
    return found


IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _graph() -> dict[str, set[str]]:
    return {name: {target for target in targets if target in MODULES and target != name}
            for name, targets in IMPORTS.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a list of modules, the first repeated at the end)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_import_reader_sees_function_level_and_relative_imports():
    assert "rd.cli" in IMPORTS["rd.__main__"]
    assert "rd.pipeline" in IMPORTS["rd.jobs"]  # an import at module level
    source = PACKAGE / "cli" / "jobs.py"
    assert _module_name(source) == "rd.cli.jobs" and "rd.cli.train" in IMPORTS["rd.cli.jobs"]


def test_rd_has_no_import_cycle():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_the_package_root():
    """``rd/__init__`` imports the public API; a module importing it back would be a cycle."""
    offenders = [name for name, targets in IMPORTS.items() if name != "rd" and "rd" in targets]
    assert offenders == []


@pytest.mark.parametrize("forbidden", ["argparse"])
def test_argument_parsing_lives_in_the_command_line_layer(forbidden):
    offenders = [name for name, targets in IMPORTS.items()
                 if not (name == "rd.cli" or name.startswith("rd.cli."))
                 and any(t == forbidden or t.startswith(forbidden + ".") for t in targets)]
    assert offenders == []


def test_the_library_never_imports_the_app_or_streamlit():
    offenders = {name: sorted(t for t in targets if t.split(".")[0] in ("app", "streamlit"))
                 for name, targets in IMPORTS.items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_only_the_entry_point_imports_the_command_line():
    """Jobs, the pipeline and the rest call library functions, never ``rd.cli``."""
    users = sorted(name for name, targets in IMPORTS.items()
                   if any(t == "rd.cli" or t.startswith("rd.cli.") for t in targets)
                   and not (name.startswith("rd.cli") or name == "rd.__main__"))
    assert users == []


def test_every_error_of_the_package_is_an_rd_error():
    """One family: a caller that only reports errors catches RDError."""
    import importlib

    from rd.errors import RDError

    errors = []
    for name in MODULES:
        if name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        errors += [value for value in vars(module).values()
                   if isinstance(value, type) and issubclass(value, Exception)
                   and value.__module__ == name and value.__name__.endswith("Error")]
    assert len(errors) >= 10
    assert [e.__qualname__ for e in errors if not issubclass(e, RDError)] == []


def _threshold_comparisons(path: Path) -> list[str]:
    """Comparisons of something with ``threshold`` (a name or an attribute so called) in ``path``,
    other than comparing curve points (``thresholds``) with it."""

    def names(node: ast.AST) -> set[str]:
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare) and any(
                isinstance(op, ast.Gt | ast.GtE | ast.Lt | ast.LtE) for op in node.ops):
            operands = [names(operand) for operand in [node.left, *node.comparators]]
            if any("threshold" in found_names for found_names in operands) and not any(
                    "thresholds" in found_names for found_names in operands):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_verdict_rule_is_written_once():
    """Issue 10, one verdict: ``score >= threshold`` is written in ``rd.decision.is_defective``
    only; the pages, views, results, scoring (CLI predict) and benchmarks call it. (The
    baseline benchmark re-implements the reference's PRO sweep, not a verdict.)"""
    root = PACKAGE.parent
    files = [path for folder in ("rd", "app", "benchmarks")
             for path in sorted((root / folder).rglob("*.py"))
             if path not in (PACKAGE / "decision.py", root / "benchmarks" / "baseline.py")]
    assert [hit for path in files for hit in _threshold_comparisons(path)] == []
    assert _threshold_comparisons(PACKAGE / "decision.py")  # the rule itself is seen


def test_the_verdict_rule_reader_finds_a_repeat(tmp_path):
    repeat = tmp_path / "repeat.py"
    repeat.write_text("def f(value, threshold, thresholds, context):\n"
                      "    a = value >= threshold\n"
                      "    b = thresholds >= threshold\n"
                      "    return a, b, context.fused < context.threshold\n")
    assert _threshold_comparisons(repeat) == ["repeat.py:2: value >= threshold",
                                              "repeat.py:4: context.fused < context.threshold"]
