"""The README tells the truth about the files, and the repository stands on its own.

    python -m pytest tests/test_readme.py
"""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def tracked_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if os.path.isfile(os.path.join(ROOT, p))]


def test_file_table_lists_every_module_with_its_line_count():
    """Every top-level module is in the reading-order table, with the number of lines it has."""
    rows = re.findall(r"^\| `([\w/]+\.py)` \| (\d+) \|", readme(), flags=re.M)
    listed = {name: int(n) for name, n in rows}
    modules = {p for p in os.listdir(ROOT) if p.endswith(".py")}
    assert set(listed) == modules, (f"missing from the table: {sorted(modules - set(listed))}; "
                                    f"listed but absent: {sorted(set(listed) - modules)}")
    for name, n in listed.items():
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            actual = sum(1 for _ in f)
        assert n == actual, f"README says {name} has {n} lines, it has {actual}"


def test_no_reference_points_outside_the_repository():
    """A person who clones the repository has nothing beside it (no private spec or notes): citations
    name public sources or documents inside the repository."""
    pattern = re.compile(r"\.\./shared|SPEC(\.md)?\s*§|SMALL-SCALE-NOTES|MACHINE-NOTES")
    hits = []
    for path in tracked_files():
        if path.endswith((".png", ".jpg", ".mp4", ".safetensors")) or path.startswith(".ci/"):
            continue
        with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, 1):
                if pattern.search(line) and path != "tests/test_readme.py":
                    hits.append(f"{path}:{i}: {line.strip()[:100]}")
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_readme_names_only_scripts_and_pictures_that_exist():
    text = readme()
    for script in set(re.findall(r"python ([\w/]+\.py)", text)):
        assert os.path.isfile(os.path.join(ROOT, script)), f"README runs {script}, which does not exist"
    for picture in set(re.findall(r"\]\((docs/[\w./-]+)\)", text)):
        assert os.path.isfile(os.path.join(ROOT, picture)), f"README shows {picture}, which does not exist"
