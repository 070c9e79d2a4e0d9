"""The layout is a contract: rooms, floors and sizes are checked here, not only described.

- zo/ (the math) never imports Ray, not even lazily, and imports without it;
- the pure trainer modules (ledger, replay, digest, checkpoint, engine) import without Ray;
- each folder is a layer that imports only itself and the layers the README's layout table lists above it;
- no import cycle between modules of the package (lazy and annotation-only imports included);
- bench/ is imported by nothing outside bench/ and cli/;
- no module over 400 lines; the first-order names are written in one place;
- files that docstrings and comments name exist.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ray_s2p"
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(path: Path, annotations: bool = False) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth of the file (lazy imports too);
    those under ``if TYPE_CHECKING:`` (annotations only, never executed) only with ``annotations``."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if not annotations and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    here = module_name(path).split(".")
    base = here if is_package(path) else here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[:len(base) - node.level + 1]
                mod = ".".join(root + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            # "from . import cluster" imports the submodule ray_s2p.bench.cluster
            found.update(f"{mod}.{alias.name}" for alias in node.names)
    return found


def package_graph(annotations: bool = False) -> dict[str, set[str]]:
    names = {module_name(p) for p in MODULES}
    graph = {}
    for path in MODULES:
        graph[module_name(path)] = {m for m in imports_of(path, annotations) if m in names and m != module_name(path)}
    return graph


def readme_layers() -> list[str]:
    """The layer order of the README's layout table: "top" for its first row (the modules at the package's
    top level), then each folder row's name, in the table's order."""
    rows = re.findall(r"^\| `([\w.]+)(/?)`", (REPO / "README.md").read_text(), re.M)
    start = next(i for i, (name, _) in enumerate(rows) if name == "config.py")
    layers = ["top"]
    for name, slash in rows[start + 1:]:
        if not slash:
            break
        layers.append(name)
    return layers


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else "top"


def test_zo_never_imports_ray_even_lazily():
    offenders = [f"{p.relative_to(REPO)} imports {m}" for p in MODULES if "zo" in p.relative_to(PACKAGE).parts[:1]
                 for m in imports_of(p) if m == "ray" or m.startswith("ray.")]
    assert offenders == []


def test_zo_and_the_pure_trainer_modules_import_without_ray():
    # zo/triton_kernels.py needs the optional triton (the gpu extra); it is imported too where triton is installed.
    optional = {"ray_s2p.zo.triton_kernels": "triton"}
    zo = sorted(m for m in (module_name(p) for p in MODULES if p.relative_to(PACKAGE).parts[0] == "zo")
                if m not in optional or importlib.util.find_spec(optional[m]) is not None)
    pure = ["ray_s2p.zo.ledger", "ray_s2p.distributed.replay", "ray_s2p.distributed.digest",
            "ray_s2p.distributed.checkpoint", "ray_s2p.distributed.engine", "ray_s2p.distributed.messages"]
    assert "ray_s2p.zo.rules.vs2p" in zo and "ray_s2p.zo.optimizer" in zo
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {zo + pure!r}]; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_the_readme_lists_every_folder_of_the_package_as_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    layers = readme_layers()
    assert layers[0] == "top" and sorted(layers[1:]) == sorted(folders)


def test_each_layer_imports_only_itself_and_the_layers_above_it():
    order = {name: i for i, name in enumerate(readme_layers())}
    face = {"ray_s2p", "ray_s2p.__main__"}  # the package face re-exports the public API from every layer
    offenders = [f"{mod} ({layer_of(mod)}) imports {m} ({layer_of(m)})"
                 for mod, deps in package_graph(annotations=True).items() if mod not in face
                 for m in deps if order[layer_of(m)] > order[layer_of(mod)]]
    assert offenders == []


def test_no_import_cycles():
    graph = package_graph(annotations=True)
    # Package faces (__init__) that re-export their own submodules are not cycles; edges into a package
    # face from outside still count.
    def edges(mod: str) -> set[str]:
        return {m for m in graph[mod] if not m.startswith(mod + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        stack.append(mod)
        for nxt in sorted(edges(mod)):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)
    assert cycles == []


def test_bench_is_imported_only_by_bench_and_cli():
    graph = package_graph()
    offenders = [f"{mod} -> {m}" for mod, deps in graph.items() for m in deps
                 if m.startswith("ray_s2p.bench") and not mod.startswith(("ray_s2p.bench", "ray_s2p.cli"))]
    assert offenders == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_at_most_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


def test_first_order_names_are_written_once():
    pattern = re.compile(r"""\(\s*["']sgd["']\s*,\s*["']adamw["']\s*\)""")
    where = [str(p.relative_to(REPO)) for p in MODULES if pattern.search(p.read_text())]
    assert where == ["ray_s2p/config.py"]


# A file name as docstrings and comments write it: "docs/method.md", "engine.py", "zo/rules/".
FILE_REF = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.(?:py|md|yaml|toml|sh))\b")


def named_files(path: Path) -> set[str]:
    text = path.read_text()
    tree = ast.parse(text)
    docs = [ast.get_docstring(n) or "" for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    comments = [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]
    return {m for chunk in docs + comments for m in FILE_REF.findall(chunk)}


def exists(ref: str, path: Path) -> bool:
    candidates = [REPO / ref, PACKAGE / ref, path.parent / ref, path.parent.parent / ref]
    return any(c.exists() for c in candidates)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_named_in_docstrings_and_comments_exist(path):
    # Files a run or a sweep writes, named where the code writes them; not files of the repository.
    runtime = {"config.yaml", "summary.md", "tuning.md", "comparison.md"}
    missing = sorted(ref for ref in named_files(path) if ref not in runtime and not exists(ref, path))
    assert missing == []


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# A path, optionally with ::test; or a bare `::test`, which names a test of the last file cited on its line
# (how docs/reliability.md lists several tests of one file in a row).
DOC_PATH = re.compile(r"(?P<path>(?:ray_s2p|tests|jobs|docs)/[\w/.-]*\w)(?:::(?P<test>\w+))?"
                      r"|(?<![\w/.])::(?P<bare>\w+)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_paths_and_tests_cited_in_the_docs_exist(doc):
    missing = []
    for line in doc.read_text().splitlines():
        last_file = None
        for ref in DOC_PATH.finditer(line):
            path, test = ref["path"], ref["test"]
            if path is None:  # a bare ::test
                if last_file is None:
                    missing.append(f"::{ref['bare']} (no file before it on its line)")
                    continue
                path, test = last_file, ref["bare"]
            target = REPO / path
            if not target.exists():
                missing.append(path)
                continue
            if path.endswith(".py"):
                last_file = path
            if test and not re.search(rf"^def {test}\(", target.read_text(), re.M):
                missing.append(f"{path}::{test}")
    assert missing == []
