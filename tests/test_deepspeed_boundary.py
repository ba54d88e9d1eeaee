"""The layering the design promises, checked on the sources: only the DeepSpeed adapter
(megamm/checkpoint/ds/) names DeepSpeed's checkpoint files, state layouts and private
methods; generation, evaluation and the convert tools import nothing of megamm.train;
train imports neither eval nor the demo; the checkpoint package sits below train."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "megamm" / "checkpoint" / "ds"
# what only the adapter may say: DeepSpeed's file names, state keys and private methods
DEEPSPEED_KNOWLEDGE = re.compile(
    r"model_states\.pt|optim_states\.pt|_count_layer_params|_copy_recovery_script|checkpoint_engine|zero_to_fp32"
    r"|single_partition_of_fp32_groups|param_slice_mappings|fp32_flat_groups|was_step_applied|engine\.skipped_steps"
    r"|load_universal|forward_funcs")


def sources(*dirs: str):
    for d in dirs:
        p = ROOT / d
        yield from ([p] if p.is_file() else sorted(p.rglob("*.py")))


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement anywhere in the file names (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def offenders(paths, forbidden: str) -> list[str]:
    return [f"{p.relative_to(ROOT)}: {m}" for p in paths for m in sorted(imported_modules(p))
            if m == forbidden or m.startswith(forbidden + ".")]


def test_only_the_adapter_knows_deepspeeds_files_and_private_methods():
    found = [f"{p.relative_to(ROOT)}:{i}: {m.group(0)}" for p in sources("megamm", "tools", "launch")
             if ADAPTER not in p.parents
             for i, line in enumerate(p.read_text().splitlines(), 1) if (m := DEEPSPEED_KNOWLEDGE.search(line))]
    assert not found, found


def test_the_scan_sees_what_the_adapter_knows():
    """The pattern is not vacuous: the adapter itself matches it for every kind of knowledge."""
    text = "\n".join(p.read_text() for p in sources("megamm/checkpoint/ds"))
    for word in ("optim_states.pt", "model_states.pt", "_count_layer_params", "_copy_recovery_script",
                 "param_slice_mappings", "was_step_applied", "load_universal"):
        assert word in text, word


def test_generation_evaluation_and_convert_tools_import_nothing_of_train():
    paths = list(sources("megamm/eval", "megamm/generate.py", "tools/generate.py", "tools/evaluate.py",
                         "tools/convert_to_hf.py", "tools/convert_from_hf.py"))
    assert len(paths) >= 6
    assert not offenders(paths, "megamm.train")


def test_train_imports_neither_eval_nor_the_demo():
    paths = list(sources("megamm/train"))
    assert not offenders(paths, "megamm.eval") and not offenders(paths, "megamm.demo")


def test_the_checkpoint_package_sits_below_train_eval_and_the_demo():
    paths = list(sources("megamm/checkpoint"))
    for higher in ("megamm.train", "megamm.eval", "megamm.demo", "megamm.generate"):
        assert not offenders(paths, higher), higher
