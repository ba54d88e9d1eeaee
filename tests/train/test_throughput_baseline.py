"""benchmarks/train_throughput.py's baseline path: stock transformers.LlamaForCausalLM with
tiny's shapes trains for a few steps under a bundled DeepSpeed config (real processes,
launched twice: --repeats keeps the median launch)."""
import json
import math
import os
import subprocess
import sys

from conftest import ROOT

STEPS = 3


def test_the_transformers_baseline_trains_a_few_steps(tiny_data, tmp_path):
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--model", "tiny", "--ds_config",
                           "zero2.json", "--impls", "hf", "--data", str(tiny_data), "--seq-len", "64",
                           "--micro-batch", "2", "--grad-accum", "1", "--steps", str(STEPS), "--warmup-steps", "1",
                           "--repeats", "2", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    (row,) = result["results"]
    assert row["impl"] == "hf" and len(row["losses"]) == STEPS
    assert all(math.isfinite(x) for x in row["losses"])
    assert row["losses"][0] > math.log(256)  # untrained: about log(vocab) nats
    assert row["tokens_per_s"] > 0 and row["tflops"] > 0 and row["peak_host_rss_gb"] > 0.1
    assert result["speedup"] is None  # no megamm row in this run
    each = row["tokens_per_s_each_launch"]  # --repeats 2: two launches, the row is the slower one
    assert len(each) == 2 and row["tokens_per_s"] == min(each)
