import os

import pytest

os.environ["WANDB_MODE"] = "disabled"  # tests never start W&B unless a test asks for it
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_report_header(config):
    from biofm.testing import SHARED_DATA

    if SHARED_DATA.is_dir():
        return f"biofm shared data: {SHARED_DATA}"
    return (
        f"biofm shared data: {SHARED_DATA} is absent, so the tests that read real data skip (set "
        "BIOFM_SHARED_DATA to the folder that holds it)"
    )


@pytest.fixture(scope="session")
def cohort_store(tmp_path_factory):
    """A small synthetic cohort (tabular + text, five task kinds), shared by the training tests."""
    from biofm.datasets.synthetic import prepare_synthetic

    return prepare_synthetic(str(tmp_path_factory.mktemp("cohort") / "synthetic.zarr"), n=700, seed=3)
