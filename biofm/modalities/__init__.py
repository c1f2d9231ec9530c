"""Modalities, one folder each; importing this package registers them (one line per modality)."""

from biofm.modalities import ehr, molecule, oct, tabular, text, wsi  # noqa: F401
