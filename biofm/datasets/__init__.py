"""Concrete sources; importing this package registers their `biofm prepare <source>` subcommands."""

from biofm.datasets import ehr, molecules, synthetic  # noqa: F401
