"""Building the DeepSpeed engine, the loop, metrics, checkpoint/resume."""
