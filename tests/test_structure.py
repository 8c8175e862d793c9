"""The package's shape: imports only go down (no cycle among codistill modules, function-level
imports included), and no file of the project edits sys.path."""
import ast
import os
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "codistill"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The codistill modules ``path`` imports, anywhere in the file (resolving relative imports)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from . import checkpoint`
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (first == last), or [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_codistill_modules():
    graph = import_graph()
    assert "codistill.engines" in graph["codistill.memory"] and "codistill.trainer" not in graph["codistill.memory"]
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_no_file_of_the_project_edits_sys_path():
    offenders = []
    for folder in ("codistill", "launch", "tools", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                        and node.value.id == "sys"):
                    offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


def console_scripts() -> dict[str, str]:
    """name -> 'module:function' of the project's console entry points (as installed)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name.startswith("codistill-")}


def test_every_tool_is_a_thin_script_over_a_command_with_a_console_entry_point():
    targets = set(console_scripts().values())
    scripts = sorted((ROOT / "tools").glob("*.py")) + [ROOT / "launch" / "train.py"]
    assert len(scripts) == len(targets) == 13
    for path in scripts:
        tree = ast.parse(path.read_text())
        imported = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
        assert [(n.module, [a.name for a in n.names]) for n in imported] == [(f"codistill.commands.{path.stem}", ["main"])]
        assert f"codistill.commands.{path.stem}:main" in targets, path


def test_every_tool_runs_as_a_script_and_as_its_console_command():
    import concurrent.futures

    from conftest import bin_path, run_cmd

    commands = [[sys.executable, str(p)] for p in sorted((ROOT / "tools").glob("*.py"))]
    commands += [[sys.executable, "launch/train.py"]] + [[bin_path(name)] for name in sorted(console_scripts())]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda cmd: run_cmd([*cmd, "--help"], timeout=120), commands))
    for cmd, proc in zip(commands, results):
        assert proc.returncode == 0 and proc.stdout.startswith("usage: codistill-"), (cmd, proc.stderr[-2000:])


def test_the_gpu_check_scripts_parse():
    """They cannot run without a GPU; each must at least be valid bash, and its Python valid Python."""
    import re
    import subprocess

    scripts = sorted((ROOT / "tools").glob("gpu_check*.sh"))
    assert len(scripts) >= 4
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
        for block in re.findall(r"<<'PY'[^\n]*\n(.*?)\nPY\n", script.read_text(), re.S):
            compile(block, str(script), "exec")


def test_a_plain_install_ships_the_default_config(tmp_path):
    """`pip install .` (not editable) puts configs/ inside the package, and the default run finds it there."""
    import shutil
    import subprocess

    src = tmp_path / "src"
    src.mkdir()
    for part in ("setup.py", "codistill", "configs"):
        if (ROOT / part).is_dir():
            shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / part, src / part)
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shipped = target / "codistill" / "configs"
    assert {p.name for p in shipped.glob("*.yaml")} >= {"tiny.yaml", "tiny_gpt2.yaml", "soft.yaml", "hard.yaml"}
    assert (shipped / "examples" / "llama8b-codistill-1b.yaml").is_file() and list((shipped / "ds").glob("*.json"))
    probe = subprocess.run([sys.executable, "-c", "import codistill.config as c; print(c.DEFAULT_CONFIG)"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(target)})
    assert probe.stdout.strip() == str(shipped / "tiny.yaml"), probe.stderr[-2000:]
