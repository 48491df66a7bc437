"""docs/code_map.md lists every module of the tree, one line each, and nothing that is gone."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKIP = {".venv", ".git", "tests", "ckpt", "results", "runs", "demo_data"}


def modules_in_tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.py") if not SKIP & set(p.relative_to(root).parts)}


def modules_in_map(root: Path) -> list[str]:
    return re.findall(r"^\| `([^`]+\.py)` \|", (root / "docs" / "code_map.md").read_text(), flags=re.M)


def map_problems(root: Path) -> list[str]:
    listed, tree = modules_in_map(root), modules_in_tree(root)
    problems = [f"listed twice: {m}" for m in sorted({m for m in listed if listed.count(m) > 1})]
    problems += [f"no line for {m}" for m in sorted(tree - set(listed))]
    return problems + [f"listed but gone: {m}" for m in sorted(set(listed) - tree)]


def test_every_module_has_one_line_and_every_line_a_module():
    assert not map_problems(REPO), "update docs/code_map.md: " + "; ".join(map_problems(REPO))


def test_the_check_finds_a_new_file_and_a_stale_line(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "old.py").write_text("")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("")  # tests are one line in the map, not one per file
    (tmp_path / "docs" / "code_map.md").write_text("| `pkg/old.py` | old |\n| `pkg/gone.py` | gone |\n")
    (tmp_path / "pkg" / "new.py").write_text("")
    assert map_problems(tmp_path) == ["no line for pkg/new.py", "listed but gone: pkg/gone.py"]
