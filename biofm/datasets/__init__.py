"""Concrete sources; importing this package registers their `biofm prepare <source>` subcommands."""

from biofm.datasets import molecules, synthetic  # noqa: F401
