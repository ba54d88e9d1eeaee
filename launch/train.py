#!/usr/bin/env python
"""Train the unified text/image/audio transformer under DeepSpeed.

    deepspeed launch/train.py --ds_config zero3_offload.json [--model tiny] [--data DIR]

Bad input (unknown preset, missing or malformed config, missing or corrupt data) ends
with one line naming the culprit and exit status 2.
"""
import sys

from megamm.config import ConfigError
from megamm.data.loader import DataError
from megamm.data.shards import ShardError


def main(argv=None) -> int:
    from megamm.train.args import parse
    from megamm.train.loop import run

    try:
        run(parse(argv))
    except (ConfigError, ShardError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
