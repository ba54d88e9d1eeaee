"""Several short training runs in one launch: `deepspeed --num_gpus N many_runs.py RUNS.json`,
RUNS.json a list of launch/train.py argument lists. Each run goes through the trainer's
own `run(parse(args))` one after another in the same processes, so the suite pays the
launch, the imports and the process groups once for a whole list of layouts.

The sample hook keeps the live model it is handed (`samples/live_step<N>.pt`, its state
dict), so a test can compare the weights samples come from with the checkpoint's. A plan
with an NVMe run first registers the NVMe ops tests/ds_ops.py builds."""
import gc
import json
import sys
from pathlib import Path

import torch

from megamm.parallel.distributed import shutdown
from megamm.train.args import parse
from megamm.train.loop import Hooks, run


def keep_live_weights(model, tokenizers_dir, out_dir: Path, step: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / f"live_step{step}.pt")


def main(path: str) -> int:
    fresh = torch.initial_seed()  # torch's seed as a new process starts with it
    plan = json.loads(Path(path).read_text())
    if any("nvme" in str(a) for args in plan for a in args):  # tests/ds_ops.py: the NVMe ops, built faster
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import ds_ops

        ds_ops.register()
    for args in plan:
        torch.manual_seed(fresh)  # each run starts as a launch of its own would
        run(parse([str(a) for a in args] + ["--no-progress"]), Hooks(sample=keep_live_weights))
        gc.collect()  # the previous engine's buffers before the next one is built
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(next(a for a in sys.argv[1:] if not a.startswith("--local_rank"))))
