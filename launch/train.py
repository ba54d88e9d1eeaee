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
import logging
import os
import sys
from pathlib import Path

# Importing DeepSpeed logs its accelerator probe ("Setting accelerator to CPU") to stdout,
# where --dry-run prints its report: the imports run with warnings off.
logging.disable(logging.WARNING)
try:
    from megamm.config import ConfigError
    from megamm.data.loader import DataError
    from megamm.data.shards import ShardError
    from megamm.demo.recipe import ensure_default_dataset
    from megamm.demo.report import evaluate, write_samples_from_model
    from megamm.parallel.distributed import shutdown
    from megamm.train.args import parse
    from megamm.train.bad_steps import BadStepsError
    from megamm.train.checkpoint import CheckpointSaveError
    from megamm.train.loop import FinalEvalError, Hooks, run
    from megamm.train.preemption import PREEMPTED_EXIT, Preempted
finally:
    logging.disable(logging.NOTSET)

REPORT_KEYS = ("test_nll_nats_per_dim", "text_to_image_digit_acc", "text_to_image_color_acc", "image_to_text_exact",
               "audio_to_text_exact", "text_to_audio_word_acc")


def final_evaluation(save_dir: Path) -> None:
    """tools/evaluate.py's report on the run's final checkpoint; prints where it and its pictures are."""
    out = save_dir / "report.json"
    report = evaluate(save_dir, out, log=lambda m: print(m, flush=True))
    print("report: " + ", ".join(f"{k} {report[k]:.3f}" for k in REPORT_KEYS if k in report), flush=True)
    print(f"samples: {report['samples_png']}" + (f"  curve: {report['curve_png']}" if "curve_png" in report else ""),
          flush=True)
    print(f"report written to {out}", flush=True)


# The embedded demo is the default data set, its samples and its final report.
DEMO = Hooks(default_data=ensure_default_dataset, sample=write_samples_from_model, final_eval=final_evaluation)


def main(argv=None) -> int:
    try:
        run(parse(argv), DEMO)
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
