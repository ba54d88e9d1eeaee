"""Install megamm. One top-level folder is installed under the megamm package:
`ds_configs/` (JSON and README only) as `megamm.ds_configs`, so a bare
`--ds_config NAME` resolves in an installed megamm as in a checkout
(megamm/train/ds_config.py). Every package under megamm/ is found, not listed.

The Triton kernels live in megamm/kernels/, not in a top-level `kernels/`: a folder of
that name at the checkout's root would be importable as `kernels` whenever the root is on
sys.path (`python -m pytest`, `python -c` from the root) and shadow the PyPI package
`kernels`, which transformers imports when it is installed."""
from setuptools import find_packages, setup

# megamm.data has no __init__.py, so find_packages (regular packages only) cannot see it
PACKAGES = sorted({*find_packages(include=["megamm", "megamm.*"]), "megamm.data",
                   "megamm.ds_configs"})

setup(
    name="megamm",
    version="0.1.0",
    description="Scalable training of one decoder-only transformer over text, image and audio tokens",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"megamm.ds_configs": "ds_configs"},
    package_data={"megamm": ["assets/*", "assets/**/*"], "megamm.ds_configs": ["*.json", "README.md"]},
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
        # media (megamm/media.py, megamm/demo/pictures.py): images, audio, resampling, charts
        "Pillow>=10.1",
        "soundfile>=0.12",
        "soxr>=0.3",
        "matplotlib>=3.6",
        "transformers>=5.0",  # pretrained image/audio tokenizers, HF export, megamm.hf_generation
        "webdataset>=0.2",  # tools/prepare_data.py --webdataset (megamm/data/sources.py)
        "datasets>=2.19",  # tools/prepare_data.py --hf-dataset
    ],
    extras_require={
        "dev": ["pytest>=8", "mpi4py>=3.1"],
        "flash": ["flash-attn>=2.5"],
        "mpi": ["mpi4py>=3.1"],
    },
)
