"""course: how GPT-3-scale transformers are trained, built and measured one technique at a time."""
__version__ = "0.1.0"
