"""Modalities, one folder each; importing this package registers them (one line per modality)."""

from biofm.modalities import molecule, tabular, text  # noqa: F401
