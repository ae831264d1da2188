"""Errors that the CLI reports as one line (no traceback): they describe bad input, not bugs."""


class SkipGPTError(Exception):
    pass


class ConfigError(SkipGPTError, ValueError):
    """A config file or value that skipgpt cannot use."""


class ArtifactError(SkipGPTError, ValueError):
    """A router artifact that is missing, corrupt, or made for another base model."""


class UnsupportedModelError(SkipGPTError, ValueError):
    """A model whose decoder structure skipgpt does not know how to route."""


class DataError(SkipGPTError, ValueError):
    """A data file or folder that is missing, empty or in the wrong format."""
