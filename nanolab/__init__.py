"""nanolab: a minimal, from-scratch PyTorch kit for language-model training research."""

__version__ = "0.1.0"
