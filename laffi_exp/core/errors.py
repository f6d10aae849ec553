"""The exception types the command line turns into a single clear line (and exit code 2)."""


class ConfigError(ValueError):
    """A configuration value, file or folder is not what the pipeline needs; the message names it."""


class AnnotationError(RuntimeError):
    """An annotator kept failing (after its retries) or gave unusable output; the message says which."""
