"""The project stands alone: no file in it names a path outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A relative path that climbs (../x), or an absolute path into a home, a mount or a workspace.
CLIMBING = re.compile(r"(?<![\w.])(?:\.\./)+[\w.-][\w./-]*")
ABSOLUTE = re.compile(r"(?<![\w.~])/(?:work|home|root|Users|mnt|tmp/ci)/[\w.-]+")


def project_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    files = [ROOT / name for name in listed if (ROOT / name).is_file()]
    assert len(files) > 50, "git ls-files listed too few files: is this the project's checkout?"
    return files


def inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root) and path.exists()


def outside_paths(file: Path, root: Path = ROOT) -> list[str]:
    try:
        text = file.read_text()
    except UnicodeDecodeError:
        return []  # a binary file (an image)
    found = []
    for match in CLIMBING.finditer(text):
        target = match.group().rstrip(".")
        if not (inside(file.parent / target, root) or inside(root / target, root)):
            found.append(target)
    found += ABSOLUTE.findall(text)
    return found


def test_no_file_names_a_path_outside_the_project():
    bad = {}
    for file in project_files():
        if file.resolve() == Path(__file__).resolve():
            continue  # its own patterns
        found = outside_paths(file)
        if found:
            bad[str(file.relative_to(ROOT))] = found
    assert not bad, f"paths outside the repository: {bad}"


def test_the_check_finds_what_it_looks_for(tmp_path):
    """The patterns catch the shapes a stray reference takes, and leave paths inside alone."""
    root = tmp_path / "project"
    (root / "src" / "streamgpt").mkdir(parents=True)
    (root / "src" / "streamgpt" / "run.py").touch()
    (root / "README.md").touch()
    (root / "docs").mkdir()
    sample = root / "docs" / "probe.md"
    # Stray paths made up from parts, so that this file itself names nothing outside the project.
    up, top = "..", "/"
    strays = [f"{up}/sibling/NOTES.md", f"{up}/{up}/notes.txt", f"{top}work/x", f"{top}home/me"]
    sample.write_text(
        f"see {strays[0]} and `{strays[1]}`, {strays[2]}/y.md, {strays[3]}/z\n"
        "inside: ../README.md, ../src/streamgpt/run.py, ~/.cache/streamgpt, /tmp/run\n"
    )
    assert outside_paths(sample, root) == strays
