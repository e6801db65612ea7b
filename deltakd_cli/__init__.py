"""deltakd: Delta Knowledge Distillation for language models, with an offline teacher cache."""

__version__ = "0.2.0"
