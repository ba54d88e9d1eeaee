#!/usr/bin/env python
"""Train the unified text/image/audio transformer under DeepSpeed.

    deepspeed launch/train.py --ds_config zero3_offload.json [--model tiny] [--data DIR]

Bad input (unknown preset, missing or malformed config, missing or corrupt data, a
damaged or unsafe checkpoint) ends with one line naming the culprit and exit status 2.
A run that stops itself (a checkpoint save that failed on some rank, too many
consecutive bad steps) ends with one line from rank 0 and exit status 3; a run that trained
and saved but whose final evaluation failed, with one line and exit status 4. SIGTERM or SIGUSR1
ends the run after the current step with a checkpoint and exit status 75
(megamm/train/preemption.py).
"""
import os
import sys

from megamm.config import ConfigError
from megamm.data.loader import DataError
from megamm.data.shards import ShardError
from megamm.train.bad_steps import BadStepsError
from megamm.train.checkpoint import CheckpointSaveError


def main(argv=None) -> int:
    from megamm.train.args import parse
    from megamm.train.loop import FinalEvalError, run
    from megamm.train.preemption import PREEMPTED_EXIT, Preempted

    from megamm.parallel.distributed import shutdown

    try:
        run(parse(argv))
    except (CheckpointSaveError, BadStepsError) as e:  # every rank agreed on it: rank 0 says it once
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        shutdown()
        return 3
    except (ConfigError, ShardError, DataError) as e:  # may be one rank's alone: no collective here
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except FinalEvalError as e:  # rank 0 alone evaluates, after training and saving
        print(f"error: {e}", file=sys.stderr, flush=True)
        shutdown()
        return 4
    except Preempted:  # every rank saved the same step; rank 0 printed the line
        shutdown()
        return PREEMPTED_EXIT
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
