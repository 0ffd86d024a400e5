"""The shape of the code base: no import circle between top-level modules, short functions, a short
trainer.main, and no logic of six or more lines written twice in product code."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
MAX_MAIN_LINES = 80
MAX_TRAINER_LINES = 400


def product_files() -> List[Path]:
    """Top-level modules and the sam2 package (tests and benchmarks are not product code)."""
    return sorted(REPO.glob("*.py")) + sorted((REPO / "sam2").rglob("*.py"))


def top_level_name(path: Path) -> str:
    relative = path.relative_to(REPO)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def import_graph() -> Dict[str, Set[str]]:
    """module -> the other top-level modules it imports anywhere in its code (inside functions too)."""
    nodes = {top_level_name(p) for p in product_files()}
    graph: Dict[str, Set[str]] = {name: set() for name in nodes}
    for path in product_files():
        source = top_level_name(path)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            else:
                continue
            graph[source].update(t.split(".")[0] for t in targets if t.split(".")[0] in nodes - {source})
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle as [a, b, ..., a], or [] (depth-first search with colours)."""
    state: Dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return []


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_circle_between_top_level_modules():
    graph = import_graph()
    assert "sam_lora_image_encoder_prompt" in graph["trainer"] and "sam2" in graph["sam_lora_image_encoder_prompt"], \
        "graph not built"
    assert find_cycle(graph) == []


def long_functions(limit: int) -> List[str]:
    found = []
    for path in product_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_product_function_is_longer_than_80_lines():
    assert long_functions(MAX_FUNCTION_LINES) == []
    assert long_functions(5), "the function scan found nothing at all"


def test_trainer_main_reads_on_one_screen():
    tree = ast.parse((REPO / "trainer.py").read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= MAX_MAIN_LINES


def test_trainer_keeps_set_up_and_the_loop_only():
    """trainer.py stays small: the flags (settings.py), the run folder's protocol (run_folder.py), the oracles
    (oracles.py) and the steps of an epoch (epoch_steps.py) live in their own modules."""
    lines = len((REPO / "trainer.py").read_text().splitlines())
    assert lines <= MAX_TRAINER_LINES, f"trainer.py has {lines} lines"


def imported_names(path: Path) -> Set[str]:
    names: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_product_module_reads_tensorboard_event_files():
    """Per-epoch numbers are read from metrics.csv; event files are TensorBoard's to read."""
    readers = {"tensorboardX.proto", "tensorboardX.proto.event_pb2", "tensorboard.backend.event_processing",
               "tensorboard.backend.event_processing.event_accumulator", "tensorflow"}
    found = {str(p.relative_to(REPO)): sorted(imported_names(p) & readers) for p in product_files()}
    assert {k: v for k, v in found.items() if v} == {}
    assert not [p.name for p in product_files() if "tfevents" in p.read_text() and "glob" in p.read_text()
                and "struct" in imported_names(p)]


def test_no_test_module_imports_another():
    """What tests share lives in conftest.py (fixtures); test modules stay independent of each other."""
    tests = {p.stem for p in (REPO / "tests").glob("test_*.py")}
    found = {p.name: sorted(n for n in imported_names(p) if n.split(".")[0] in tests | {"conftest"})
             for p in (REPO / "tests").glob("test_*.py")}
    assert {k: v for k, v in found.items() if v} == {}
    assert "test_structure" in tests and len(tests) > 10, "the scan found the test modules"


def similar_lines_report(files: List[str], cwd: Path) -> str:
    """pylint's similarity checker (comments, docstrings, imports and signatures ignored). It reports runs of
    MORE than --min-similarity-lines common lines, so 5 catches six or more."""
    result = subprocess.run(
        [sys.executable, "-m", "pylint", "--disable=all", "--enable=duplicate-code", "--min-similarity-lines=5",
         "--ignore-comments=yes", "--ignore-docstrings=yes", "--ignore-imports=yes", "--ignore-signatures=yes",
         "--score=no", *files], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 8), result.stderr[-2000:]  # 8: refactor messages only
    return result.stdout


def test_the_similarity_check_reports_six_repeated_lines(tmp_path):
    body = "".join(f"    v{i} = v{i - 1} * {i} + a\n" for i in range(1, 6)) + "    return v5\n"
    (tmp_path / "one.py").write_text("def f(a):\n    v0 = a\n" + body)
    (tmp_path / "two.py").write_text("def g(a, b):\n    v0 = b\n" + body)
    assert "R0801" in similar_lines_report(["one.py", "two.py"], tmp_path)


def test_no_logic_of_six_lines_or_more_is_written_twice():
    report = similar_lines_report([str(p.relative_to(REPO)) for p in product_files()], REPO)
    assert "R0801" not in report, report[-4000:]


def test_sam2_imports_nothing_from_the_project():
    """sam2/ stands alone, like upstream's package: no module under it imports a top-level module of this project."""
    graph = import_graph()
    assert "run_folder" in graph["trainer"], "graph not built"
    assert graph["sam2"] == set(), f"sam2/ imports {sorted(graph['sam2'])}"
