"""The layer cake (ARCHITECTURE.md): the library never imports the embedded demo.

Every .py under megamm/ except megamm/demo/ is parsed with `ast`; an import of
megamm.demo (or of anything in it) anywhere in the file, at module level or inside a
function, fails the test with the file and line."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "megamm"
DEMO = LIBRARY / "demo"


def _module_of(path: Path) -> str:
    """megamm/data/loader.py -> "megamm.data.loader"; a package's __init__.py -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The absolute names an Import / ImportFrom node brings in (relative imports
    resolved against `module`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module.split(".")
        package = package if is_package else package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _is_demo(name: str) -> bool:
    return name == "megamm.demo" or name.startswith("megamm.demo.")


def library_imports_of_demo() -> list[str]:
    found = []
    for path in sorted(LIBRARY.rglob("*.py")):
        if DEMO in path.parents:
            continue
        module, is_package = _module_of(path), path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [n for n in _imported(node, module, is_package) if _is_demo(n)]
            if names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {names[0]}")
    return found


def test_the_library_never_imports_the_demo():
    assert DEMO.is_dir() and list(LIBRARY.rglob("*.py"))
    assert library_imports_of_demo() == []


def test_the_scan_sees_every_form_of_import(tmp_path):
    forms = ["import megamm.demo", "import megamm.demo.report as r", "from megamm.demo import report",
             "from megamm.demo.report import evaluate", "from megamm import demo",
             "def f():\n    from megamm.demo.recipe import ensure_default_dataset"]
    for source in forms:
        nodes = ast.walk(ast.parse(source))
        assert any(_is_demo(n) for node in nodes for n in _imported(node, "megamm.train.loop", False)), source
    relative = ast.parse("from ..demo import digits").body[0]
    assert _is_demo(_imported(relative, "megamm.train.loop", False)[0])
    assert not any(_is_demo(n) for node in ast.walk(ast.parse("import megamm.demography\nfrom megamm import data"))
                   for n in _imported(node, "megamm.x", False))


def test_the_checkout_root_holds_one_importable_package_megamm():
    """`python -m pytest` and `python -c` from the checkout put its root first on sys.path,
    so a top-level folder with an __init__.py there shadows any installed package of the
    same name. A top-level `kernels/` did exactly that to the PyPI package `kernels`, which
    transformers imports when installed: every test importing transformers failed to
    collect. Folders without an __init__.py are namespace portions and never shadow a
    regular package, so only these are checked."""
    regular = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert regular == ["megamm"], f"top-level packages in the checkout: {regular}"
    assert not (ROOT / "kernels.py").exists()


def test_no_script_folder_module_shadows_an_installed_module():
    """`python benchmarks/x.py` puts benchmarks/ first on sys.path, so a module there
    named like an installed one replaces it for every import in that process.
    benchmarks/kernels.py did that to the PyPI `kernels` when the transformers baseline
    imported LlamaForCausalLM. Every folder of runnable scripts is checked against the
    top-level modules importable from the environment (site-packages and stdlib)."""
    import pkgutil
    import sys

    script_dirs = [ROOT / d for d in ("benchmarks", "tools", "launch", "launch/slurm")]
    script_dirs = [d for d in script_dirs if d.is_dir()]
    ours = {str(ROOT.resolve())} | {str(d.resolve()) for d in script_dirs}
    paths = [p for p in sys.path if p and Path(p).resolve().as_posix() not in ours]
    installed = {m.name for m in pkgutil.iter_modules(paths)} | set(sys.builtin_module_names)
    installed |= set(getattr(sys, "stdlib_module_names", ()))
    assert {"json", "torch"} <= installed  # the scan sees the stdlib and site-packages
    clashes = []
    for d in script_dirs:
        for m in pkgutil.iter_modules([str(d)]):
            if m.name in installed:
                clashes.append(f"{d.relative_to(ROOT)}/{m.name}")
    assert clashes == [], f"script-folder modules that shadow installed ones: {clashes}"
