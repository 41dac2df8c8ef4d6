"""The package's version, in a module of its own so that the modules that record it (checkpoint
metadata, the trainer's run log) import it without importing the package's ``__init__``."""

__version__ = "0.1.0"
