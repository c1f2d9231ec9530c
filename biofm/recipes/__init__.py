"""Recipes: jobs built from the platform, the sources and the modalities, with their settings in
`configs/` (the demo, the training-and-test helper of the benchmarks). Importing this package registers
their commands (`biofm demo`)."""

from biofm.recipes import chemist, demo  # noqa: F401  (registers `biofm demo`, `mol-train`, `mol-predict`)
