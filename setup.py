"""Installs preact_fused (pure Python; the CUDA extension is added by csrc/ when nvcc is found)."""
from setuptools import find_packages, setup

setup(
    name="preact_fused",
    version="0.1.0",
    description="Fused BatchNorm-ReLU-conv kernels for pre-activation residual networks",
    packages=find_packages(include=["preact_fused", "preact_fused.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={"test": ["pytest>=7", "numpy"], "bench": ["matplotlib", "tqdm"]},
)
