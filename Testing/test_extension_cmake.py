"""The Slicer extension's CMake lists name every file the extension ships, and only files that exist.

``slicerMacroBuildScriptedModule`` copies only the files it is given: a Python file or resource
added under IDEALSegment/ (or IDEALTrain/) without being listed would be missing from the installed
extension while everything still works in developer mode. This test parses the CMake lists (no
CMake or Slicer SDK here) and compares them with the source tree.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "IDEALSegment"
MODULE_NAMES = ("IDEALSegment", "IDEALTrainer")


def parse_cmake(text: str) -> tuple[dict[str, list[str]], list[tuple[str, list[str]]]]:
    """(variables set with set(), [(command, arguments)] of every other command), with ${VAR} expanded."""
    text = re.sub(r"#[^\n]*", "", text)
    variables: dict[str, list[str]] = {}
    commands: list[tuple[str, list[str]]] = []
    for match in re.finditer(r"(\w+)\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)", text):
        name = match.group(1)
        arguments = [_unquote(a) for a in re.findall(r'"[^"]*"|[^\s"]+', match.group(2))]
        expanded: list[str] = []
        for argument in arguments:
            whole = re.fullmatch(r"\$\{(\w+)\}", argument)
            if whole and whole.group(1) in variables:
                expanded.extend(variables[whole.group(1)])  # a list variable splices in
            else:
                expanded.append(re.sub(r"\$\{(\w+)\}", lambda m: ";".join(variables.get(m.group(1), [m.group(0)])), argument))
        if name.lower() == "set" and expanded:
            variables[expanded[0]] = expanded[1:]
        else:
            commands.append((name, expanded))
    return variables, commands


def _unquote(argument: str) -> str:
    return argument[1:-1] if len(argument) >= 2 and argument[0] == argument[-1] == '"' else argument


def keyword_values(arguments: list[str], keyword: str, keywords: set[str]) -> list[str]:
    """The values after ``keyword`` up to the next keyword of the command."""
    if keyword not in arguments:
        return []
    values = []
    for value in arguments[arguments.index(keyword) + 1 :]:
        if value in keywords:
            break
        values.append(value)
    return values


SCRIPTED_KEYWORDS = {"NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"}
COMPILE_KEYWORDS = {"TARGET_NAME", "SCRIPTS", "RESOURCES", "SOURCE_DIR", "DESTINATION_DIR", "INSTALL_DIR", "NO_INSTALL_SUBDIR", "GLOBAL_TARGET"}


def listed_files(cmake_text: str, module_dir: Path) -> dict[str, list[str]]:
    """Repository-relative paths each build command installs: {target: [paths]}."""
    _, commands = parse_cmake(cmake_text)
    installed: dict[str, list[str]] = {}
    for name, arguments in commands:
        if name == "slicerMacroBuildScriptedModule":
            target = keyword_values(arguments, "NAME", SCRIPTED_KEYWORDS)[0]
            files = keyword_values(arguments, "SCRIPTS", SCRIPTED_KEYWORDS) + keyword_values(arguments, "RESOURCES", SCRIPTED_KEYWORDS)
            installed[target] = [_relative(module_dir, f, module_dir.parent) for f in files]
        elif name == "ctkMacroCompilePythonScript":
            target = keyword_values(arguments, "TARGET_NAME", COMPILE_KEYWORDS)[0]
            source = (keyword_values(arguments, "SOURCE_DIR", COMPILE_KEYWORDS) or ["${CMAKE_CURRENT_SOURCE_DIR}"])[0]
            base = module_dir / source.replace("${CMAKE_CURRENT_SOURCE_DIR}", ".")
            files = keyword_values(arguments, "SCRIPTS", COMPILE_KEYWORDS) + keyword_values(arguments, "RESOURCES", COMPILE_KEYWORDS)
            installed[target] = [_relative(base, f, module_dir.parent) for f in files]
    return installed


def _relative(base: Path, file: str, root: Path) -> str:
    """``file`` (relative to ``base``) as a path relative to the repository ``root``."""
    assert "*" not in file and "${" not in file, f"unresolved or globbed entry {file!r}: list files explicitly"
    path = (base / file).resolve()
    try:
        return PurePosixPath(*path.relative_to(root.resolve()).parts).as_posix()
    except ValueError:
        raise AssertionError(f"{file!r} lies outside the repository") from None


def shipped_files(root: Path) -> set[str]:
    """What the extension must install: .py files under IDEALSegment/ and IDEALTrain/, every file under Resources/."""
    wanted = set()
    for folder, pattern in ((root / "IDEALSegment", "*.py"), (root / "IDEALTrain", "**/*.py"), (root / "IDEALSegment" / "Resources", "*")):
        for path in folder.rglob(pattern):
            parts = path.relative_to(root).parts
            if path.is_file() and "__pycache__" not in parts and not any(p.startswith(".") for p in parts):
                wanted.add(PurePosixPath(*parts).as_posix())
    return wanted


def listing_problems(cmake_text: str, root: Path) -> list[str]:
    """Files that exist but are not listed, listed files that do not exist, files listed twice."""
    installed = listed_files(cmake_text, root / "IDEALSegment")
    every = [f for files in installed.values() for f in files]
    problems = [f"not listed in IDEALSegment/CMakeLists.txt: {f}" for f in sorted(shipped_files(root) - set(every))]
    problems += [f"listed but missing: {f}" for f in sorted(set(every)) if not (root / f).is_file()]
    problems += [f"listed twice: {f}" for f in sorted({f for f in every if every.count(f) > 1})]
    return problems


def _module_cmake() -> str:
    return (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")


def test_every_shipped_file_is_listed_and_every_listed_file_exists():
    assert len(shipped_files(ROOT)) > 40, "the tree walk found too few files: the check would pass vacuously"
    assert listing_problems(_module_cmake(), ROOT) == []


def test_listing_check_catches_an_unlisted_script_and_a_missing_file(tmp_path):
    for relative in ("IDEALSegment/IDEALSegment.py", "IDEALSegment/Logic/new_helper.py", "IDEALSegment/Resources/UI/IDEALSegment.ui", "IDEALTrain/io/image.py"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("")
    cmake = (
        "set(MODULE_NAME IDEALSegment)\nset(SCRIPTS ${MODULE_NAME}.py Logic/gone.py)\n"
        "set(RES Resources/UI/${MODULE_NAME}.ui)\n"
        "slicerMacroBuildScriptedModule(NAME ${MODULE_NAME} SCRIPTS ${SCRIPTS} RESOURCES ${RES} WITH_GENERIC_TESTS)\n"
        "ctkMacroCompilePythonScript(TARGET_NAME IDEALTrain SCRIPTS IDEALTrain/io/image.py SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/..\n"
        "  DESTINATION_DIR x INSTALL_DIR y NO_INSTALL_SUBDIR)\n"
    )
    assert listing_problems(cmake, tmp_path) == [
        "not listed in IDEALSegment/CMakeLists.txt: IDEALSegment/Logic/new_helper.py",
        "listed but missing: IDEALSegment/Logic/gone.py",
    ]


def test_both_modules_are_scripted_modules_with_generic_and_self_tests():
    _, commands = parse_cmake(_module_cmake())
    built = {keyword_values(a, "NAME", SCRIPTED_KEYWORDS)[0]: a for n, a in commands if n == "slicerMacroBuildScriptedModule"}
    assert set(built) == set(MODULE_NAMES)
    unittests = {keyword_values(a, "SCRIPT", {"SCRIPT", "SLICER_ARGS", "TESTNAME_PREFIX"})[0] for n, a in commands if n == "slicer_add_python_unittest"}
    for module in MODULE_NAMES:
        arguments = built[module]
        assert "WITH_GENERIC_TESTS" in arguments, f"{module} is built without WITH_GENERIC_TESTS"
        files = keyword_values(arguments, "SCRIPTS", SCRIPTED_KEYWORDS) + keyword_values(arguments, "RESOURCES", SCRIPTED_KEYWORDS)
        for needed in (f"{module}.py", f"Resources/UI/{module}.ui", f"Resources/Icons/{module}.png"):
            assert needed in files, f"{module}'s own {needed} is not in its slicerMacroBuildScriptedModule call"
        assert f"{module}.py" in unittests, f"no slicer_add_python_unittest(SCRIPT {module}.py)"
        tree = ast.parse((MODULE_DIR / f"{module}.py").read_text(encoding="utf-8"))
        classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
        for suffix, base in (("", "ScriptedLoadableModule"), ("Widget", "ScriptedLoadableModuleWidget"), ("Test", "ScriptedLoadableModuleTest")):
            assert module + suffix in classes, f"{module}.py has no class {module + suffix}"
            assert base in [ast.unparse(b) for b in classes[module + suffix].bases]


def test_icons_are_png():
    for module in MODULE_NAMES:
        data = (MODULE_DIR / "Resources" / "Icons" / f"{module}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{module}.png is not a PNG file"


def test_top_level_cmake_describes_the_extension():
    variables, commands = parse_cmake((ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL"):
        assert variables.get(field) and variables[field][0].strip(), f"{field} is empty"
    assert "PyTorch" in variables["EXTENSION_DEPENDS"][0].split(";")
    assert ("add_subdirectory", ["IDEALSegment"]) in commands
    homepage = variables["EXTENSION_HOMEPAGE"][0].rstrip("/")
    owner_repo = homepage.removeprefix("https://github.com/")
    urls = [variables["EXTENSION_ICONURL"][0]] + [u for u in " ".join(variables.get("EXTENSION_SCREENSHOTURLS", [])).split() if u]
    for url in urls:
        prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
        assert url.startswith(prefix), f"{url} is not a raw file of {homepage}"
        assert (ROOT / url.removeprefix(prefix)).is_file(), f"{url} names a file the repository does not have"
