"""ipmt-fast: a faithful, fast IPMT (Intermediate Prototype Mining Transformer)."""
import platform

from setuptools import find_packages, setup

# The supported range: the oldest releases ipmt-fast was run on (NOTES.md, "Supported versions";
# scripts/check_torch_versions.py). torch 2.13 is the first whose headers compile csrc/ and whose
# wrap_triton takes the interpreter's kernels; it needs Python 3.10 and its CUDA wheels pin Triton
# 3.7.1. ipmt_fast/__init__.py refuses an older torch at import with the same bounds.
TORCH = "torch>=2.13,<3"
PYTHON = ">=3.10"
# Triton ships wheels for Linux x86-64 and aarch64 only.
TRITON = ["triton>=3.7.1"] if platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64") else []

setup(
    name="ipmt-fast",
    version="0.1.0",
    description="Fast, exact IPMT for few-shot semantic segmentation: fused Triton / C++ / CUDA ops",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=PYTHON,
    packages=find_packages(include=["ipmt_fast", "ipmt_fast.*"]) + ["ipmt_fast.kernels", "ipmt_fast.csrc"],
    # kernels/ and csrc/ live at the top of the checkout but install inside the package, so no
    # top-level module named `kernels` is installed. The compiled backend builds csrc/ on first use.
    package_dir={"ipmt_fast.kernels": "kernels", "ipmt_fast.csrc": "csrc"},
    package_data={"ipmt_fast.csrc": ["*.cpp", "*.cu", "*.h", "*.cuh"]},
    # OpenCV 4: the data transforms are the published pipeline's OpenCV calls, and their pixels are
    # OpenCV 4's (OpenCV 5 rotates differently: up to 7 grey levels on noise, and its float32
    # warpAffine ran 4.7x slower here). 4.10 is the first built for numpy 2. Pillow reads palette PNGs.
    install_requires=[TORCH, "numpy", "opencv-python-headless>=4.10,<5", "pillow", "pyyaml", "tqdm"]
    + TRITON,
    extras_require={"test": ["pytest", "pytest-benchmark", "ninja"], "bench": ["matplotlib"]},
    entry_points={"console_scripts": ["ipmt-fast=ipmt_fast.cli:main"]},
)
