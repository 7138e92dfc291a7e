"""Packing a folder for an upload: git's ignore rules (checked against git itself),
``.smartmobignore``, and archives that are the same bytes for the same files."""

from __future__ import annotations

import doctest
import importlib
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from smartmob_agent.client.ignore import ignored, parse, translate
from smartmob_agent.client.pack import list_files, pack_folder, sha256_of

ROOT_RULES = r"""# a comment, then rules of every kind
*.log
!keep.log
/build/
docs/**/*.tmp
**/cache
temp?
[abc].txt
[!x-z]z.dat
node_modules/
\#hash
trailing\ {space}
foo/**
deep/*/leaf
""".replace("{space}", "")  # "trailing\\ " ends with an escaped space
#: Files of the tree, relative to its root.
FILES = [
    "a.log", "keep.log", "sub/b.log", "sub/local.txt", "local.txt", "build/x",
    "sub/build/x", "docs/a/b/c.tmp", "docs/c.tmp", "docs/keep.md", "x/cache/y", "cache",
    "temp1", "temp12", "a.txt", "d.txt", "az.dat", "zz.dat", "node_modules/z",
    "sub/node_modules/z", "#hash", "trailing ", "foo/bar", "foo/baz/qux", "deep/a/leaf",
    "deep/a/b/leaf", "Procfile", "sub/deeper/.gitignore", "sub/deeper/kept.log",
    "sub/deeper/dropped.txt",
]


def make_tree(root: Path) -> Path:
    for name in FILES:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    (root / ".gitignore").write_text(ROOT_RULES)
    (root / "sub" / ".gitignore").write_text("!*.log\nlocal.txt\n")
    (root / "sub" / "deeper" / ".gitignore").write_text("*.txt\n")
    return root


def git_untracked(root: Path, home: Path) -> list[str]:
    """The files git would add in ``root``: its own reading of the same rules."""
    env = {**os.environ, "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
           "XDG_CONFIG_HOME": str(home)}
    subprocess.run(["git", "init", "-q", str(root)], check=True, env=env)
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "--others", "--exclude-standard", "-z"],
        check=True, env=env, capture_output=True).stdout.decode()
    return sorted(name for name in listed.split("\0") if name)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_same_files_as_git(tmp_path: Path) -> None:
    """The files packed are exactly those git would add, for rules of every kind."""
    root = make_tree(tmp_path / "tree")
    expected = git_untracked(root, tmp_path / "home")
    packed = [name for name in list_files(root) if not name.endswith("/")]
    assert packed == expected
    # and the check is not vacuous: both left out files of each kind
    for gone in ("a.log", "build/x", "docs/c.tmp", "x/cache/y", "node_modules/z", "foo/bar",
                 "#hash", "trailing ", "deep/a/leaf", "sub/local.txt", "a.txt", "az.dat"):
        assert gone not in packed
    for kept in ("keep.log", "sub/b.log", "sub/build/x", "temp12", "d.txt", "zz.dat",
                 "deep/a/b/leaf", "sub/deeper/kept.log"):
        assert kept in packed


@pytest.mark.parametrize(("pattern", "path", "is_folder", "expected"), [
    ("*.py", "a/b.py", False, True),
    ("/*.py", "a/b.py", False, False),
    ("/*.py", "b.py", False, True),
    ("a/*.py", "a/b/c.py", False, False),
    ("a/**/c.py", "a/c.py", False, True),
    ("a/**/c.py", "a/x/y/c.py", False, True),
    ("**/c.py", "c.py", False, True),
    ("a/**", "a", True, False),
    ("a/**", "a/b", False, True),
    ("dir/", "dir", False, False),
    ("dir/", "x/dir", True, True),
    ("?.txt", "ab.txt", False, False),
    ("[0-9]*", "7up", False, True),
    ("a**b", "axyb", False, True),
    ("a**b", "ax/yb", False, False),
])
def test_patterns(pattern: str, path: str, is_folder: bool, expected: bool) -> None:
    """Each pattern form matches as gitignore(5) says."""
    assert ignored(parse(pattern), path, is_folder) is expected, translate(pattern)


def test_rules_of_a_subfolder_apply_below_it_only() -> None:
    """A rule of sub/.gitignore is relative to sub/ and overrides the root's."""
    rules = parse("*.log\n") + parse("!keep.log\n/only-here\n", base="sub")
    assert ignored(rules, "keep.log", False)
    assert not ignored(rules, "sub/keep.log", False)
    assert ignored(rules, "sub/only-here", False)
    assert not ignored(rules, "sub/x/only-here", False)
    assert not ignored(rules, "only-here", False)


def test_smartmobignore_and_git_folder(tmp_path: Path) -> None:
    """.smartmobignore leaves out more (or takes back a .gitignore rule with !), and
    .git is never packed; without ignore, only .git is left out."""
    root = tmp_path / "app"
    for name in ("Procfile", "tests/test_app.py", "notes.md", ".git/HEAD", "dist/app.whl"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    (root / "empty").mkdir()
    (root / ".gitignore").write_text("dist/\n")
    (root / ".smartmobignore").write_text("tests/\n*.md\n!dist/\n")
    assert list_files(root) == [".gitignore", ".smartmobignore", "Procfile", "dist/app.whl",
                                "empty/"]
    assert list_files(root, ignore=False) == [
        ".gitignore", ".smartmobignore", "Procfile", "dist/app.whl", "empty/", "notes.md",
        "tests/test_app.py"]


def test_the_archive_depends_on_the_files_only(tmp_path: Path) -> None:
    """Packing twice, or after touching every file, gives the same bytes; a changed file
    gives others. Members keep their executable bit and symbolic links stay links."""
    root = tmp_path / "app"
    root.mkdir()
    (root / "Procfile").write_text("web: ./run.sh\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("run.sh")
    first = pack_folder(root)
    os.utime(root / "Procfile", (1, 1))
    second = pack_folder(root)
    (root / "Procfile").write_text("web: ./run.sh --loud\n")
    third = pack_folder(root)
    try:
        assert sha256_of(first) == sha256_of(second)
        assert sha256_of(first) != sha256_of(third)
        with tarfile.open(first) as archive:
            members = {m.name: m for m in archive.getmembers()}
        assert sorted(members) == ["Procfile", "link", "run.sh"]
        assert members["run.sh"].mode == 0o755
        assert members["link"].issym()
        assert members["link"].linkname == "run.sh"
        assert {m.uid for m in members.values()} == {0}
    finally:
        for path in (first, second, third):
            path.unlink()


def test_packing_a_file_is_an_error(tmp_path: Path) -> None:
    """pack_folder refuses a path that is not a folder."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        pack_folder(tmp_path / "file")


@pytest.mark.parametrize("name", [
    "errors", "results", "ignore", "agent", "render", "targets", "terminal", "commands", "follow",
    "formation",
])
def test_the_examples_in_the_client_docstrings(name: str) -> None:
    """The examples in the client modules' docstrings hold."""
    module = importlib.import_module(f"smartmob_agent.client.{name}")
    result = doctest.testmod(module)
    assert result.attempted > 0
    assert result.failed == 0
