"""The house rules of the layout, read from the source: data flows one way (scripts -> captioning -> models), no
script imports another, tests and benchmarks import neither each other nor the scripts' internals by path, and
the library's import graph has no cycles."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {p.stem for p in ROOT.glob("*.py")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set:
    """Every module name an import statement of the file names (`from a.b import c` gives a.b and a.b.c)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def library_files():
    return sorted([*ROOT.glob("models/*.py"), *ROOT.glob("captioning/**/*.py")])


def test_the_root_holds_only_the_scripts():
    assert SCRIPTS == {"parse_coco", "train", "predict", "evaluate", "convert_checkpoint", "demo", "shapes_data", "app"}


def test_lower_layers_never_import_higher_ones():
    for path in library_files():
        names = imports(path)
        assert not names & SCRIPTS, f"{path.relative_to(ROOT)} imports a script: {sorted(names & SCRIPTS)}"
        if path.parent.name == "models":
            assert not any(n.split(".")[0] == "captioning" for n in names), f"{path} imports the library"


def test_no_script_imports_another_and_tests_and_benchmarks_keep_to_themselves():
    tests = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    benchmarks = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    for path in ROOT.glob("*.py"):
        assert not imports(path) & (SCRIPTS - {path.stem}), f"{path.name} imports another script"
    for path in (ROOT / "benchmarks").glob("*.py"):
        names = imports(path)
        assert not names & (SCRIPTS | tests | {"conftest"}), f"{path.name} imports a script or a test"
        assert not uses_sys_path(path), f"{path.name} manipulates sys.path"
    for path in (ROOT / "tests").glob("*.py"):
        names = imports(path)
        assert not names & (tests | benchmarks), f"tests/{path.name} imports another test or a benchmark"
        assert not uses_sys_path(path), f"tests/{path.name} manipulates sys.path"


def uses_sys_path(path: Path) -> bool:
    """Whether the code (not its strings) touches sys.path."""
    return any(isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
               and node.value.id == "sys" for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))


def test_the_library_import_graph_has_no_cycles():
    modules = {module_name(p): p for p in library_files()}
    graph = {name: {n for n in imports(path) if n in modules and n != name} for name, path in modules.items()}
    done, active = set(), []

    def visit(name):
        if name in active:
            raise AssertionError(f"import cycle: {' -> '.join(active[active.index(name):] + [name])}")
        if name not in done:
            active.append(name)
            for other in sorted(graph[name]):
                visit(other)
            active.pop()
            done.add(name)

    for name in sorted(graph):
        visit(name)
