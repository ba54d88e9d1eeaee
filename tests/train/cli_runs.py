"""Many launch/train.py command lines through its own `main(argv)`, one after another in one
process: `python tests/train/cli_runs.py CASES.json OUT.json`, CASES.json {name: [argv, env]}.
Writes {name: {"code", "stdout", "stderr"}}: main's return value, or the SystemExit code
(argparse's refusals), or 1 with the traceback in "stderr" for anything that escaped main,
as the interpreter would print it. The environment a case set or changed is restored after it, and
the process group a case set up is torn down after it, as its own process's exit would.
The suite pays the imports once for every one-line-error check, not once per check."""
import contextlib
import io
import json
import os
import runpy
import sys
import traceback
from pathlib import Path

from megamm.parallel.distributed import shutdown

ROOT = Path(__file__).resolve().parents[2]


def run_case(main, argv: list[str], env: dict[str, str]) -> dict:
    saved = dict(os.environ)  # the trainer sets RANK/WORLD_SIZE for a process of its own
    os.environ.update(env)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001  what the interpreter would print on its way out
                traceback.print_exc()
                code = 1
    finally:
        shutdown()
        os.environ.clear()
        os.environ.update(saved)
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main(cases_path: str, out_path: str) -> int:
    os.chdir(ROOT)
    train = runpy.run_path(str(ROOT / "launch" / "train.py"), run_name="megamm_cli_runs")
    cases = json.loads(Path(cases_path).read_text())
    results = {name: run_case(train["main"], [*argv, "--no-progress"], env) for name, (argv, env) in cases.items()}
    Path(out_path).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
