"""One distribution, two packages: ``m2iv_kernels`` (the ops) and ``m2iv`` (the method).

The C++/CUDA extension in ``csrc/`` is optional and built separately (see README), so a plain
``pip install .`` works on any machine with a Python interpreter.
"""
from setuptools import find_packages, setup

setup(
    name="m2iv",
    version="0.1.0",
    description="Fused Triton/CUDA kernels and a patcher that steer vision-language models "
    "with multimodal in-context vectors (M2IV).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["m2iv", "m2iv.*", "m2iv_kernels", "m2iv_kernels.*",
                                    "benchmarks"]),
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "hf": ["transformers>=5.0", "safetensors>=0.4", "tqdm"],
        "test": ["triton>=3.6", "numpy>=2.4", "transformers>=5.0", "safetensors>=0.4", "tqdm",
                 "pytest>=8", "ninja"],
    },
    entry_points={"console_scripts": ["m2iv=m2iv.cli:main"]},
)
