"""The package's modules import each other without a cycle and only downwards through its layers, counting
imports inside functions."""

import ast
import subprocess
import sys
from pathlib import Path

import mimkit

PACKAGE = Path(mimkit.__file__).parent


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file (a package imports its submodules
    when they are named: ``from mimkit.methods import mae`` imports ``mimkit.methods.mae``)."""

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            found |= {known(t) for t in targets if t.split(".")[0] == "mimkit"}
        graph[name] = found - {None, name}
    if "mimkit.methods" in graph:  # it imports every module in its folder by name (pkgutil): unreadable here
        graph["mimkit.methods"] |= {name for name in modules if name.startswith("mimkit.methods.")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of modules (first == last), or None (depth-first search)."""
    state, path = {}, []  # state: 1 while on the path, 2 when done

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_relative_imports_hide_from_the_walk():
    for name, path in _module_names().items():
        tree = ast.parse(path.read_text())
        relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
        assert not relative, f"{name} imports relatively; the walk reads absolute imports"


def test_the_walk_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_walk_sees_imports_inside_functions(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from mimkit.b import g\n    import mimkit.c.d\n")
    (tmp_path / "b.py").write_text("from mimkit.c import d, x\n")
    modules = {"mimkit.a": tmp_path / "a.py", "mimkit.b": tmp_path / "b.py", "mimkit.c": tmp_path / "b.py",
               "mimkit.c.d": tmp_path / "b.py"}
    graph = _imports(modules)
    assert graph["mimkit.a"] == {"mimkit.b", "mimkit.c.d"}
    assert graph["mimkit.b"] == {"mimkit.c", "mimkit.c.d"}  # a named submodule is imported too


def test_the_package_has_no_import_cycle():
    cycle = _cycle(_imports(_module_names()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# the package's layers, lowest first: a module imports only from its own layer and the ones below; the
# longest name that matches decides (the configuration of evaluation runs is configuration). A method's record
# names its extras (`mimkit.registry.Method`), so what those point at sits below the methods: interop's
# layouts (key maps, readers and writers of each model's foreign names, `interop/mae.py` ...: the models
# alone; a new method's `interop/x.py` lands here by default) and the drawings of `viz` (models and data; it
# looks a run's pictures up in the registry). The one runner of every training kind (`mimkit.runner`) sits
# beside the methods, below the kinds that build its jobs. The two interop commands, import and export, which
# load methods and runs, stay above them.
LAYERS = (
    ("mimkit", "mimkit.errors", "mimkit.files", "mimkit.config", "mimkit.eval.config", "mimkit.cpus",
     "mimkit.safe_load", "mimkit.recipes"),
    ("mimkit.data", "mimkit.models", "mimkit.tokenizers", "mimkit.masking", "mimkit.interop"),
    ("mimkit.train",),
    ("mimkit.registry", "mimkit.kinds", "mimkit.runs", "mimkit.viz"),
    ("mimkit.methods", "mimkit.runner"),
    ("mimkit.pretrain", "mimkit.eval", "mimkit.interop.importer", "mimkit.interop.export"),
    ("mimkit.cli",),
)


def _layer(module: str) -> int:
    matches = [(len(name), level) for level, names in enumerate(LAYERS) for name in names
               if module == name or module.startswith(name + ".") and name != "mimkit"]
    assert matches, f"{module} is in no layer of LAYERS"
    return max(matches)[1]


def test_no_import_runs_upward():
    upward = sorted(f"{m} -> {t}" for m, targets in _imports(_module_names()).items() for t in targets
                    if _layer(t) > _layer(m))
    assert upward == [], "imports from a higher layer: " + "; ".join(upward)


def test_the_run_directory_layer_imports_no_evaluation_code():
    """`mimkit.runs` reads every kind of run through the kinds' records (`mimkit.kinds`), so it names no
    evaluation protocol: not even the configuration of one (which the layers alone would allow)."""
    imported = _imports(_module_names())["mimkit.runs"]
    assert not {m for m in imported if m == "mimkit.eval" or m.startswith("mimkit.eval.")}


def test_a_run_loads_without_importing_the_methods_first(mae_run):
    """The registry finds the built-in methods itself: `mimkit.runs.load_run` works in a fresh process that
    imported nothing else of mimkit (the README's library example)."""
    code = (f"from mimkit.runs import load_run; model, config = load_run({str(mae_run)!r}); "
            "print(config.method)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "mae", done.stderr
