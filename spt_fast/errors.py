"""User-facing errors: the CLI prints their message alone, without a traceback."""


class SPTError(Exception):
    """Bad input or configuration; the message names the file, line or field at fault."""


class DataError(SPTError):
    """A data file (or row of one) cannot be read as the declared format."""


class CheckpointError(SPTError):
    """A checkpoint is missing, incomplete, or does not fit the model it is loaded onto."""


class ModelLoadError(SPTError):
    """A model folder/file cannot be read, or its architecture is not supported where asked."""
