"""dvc.yaml declares every package module whose code can change a stage's outputs.

A stage's code deps are derived from its script: every ``medicsynth`` module it imports (at the
top or inside a function), followed transitively through absolute and relative imports, with a
package standing for its ``__init__.py`` and every imported submodule for its file. A module is
declared when a ``deps`` entry of the stage is its file or a directory above it. A stage whose
code changes without a declared dep keeps a stale result and DVC says nothing, so an undeclared
module fails here, naming the stage and the module.

Prompt files named by the stage's params sections (``prompts/...``) must be deps too: their text
goes into paid calls and the cache key.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "medicsynth"

# Modules that cannot change any output, so they need not be deps (every stage imports some).
ALLOWED_UNDECLARED: frozenset[str] = frozenset({
    # Atomic writers: how a file is written (temp file + rename), never what is in it.
    "medicsynth/io.py",
})

_STAGE_SCRIPT = re.compile(r"(stages/[\w/]+\.py)")


def module_file(name: str, package_root: Path) -> Path | None:
    """The file of dotted module ``name`` under ``package_root`` (the repo), or None if not ours."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = package_root.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _module_name(path: Path, package_root: Path) -> str:
    rel = path.relative_to(package_root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, package_root: Path) -> set[Path]:
    """Files of the package modules ``path`` imports directly (including function-level imports).

    ``from a.b import c`` yields ``a/b`` and, when ``c`` is a submodule, ``a/b/c.py``; importing
    ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``, so those are included.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    try:
        own = _module_name(path, package_root)
        is_package = path.name == "__init__.py"
    except ValueError:  # a stage script, outside the package
        own, is_package = "", False
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = own.split(".") if is_package else own.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    files: set[Path] = set()
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):  # parents' __init__ run first
            f = module_file(".".join(parts[:k]), package_root)
            if f is not None:
                files.add(f)
    return files


def transitive_modules(script: Path, package_root: Path) -> set[Path]:
    """Every package module file that running ``script`` can import, transitively."""
    seen: set[Path] = set()
    todo = list(imported_modules(script, package_root))
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(imported_modules(f, package_root) - seen)
    return seen


def _covered(rel: PurePosixPath, deps: Iterable[str]) -> bool:
    for dep in deps:
        d = PurePosixPath(dep.rstrip("/"))
        if rel == d or d in rel.parents:
            return True
    return False


def _prompt_files(value) -> Iterable[str]:
    if isinstance(value, str):
        if value.startswith("prompts/"):
            yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _prompt_files(v)
    elif isinstance(value, list):
        for v in value:
            yield from _prompt_files(v)


def _params_sections(stage: Mapping, params: Mapping) -> Iterable:
    for entry in stage.get("params") or []:
        keys = list(entry) if isinstance(entry, Mapping) else [entry]
        for key in keys:
            value = params
            for part in str(key).split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
            yield value


def undeclared_deps(root: Path, package_root: Path = REPO) -> list[str]:
    """``"stage: path"`` for every module/prompt a stage of ``root/dvc.yaml`` uses but does not declare.

    ``root`` holds ``dvc.yaml``, ``params.yaml`` (optional) and the stage scripts; package modules
    are looked up under ``package_root``. Matrix stages are checked once (their deps list is shared
    by every item; templated deps such as ``models/${item.variant}`` are data, not code).
    """
    dvc = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    params_path = root / "params.yaml"
    params = yaml.safe_load(params_path.read_text(encoding="utf-8")) if params_path.exists() else {}
    problems = []
    for name, stage in dvc["stages"].items():
        match = _STAGE_SCRIPT.search(stage["cmd"])
        if not match:
            problems.append(f"{name}: cmd runs no stages/*.py script, cannot derive its code deps")
            continue
        deps = [str(d) for d in stage.get("deps") or [] if isinstance(d, str)]
        script = root / match.group(1)
        if not _covered(PurePosixPath(match.group(1)), deps):
            problems.append(f"{name}: {match.group(1)} (its own script)")
        used = {PurePosixPath(f.relative_to(package_root).as_posix())
                for f in transitive_modules(script, package_root)}
        for rel in sorted(used):
            if str(rel) not in ALLOWED_UNDECLARED and not _covered(rel, deps):
                problems.append(f"{name}: {rel}")
        for section in _params_sections(stage, params):
            for prompt in sorted(set(_prompt_files(section))):
                if not _covered(PurePosixPath(prompt), deps):
                    problems.append(f"{name}: {prompt} (named in params)")
    return problems


def test_every_stage_declares_the_modules_it_imports():
    problems = undeclared_deps(REPO)
    assert not problems, (
        "dvc.yaml: stage(s) use package modules or prompts missing from their deps (a change to "
        "them would leave stale outputs); add each to the stage's deps:\n  " + "\n  ".join(problems)
    )


def test_allow_list_names_existing_modules():
    # A stale allow-list entry would hide nothing, but reads as if it did.
    for rel in ALLOWED_UNDECLARED:
        assert (REPO / rel).is_file(), rel


# Every import of the package runs its __init__, which pins the CPU code path (numerics.py):
# every stage declares both, as dvc.yaml does.
PACKAGE_WIDE = ["medicsynth/__init__.py", "medicsynth/numerics.py"]


def _toy_project(tmp_path: Path, stage_source: str, deps: list[str], params: dict | None = None) -> Path:
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages/toy.py").write_text(stage_source, encoding="utf-8")
    stage = {"cmd": "python stages/toy.py", "deps": ["stages/toy.py", *PACKAGE_WIDE, *deps], "outs": ["out.txt"]}
    if params is not None:
        stage["params"] = list(params)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"toy": stage}}), encoding="utf-8")
    return tmp_path


def test_an_import_without_its_dep_fails(tmp_path):
    # manifest imports labels: both must be declared.
    root = _toy_project(tmp_path, "from medicsynth.manifest import read_manifest\n", ["medicsynth/manifest.py"])
    assert undeclared_deps(root) == ["toy: medicsynth/labels.py"]


def test_a_function_level_import_counts(tmp_path):
    source = "def main():\n    from medicsynth import phash\n    return phash\n"
    root = _toy_project(tmp_path, source, [])
    assert undeclared_deps(root) == ["toy: medicsynth/phash.py"]


def test_a_directory_dep_covers_a_subpackage_but_not_what_it_imports(tmp_path):
    # medicsynth.llm imports medicsynth.images, labels and shards (image bytes of a file or a
    # shard member), and shards imports manifest and params, all outside the llm directory.
    root = _toy_project(tmp_path, "import medicsynth.llm\n", ["medicsynth/llm"])
    assert undeclared_deps(root) == ["toy: medicsynth/images.py", "toy: medicsynth/labels.py",
                                     "toy: medicsynth/manifest.py", "toy: medicsynth/params.py",
                                     "toy: medicsynth/shards.py"]


def test_a_complete_deps_list_passes(tmp_path):
    deps = ["medicsynth/llm", "medicsynth/images.py", "medicsynth/labels.py", "medicsynth/manifest.py",
            "medicsynth/params.py", "medicsynth/shards.py"]
    root = _toy_project(tmp_path, "import medicsynth.llm\n", deps)
    assert undeclared_deps(root) == []


def test_the_package_init_and_numerics_are_deps_of_every_stage(tmp_path):
    root = _toy_project(tmp_path, "from medicsynth.io import write_json\n", [])
    stage = yaml.safe_load((root / "dvc.yaml").read_text())
    stage["stages"]["toy"]["deps"] = ["stages/toy.py"]
    (root / "dvc.yaml").write_text(yaml.safe_dump(stage), encoding="utf-8")
    assert undeclared_deps(root) == ["toy: medicsynth/__init__.py", "toy: medicsynth/numerics.py"]


def test_allow_listed_modules_need_no_dep(tmp_path):
    root = _toy_project(tmp_path, "from medicsynth.io import write_json\n", [])
    assert undeclared_deps(root) == []


def test_prompt_named_in_params_must_be_a_dep(tmp_path):
    params = {"toy": {"prompt": "prompts/toy.txt", "n": 1}}
    root = _toy_project(tmp_path, "print('hi')\n", [], params)
    assert undeclared_deps(root) == ["toy: prompts/toy.txt (named in params)"]


@pytest.mark.parametrize("dotted,expected", [
    ("medicsynth.filtering", "medicsynth/filtering.py"),
    ("medicsynth.llm", "medicsynth/llm/__init__.py"),
    ("numpy", None),
])
def test_module_file(dotted, expected):
    f = module_file(dotted, REPO)
    assert (f.relative_to(REPO).as_posix() if f else None) == expected


def test_no_sys_path_edits_anywhere():
    """The package is found because it is installed (`pip install -e .`), never by editing sys.path."""
    repo = Path(__file__).resolve().parents[1]
    needle = "sys.path." + "insert", "sys.path." + "append"  # split so that this file does not match itself
    offenders = [str(p.relative_to(repo)) for d in ("medicsynth", "stages", "bench", "tests")
                 for p in (repo / d).rglob("*.py") if any(n in p.read_text() for n in needle)]
    assert offenders == []
