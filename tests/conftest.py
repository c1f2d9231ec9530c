import os

import pytest

os.environ["WANDB_MODE"] = "disabled"  # tests never start W&B unless a test asks for it
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def cohort_store(tmp_path_factory):
    """A small synthetic cohort (tabular + text, five task kinds), shared by the training tests."""
    from biofm.datasets.synthetic import prepare_synthetic
    return prepare_synthetic(str(tmp_path_factory.mktemp("cohort") / "synthetic.zarr"), n=700, seed=3)
