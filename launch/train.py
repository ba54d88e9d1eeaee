#!/usr/bin/env python
"""Train the unified text/image/audio transformer under DeepSpeed.

    deepspeed launch/train.py --ds_config zero3_offload.json [--model tiny] [--data DIR]

Bad input (unknown preset, missing or malformed config, missing or corrupt data) ends
with one line naming the culprit and exit status 2. SIGTERM or SIGUSR1 ends the run after
the current step with a checkpoint and exit status 75 (megamm/train/preemption.py).
"""
import sys

from megamm.config import ConfigError
from megamm.data.loader import DataError
from megamm.data.shards import ShardError


def main(argv=None) -> int:
    from megamm.train.args import parse
    from megamm.train.loop import run
    from megamm.train.preemption import PREEMPTED_EXIT, Preempted

    try:
        run(parse(argv))
    except (ConfigError, ShardError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Preempted:  # checkpoint saved, line printed by rank 0
        return PREEMPTED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
