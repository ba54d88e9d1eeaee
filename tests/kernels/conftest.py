"""Kernel tests run Triton's CPU interpreter. The variable is set here, before anything
imports triton, as Triton's own docs ask; ``megamm.kernels`` itself reads it at call time."""
import os

os.environ["TRITON_INTERPRET"] = "1"
