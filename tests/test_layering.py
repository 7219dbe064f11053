"""The four packages import only downward: formats <- kernels <- plugins <- daemon.

Every module's imports are read with `ast` (Cython sources with a line match,
since ast cannot parse them), at any depth — a function-local import is still
a dependency, and a TYPE_CHECKING one still ties the layers. Two rules:

- no import of a higher layer (kernels must not import plugins, ...);
- no import cycle between modules, inside a layer or across it: a cycle means
  neither module can be read (or tested) without the other.

The rules are checked against the real tree, and each check is shown to catch
the fault it names on a small synthetic tree, so a green run means something.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("formats", "kernels", "plugins", "daemon")   # bottom up
CYTHON_IMPORT = re.compile(r"^\s*(?:from\s+(ember(?:\.\w+)+)\s+c?import\b|c?import\s+(ember(?:\.\w+)+))", re.M)


# ---------------------------------------------------------------------------
# Reading the tree: module name -> the ember modules it imports
# ---------------------------------------------------------------------------

def module_name(root: Path, path: Path) -> str:
    """formats/gguf.py -> ember.formats.gguf; daemon/commands/__init__.py -> ember.daemon.commands."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["ember", *parts])


def imported_names(path: Path) -> set[str]:
    """Every `ember.*` name an import statement in the file mentions (module or module.attr)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".pyx", ".pxi", ".pxd"):
        return {a or b for a, b in CYTHON_IMPORT.findall(text)}
    names = set()
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("ember."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ember."):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the modules of the tree it imports (`from ember.x import y` counts x.y when
    y is a module, else x)."""
    files = {module_name(root, p): p for layer in LAYERS if (root / layer).is_dir()
             for p in (root / layer).rglob("*") if p.suffix in (".py", ".pyx", ".pxi", ".pxd")}
    graph = {}
    for mod, path in files.items():
        deps = set()
        for name in imported_names(path):
            while name and name not in files:
                name = name.rpartition(".")[0]      # ember.x.y (an attribute) -> ember.x
            if name and name != mod:
                deps.add(name)
        graph[mod] = deps
    return graph


# ---------------------------------------------------------------------------
# The two rules
# ---------------------------------------------------------------------------

