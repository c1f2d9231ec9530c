"""The test report (issue #23): a plot per task, metrics per source, one self-contained HTML page."""

import re

import numpy as np
import pytest
from lightning.pytorch import Trainer, seed_everything

from biofm.platform.lightning import BiofmDataModule, BiofmModule
from biofm.platform.report import OUTPUTS, REPORT_DIR, load_outputs, write_report


@pytest.fixture(scope="module")
def tested(cohort_store, tmp_path_factory):
    """A tiny model trained 3 steps and tested on the cohort (one fit for every test here)."""
    return _tested(cohort_store, tmp_path_factory.mktemp("tested"))


def _tested(store, tmp_path):
    seed_everything(0, verbose=False)
    data = BiofmDataModule([store.url], batch_size=64)
    module = BiofmModule(data.schema, d_model=16, depth=1, heads=2, latents=2, dropout=0.0)
    trainer = Trainer(
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, verbose=False)
    return module, data


def test_report_has_one_plot_per_task_and_references_nothing_outside(tested, tmp_path):
    module, data = tested
    kinds = {t: s["kind"] for t, s in data.schema["tasks"].items()}
    assert set(kinds.values()) == {"binary", "multiclass", "regression", "ordinal", "multilabel"}
    page = write_report(tmp_path, module.test_outputs, data.schema["tasks"])
    assert page == tmp_path / REPORT_DIR / "report.html"
    for task in kinds:
        png = tmp_path / REPORT_DIR / f"{task}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == len(kinds)
    assert not re.search(r'(src|href)\s*=\s*["\'](?!data:)', text), "the page must not load anything from outside"
    assert "url(" not in text and "@import" not in text and "<script" not in text


def test_kept_test_outputs_are_the_labelled_test_samples_without_ids(cohort_store, tested, tmp_path):
    module, data = tested
    write_report(tmp_path, module.test_outputs, data.schema["tasks"])
    specs, outputs = load_outputs(tmp_path)
    test_rows = cohort_store.index("split") == "test"
    labels = cohort_store.labels("risk_score")[test_rows]
    assert len(outputs["risk_score"]["target"]) == int((~np.isnan(labels)).sum())
    assert np.allclose(np.sort(outputs["risk_score"]["target"]), np.sort(labels[~np.isnan(labels)]))
    assert set(outputs["risk_score"]) == {"target", "value", "source"}  # no sample or subject id
    assert specs["subtype"]["kind"] == "multiclass" and specs["subtype"]["classes"]
    assert outputs["findings"]["value"].shape[1] == len(specs["findings"]["classes"])


def test_biofm_report_builds_the_page_again(tested, tmp_path):
    from biofm.platform.cli import main

    module, data = tested
    page = write_report(tmp_path, module.test_outputs, data.schema["tasks"])
    page.unlink()
    main(["report", str(tmp_path)])
    assert page.exists() and (tmp_path / REPORT_DIR / OUTPUTS).exists()


def test_the_report_lists_the_notes_on_few_labels(tested, tmp_path):
    module, data = tested
    notes = {"grade": "test split: task 'grade' has 3 of class 0, 2 of class 1: its metrics rest on few labels"}
    page = write_report(tmp_path, module.test_outputs, data.schema["tasks"], notes)
    assert "Notes on the labels" in page.read_text() and "its metrics rest on few labels" in page.read_text()
    page.unlink()
    from biofm.platform.cli import main

    main(["report", str(tmp_path)])  # rebuilt from the saved outputs: the notes are kept
    assert "its metrics rest on few labels" in page.read_text()
    assert "Notes on the labels" not in write_report(tmp_path, module.test_outputs, data.schema["tasks"]).read_text()


def test_a_test_whose_split_has_few_labels_notes_it_in_the_report(tmp_path):
    """fit + test on a store whose test split holds 3 positives: the report lists the note (not a warning)."""
    import warnings

    from biofm.recipes.runs import fit_and_test
    from biofm.testing import write_flag_store

    def few_positives(x):
        flag = (x[:, 0] > 0).astype(np.float32)
        flag[100:] = 0.0
        flag[[100, 105, 110]] = 1.0  # 3 positives in the test split: fewer than FEW
        return flag

    url = write_flag_store(tmp_path / "few.zarr", few_positives, source="few")
    tiny = {"d_model": 16, "depth": 1, "heads": 2, "latents": 2}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_and_test([url], tmp_path / "run", epochs=1, batch_size=32, model=tiny, loggers=False)
    assert not [w for w in caught if "rest on few labels" in str(w.message)]
    page = (tmp_path / "run" / REPORT_DIR / "report.html").read_text()
    assert "test split: task &#x27;flag&#x27; has 17 of class 0, 3 of class 1: its metrics rest on few labels" in page
