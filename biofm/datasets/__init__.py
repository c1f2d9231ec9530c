"""Concrete sources; importing this package registers their `biofm prepare <source>` subcommands."""

from biofm.datasets import ehr, molecules, oct, slides, synthetic, synthetic_slides  # noqa: F401