def layer(mod: str) -> int:
    return LAYERS.index(mod.split(".")[1])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[layer(m)]}) imports {d} ({LAYERS[layer(d)]})"
                  for m, deps in graph.items() for d in deps if layer(d) > layer(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


# ---------------------------------------------------------------------------
# The real tree
# ---------------------------------------------------------------------------

def test_the_tree_has_every_layer_and_their_modules():
    graph = import_graph(ROOT)
    assert {m.split(".")[1] for m in graph} == set(LAYERS)
    assert {"ember.formats.gguf", "ember.formats.model_config", "ember.kernels.forward",
            "ember.plugins.registry", "ember.daemon.engine"} <= set(graph)
    assert "ember.formats.model_config" in graph["ember.kernels.forward"]


def test_no_layer_imports_a_layer_above_it():
    assert upward_imports(import_graph(ROOT)) == []


def test_no_import_cycles_between_modules():
    assert cycles(import_graph(ROOT)) == []


def test_bench_scripts_import_the_library_not_cli_commands():
    """bench/ measures what an app embeds; a CLI command module is a front end, not an API."""
    scripts = sorted((ROOT / "bench").glob("*.py"))
    assert scripts
    assert [p.name for p in scripts
            if any(n.startswith("ember.daemon.commands") for n in imported_names(p))] == []


# ---------------------------------------------------------------------------
# The checks catch what they name
# ---------------------------------------------------------------------------

def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_an_upward_import_is_named_even_inside_a_function(tmp_path):
    root = write_tree(tmp_path, {
        "formats/a.py": "",
        "kernels/k.py": "def f():\n    from ember.plugins.p import thing\n",
        "plugins/p.py": "from ember.formats import a\nthing = 1\n",
        "daemon/d.py": "import ember.plugins.p\n",
    })
    assert upward_imports(import_graph(root)) == [
        "ember.kernels.k (kernels) imports ember.plugins.p (plugins)"]


def test_a_cycle_inside_a_layer_is_found(tmp_path):
    root = write_tree(tmp_path, {
        "plugins/x.py": "from ember.plugins import y\n",
        "plugins/y.py": "from ember.plugins.z import f\n",
        "plugins/z.py": "import ember.plugins.x\n",
        "plugins/w.py": "from ember.plugins import x\n",
    })
    assert cycles(import_graph(root)) == [["ember.plugins.x", "ember.plugins.y", "ember.plugins.z"]]


@pytest.mark.parametrize("line, expected", [
    ("from ember.kernels cimport _native\n", {"ember.kernels"}),
    ("import ember.plugins.registry\n", {"ember.plugins.registry"}),
    ("from libc.stdint cimport uint8_t\n", set()),
])
def test_cython_imports_are_read(tmp_path, line, expected):
    (tmp_path / "m.pyx").write_text(line)
    assert imported_names(tmp_path / "m.pyx") == expected


# ---------------------------------------------------------------------------
# daemon/: the model API stands alone
# ---------------------------------------------------------------------------

# What an app embeds without a daemon (docs/architecture.md, "The parts of daemon/").
MODEL_API = ("engine", "sampling", "chat", "budget", "synthetic")
SERVER_LIBRARIES = ("zmq", "aiohttp", "prometheus_client")


def test_the_model_api_imports_no_server_part_and_no_server_library():
    api = {f"ember.daemon.{m}" for m in MODEL_API}
    graph = import_graph(ROOT)
    assert api <= set(graph)
    wrong = sorted(f"{m} imports {d}" for m in api for d in graph[m]
                   if d.startswith("ember.daemon.") and d not in api)
    assert wrong == []
    for m in MODEL_API:
        tree = ast.parse((ROOT / "daemon" / f"{m}.py").read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
        assert not roots & set(SERVER_LIBRARIES), (m, roots & set(SERVER_LIBRARIES))


# ---------------------------------------------------------------------------
# docs/architecture.md names functions that exist
# ---------------------------------------------------------------------------

REF = re.compile(r"`([\w/]+\.(?:py|pyx|pxi|c)):([\w.]+)`((?:\s*->\s*`\w+`(?:\s*/\s*`\w+`)*)*)")


def doc_references(text: str) -> list[tuple[str, list[str]]]:
    """(file, [qualified names]) for every `file:Name` in the text, with the `-> name` hops
    after it resolved in the same file (and class, for Class.method)."""
    out = []
    for path, name, hops in REF.findall(text):
        names = [name]
        owner = name.rpartition(".")[0]
        for hop in re.findall(r"`(\w+)`", hops):
            names.append(f"{owner}.{hop}" if owner else hop)
        out.append((path, names))
    return out


def defined(path: Path, qualname: str) -> bool:
    text = path.read_text()
    if path.suffix == ".c":
        return re.search(rf"\b{qualname}\(", text) is not None
    parts = qualname.split(".")
    return all(re.search(rf"^\s*(?:cdef |cpdef )?(?:def|class) {p}\b", text, re.M) for p in parts)


def test_every_function_the_architecture_page_names_exists():
    refs = doc_references((ROOT / "docs" / "architecture.md").read_text())
    assert len(refs) >= 20
    missing = [f"{path}:{name}" for path, names in refs for name in names
               if not (ROOT / path).is_file() or not defined(ROOT / path, name)]
    assert missing == []


def test_doc_references_follow_hops_within_one_class():
    refs = doc_references("`daemon/server.py:Server._handle` -> `on_generate` -> `_job`, "
                          "`plugins/cpu.py:CpuRunner.prefill` / `decode`")
    assert refs == [("daemon/server.py", ["Server._handle", "Server.on_generate", "Server._job"]),
                    ("plugins/cpu.py", ["CpuRunner.prefill"])]


# ---------------------------------------------------------------------------
# One way to do each thing: one loading call, one range table, one RSS reader
# ---------------------------------------------------------------------------

def sources() -> dict[str, str]:
    """Every Python file of the project (packages, bench, tests) by its path."""
    folders = (*LAYERS, "bench", "tests")
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
            for d in folders for p in (ROOT / d).rglob("*.py")}


def places(pattern: str) -> list[str]:
    rx = re.compile(pattern, re.M)
    return sorted(f"{path}:{text.count(chr(10), 0, m.start()) + 1}"
                  for path, text in sources().items() for m in rx.finditer(text))


def test_one_place_calls_the_load_hook():
    """Everyone loads through engine.load -> registry.load, the hook's only caller (on the
    owner plugin alone). tests/plugins/test_registry.py's fake plugins only define it."""
    calls = places(r"""(?:\.ember_load\(|["']ember_load["'])""")
    assert [c.split(":")[0] for c in calls] == ["plugins/registry.py"], calls


def test_one_sampling_range_table_and_one_rss_reader():
    """(bench/compare_llamacpp.py and bench/onnx_rows.py read VmHWM themselves: their
    llama.cpp contender must not import ember, whose pages would count in its peak;
    tests/daemon/test_budget.py reads another process's.)"""
    assert [p.split(":")[0] for p in places(r"^SAMPLING_RANGES\b.*=")] == ["formats/protocol.py"]
    readers = [p.split(":")[0] for p in places(r"^\s*def (?:_?rss_bytes|_?peak_rss\w*)\(")]
    assert sorted(readers) == ["bench/compare_llamacpp.py", "bench/onnx_rows.py", "daemon/budget.py",
                               "daemon/budget.py", "tests/daemon/test_budget.py"]
