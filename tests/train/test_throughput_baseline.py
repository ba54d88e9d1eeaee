"""benchmarks/train_throughput.py's baseline path: stock transformers.LlamaForCausalLM with
tiny's shapes trains for a few steps under a bundled DeepSpeed config (real processes,
launched twice: --repeats keeps the median launch)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

STEPS = 3


def test_the_transformers_baseline_trains_a_few_steps(tiny_data, tmp_path):
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--model", "tiny", "--ds_config",
                           "zero2.json", "--impls", "hf", "--data", str(tiny_data), "--seq-len", "64",
                           "--micro-batch", "2", "--grad-accum", "1", "--steps", str(STEPS), "--warmup-steps", "1",
                           "--repeats", "2", "--loss-scope", "full", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
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


@pytest.mark.parametrize("scope", ["full", "modality"])
def test_the_baselines_loss_is_megamms_loss_definition(scope):
    """causal_lm_loss on the stock model's full logits equals megamm's head loss (mean over
    counted targets) for the same hidden states and table: the speedups compare one loss."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from hf_baseline import causal_lm_loss

    from megamm.config import get_preset
    from megamm.data.synthetic import synthetic_document
    from megamm.model.loss import GrammarTables, grammar_loss
    from megamm.vocab import Vocab

    v = Vocab(get_preset("tiny").vocab)
    rng = __import__("numpy").random.default_rng(0)
    ids = []
    while len(ids) < 2 * 97:
        ids += synthetic_document(v, rng)
    row = torch.tensor(ids[:2 * 97]).view(2, 97)
    row[1, -5:] = v.pad
    x, y = row[:, :-1], row[:, 1:]
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 96, 16, generator=g), torch.randn(v.size, 16, generator=g)
    want_sum, stats = grammar_loss(h, w, 0, v.states(x), y, GrammarTables(v), scope)
    want = want_sum / stats[len(stats) // 2:].sum()
    got = causal_lm_loss(h @ w.t(), x, y, v, scope)
    assert stats[len(stats) // 2:].sum() < y.numel() - 4  # pads and forbidden targets are not counted
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
