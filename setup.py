"""Install nanolab. `pip install -e .` builds the optional C++ interval set (pybind11) when a compiler is there;
without one the install still succeeds and nanolab falls back to the pure-Python treap."""
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build extensions, but never fail the install: the pure-Python backend covers for a missing compiler."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any build failure means "use the Python fallback"
            print(f"nanolab: C++ extension not built ({e}); using the pure-Python IntervalSet", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"nanolab: could not build {ext.name} ({e}); using the pure-Python IntervalSet", file=sys.stderr)


def extensions():
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("nanolab: pybind11 not found; skipping the C++ IntervalSet", file=sys.stderr)
        return []
    return [
        Pybind11Extension(
            "nanolab._interval_set",
            ["csrc/interval_set.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ]


setup(
    name="nanolab",
    version="0.1.0",
    description="A minimal, from-scratch PyTorch kit for language-model training research",
    packages=find_packages(include=["nanolab", "nanolab.*"]),
    package_data={"nanolab": ["prompts/*.prompt"]},
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "tiktoken", "h5py", "tqdm", "sympy", "safetensors", "pyyaml"],
    extras_require={
        "test": ["pytest", "hypothesis", "transformers", "sortedcontainers", "matplotlib", "tokenizers",
                 "jinja2>=3.1.6", "peft", "math-verify"],  # oracles only
        "hf": ["tokenizers", "jinja2>=3.1.6"],  # Hugging Face tokenizer folders and chat templates
        "wandb": ["wandb"],
        "plot": ["matplotlib"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
