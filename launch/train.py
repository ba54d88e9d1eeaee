#!/usr/bin/env python
"""Train the unified text/image/audio transformer under DeepSpeed.

    deepspeed launch/train.py --ds_config zero3_offload.json [--model tiny] [--data DIR]

Bad input (unknown preset, missing or malformed config, missing or corrupt data, a
damaged or unsafe checkpoint) ends with one line naming the culprit and exit status 2.
A run that stops itself (a checkpoint save that failed on some rank, too many
consecutive bad steps) ends with one line from rank 0 and exit status 3. SIGTERM or SIGUSR1
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
    from megamm.train.loop import run
    from megamm.train.preemption import PREEMPTED_EXIT, Preempted

    try:
        run(parse(argv))
    except (CheckpointSaveError, BadStepsError) as e:  # every rank agreed on it: rank 0 says it once
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    except (ConfigError, ShardError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Preempted:  # checkpoint saved, line printed by rank 0
        return PREEMPTED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
