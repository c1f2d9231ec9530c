"""Error types that every layer raises; this module imports nothing of biofm, so any module may use it."""


class StoreError(ValueError):
    """A store (or what is about to be written to one, or the raw input it is written from) does not follow
    the contract; the message names the file, row or field and what to do."""


class CheckpointError(ValueError):
    """A file given as a checkpoint is not one biofm can use (empty, truncated, not a checkpoint, another
    program's, or one that only unpickling code could read); the message says which."""


class ConfigError(ValueError):
    """A training config that cannot work with its stores; raised before any training starts."""
