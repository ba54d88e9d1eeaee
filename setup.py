"""Install megamm. `kernels/` is installed as `megamm.kernels` so it never shadows
the unrelated PyPI package called `kernels`."""
from setuptools import setup

setup(
    name="megamm",
    version="0.1.0",
    description="Scalable training of one decoder-only transformer over text, image and audio tokens",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "megamm",
        "megamm.model",
        "megamm.parallel",
        "megamm.data",
        "megamm.train",
        "megamm.tokenizers",
        "megamm.eval",
        "megamm.kernels",
    ],
    package_dir={"megamm.kernels": "kernels"},
    package_data={"megamm": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "triton>=3.0",
        "numpy",
        "tqdm",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "scikit-learn",
    ],
    extras_require={
        "dev": ["pytest>=8", "transformers>=4.44", "mpi4py>=3.1"],
        "flash": ["flash-attn>=2.5"],
        "mpi": ["mpi4py>=3.1"],
    },
)
