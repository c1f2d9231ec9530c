"""Molecules: canonical graphs, edge cases, prepare with rejects, splits, sparse labels, a short fit."""

import gzip
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from biofm.datasets.molecules import prepare_molecules, rejects_path, scaffold_splits
from biofm.modalities.molecule.featurise import featurise_smiles
from biofm.platform.modality import MODALITIES
from biofm.testing import SHARED_DATA

MOL_DATA = SHARED_DATA / "mol"
needs_mol_data = pytest.mark.skipif(not MOL_DATA.exists(), reason=f"shared molecule data not found at {MOL_DATA}")


def _graphs(smiles, **kwargs):
    arrays, reasons = featurise_smiles(smiles, **kwargs)
    return [{k: v.row(i) for k, v in arrays.items()} for i in range(len(smiles))], reasons


@pytest.mark.parametrize(
    "a, b",
    [
        ("OCC(=O)c1ccccc1", "c1ccc(cc1)C(=O)CO"),
        ("N[C@@H](C)C(=O)O", "C[C@H](N)C(=O)O"),  # L-alanine, written two ways
        ("C/C=C/C", "C\\C=C\\C"),  # trans-2-butene
        ("c1ccncc1", "n1ccccc1"),
        ("CN1CCC[C@H]1c1cccnc1", "c1cncc(c1)[C@@H]1CCCN1C"),  # nicotine
        (
            "C[C@H](N)C(=O)O",
            "CC(N)C(=O)O |(-0.845,-0.956,-0.277;-0.225,0.300,0.287;-0.724,1.435,-0.449;"
            "1.258,0.218,0.148;1.896,1.064,-0.534;1.891,-0.831,0.805)|",
        ),  # chirality from 3D (CXSMILES)
    ],
)
def test_one_molecule_gives_one_graph_whatever_its_smiles(a, b):
    (ga, gb), reasons = _graphs([a, b], rw_steps=4, lap_dim=3)
    assert reasons == [None, None]
    for key in ga:
        np.testing.assert_array_equal(ga[key], gb[key], err_msg=key)


@pytest.mark.parametrize("a, b", [("N[C@@H](C)C(=O)O", "N[C@H](C)C(=O)O"), ("C/C=C/C", "C/C=C\\C")])
def test_stereoisomers_give_different_graphs(a, b):
    (ga, gb), _ = _graphs([a, b])
    assert not (np.array_equal(ga["atoms"], gb["atoms"]) and np.array_equal(ga["bonds"], gb["bonds"]))


@pytest.mark.parametrize(
    "smiles, n_atoms, n_bonds",
    [
        ("C[N+](C)(C)C", 5, 4),  # charged
        ("CC(=O)[O-]", 4, 3),
        ("c1cc[nH]c1", 5, 5),  # aromatic heterocycles
        ("c1ccsc1", 5, 5),
        ("C", 1, 0),  # single atoms
        ("[Na+]", 1, 0),
        ("O", 1, 0),
    ],
)
def test_edge_case_molecules_featurise(smiles, n_atoms, n_bonds):
    (graph,), reasons = _graphs([smiles], rw_steps=3, lap_dim=2)
    assert reasons == [None]
    assert len(graph["atoms"]) == len(graph["mass"]) == len(graph["rwse"]) == n_atoms
    assert len(graph["edges"]) == len(graph["bonds"]) == 2 * n_bonds
    edges = {tuple(e) for e in graph["edges"]}
    assert all((j, i) in edges for i, j in edges)  # both directions
    assert np.isfinite(graph["rwse"]).all() and np.isfinite(graph["lap"]).all()


def test_salts_are_rejected_by_default_or_reduced_to_their_largest_fragment():
    (_,), reasons = _graphs(["CC(=O)[O-].[Na+]"])
    assert "2 fragments" in reasons[0]
    (largest,), reasons = _graphs(["CC(=O)[O-].[Na+]"], fragments="largest")
    (acetate,), _ = _graphs(["CC(=O)[O-]"])
    assert reasons == [None] and np.array_equal(largest["atoms"], acetate["atoms"])
    (kept,), _ = _graphs(["CC(=O)[O-].[Na+]"], fragments="keep")
    assert len(kept["atoms"]) == 5


def _write_bad_csv(path: Path) -> None:
    big = "C" * 30
    path.write_text(
        "smiles,activity,toxic\n"
        "CCO,1.5,0\n"  # row 1 ok
        "not_a_smiles,2.0,1\n"  # row 2 invalid
        ",3.0,0\n"  # row 3 empty
        "[Na+].[Cl-],0.1,1\n"  # row 4 salt
        f"{big},0.2,0\n"  # row 5 over the size limit
        "c1ccccc1,abc,1\n"  # row 6 non-numeric label
        "CCN,,1\n"  # row 7 ok, one label missing
        "c1ccccc1O,0.7,\n"
    )  # row 8 ok


def test_bad_rows_are_listed_with_row_and_reason_and_the_rest_is_prepared(tmp_path):
    csv = tmp_path / "bad.csv"
    _write_bad_csv(csv)
    out = tmp_path / "bad.zarr"
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("biofm")),
            "prepare",
            "molecules",
            "--input",
            str(csv),
            "--out",
            str(out),
            "--max-atoms",
            "20",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "prepared 3 molecules; 5 rows rejected" in done.stdout
    rejects = pd.read_csv(rejects_path(str(out)))
    reasons = dict(zip(rejects["row"], rejects["reason"]))
    assert sorted(reasons) == [2, 3, 4, 5, 6]
    assert "invalid SMILES" in reasons[2] and "empty SMILES" in reasons[3] and "2 fragments" in reasons[4]
    assert "30 heavy atoms, over the limit of 20" in reasons[5]
    assert re.search(r"label 'activity' is not a number: 'abc'", reasons[6])
    from biofm.platform.store import Store

    store = Store(str(out))
    assert store.n == 3 and store.tasks == {"activity": {"kind": "regression"}, "toxic": {"kind": "binary"}}
    assert sorted(store.index("sample_id")) == ["row-1", "row-7", "row-8"]
    labels = store.read_rows(0, 3, ["labels/activity", "labels/toxic", "index/sample_id"])
    by_id = {s: (a, t) for s, a, t in zip(labels["index/sample_id"], labels["labels/activity"], labels["labels/toxic"])}
    assert np.isnan(by_id["row-7"][0]) and np.isnan(by_id["row-8"][1]) and by_id["row-1"] == (1.5, 0.0)


def test_sdf_parquet_and_gzip_inputs(tmp_path):
    from rdkit import Chem

    smiles = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "CCCl", "c1ccncc1"]
    sdf = tmp_path / "mols.sdf"
    writer = Chem.SDWriter(str(sdf))
    for i, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s)
        mol.SetProp("potency", str(i / 2))
        writer.write(mol)
    writer.close()
    store, rejected = prepare_molecules(str(sdf), str(tmp_path / "sdf.zarr"), label_columns=["potency"], workers=1)
    assert store.n == 6 and rejected == 0 and store.tasks["potency"]["kind"] == "regression"

    frame = pd.DataFrame({"smiles": smiles, "y": [0, 1, 0, 1, 1, 0]})
    frame.to_parquet(tmp_path / "m.parquet")
    with gzip.open(tmp_path / "m.csv.gz", "wt") as handle:
        frame.to_csv(handle, index=False)
    for name in ("m.parquet", "m.csv.gz"):
        store, _ = prepare_molecules(str(tmp_path / name), str(tmp_path / f"{name}.zarr"), workers=1)
        assert store.n == 6 and store.tasks == {"y": {"kind": "binary"}}


def test_scaffold_split_never_puts_one_scaffold_on_two_sides():
    from rdkit.Chem.Scaffolds import MurckoScaffold

    smiles = (
        [f"c1ccccc1{'C' * k}O" for k in range(1, 30)]
        + [f"C1CCNCC1{'C' * k}" for k in range(1, 20)]
        + [f"c1ccncc1{'C' * k}N" for k in range(1, 12)]
        + ["CCO", "CCN", "CCCl", "CC#N", "OCCO", "CNC"] * 3
    )
    split = scaffold_splits(smiles, seed=1)
    by_scaffold = {}
    for s, part in zip(smiles, split):
        by_scaffold.setdefault(MurckoScaffold.MurckoScaffoldSmiles(smiles=s), set()).add(part)
    assert all(len(parts) == 1 for parts in by_scaffold.values())
    assert (split == "train").mean() >= 0.5 and set(split) <= {"train", "val", "test"}


@needs_mol_data
def test_tox21_missing_cells_stay_missing(tmp_path):
    store, rejected = prepare_molecules(
        str(MOL_DATA / "tox21_subset.csv"), str(tmp_path / "t.zarr"), workers=1, fragments="keep"
    )
    raw = pd.read_csv(MOL_DATA / "tox21_subset.csv")
    assert rejected == len(raw) - store.n
    blank = int(raw.drop(columns=["smiles"]).isna().sum().sum())
    stored = sum(int(np.isnan(store.read_rows(0, store.n, [f"labels/{t}"])[f"labels/{t}"]).sum()) for t in store.tasks)
    assert blank > 0 and stored == blank  # never filled with 0


@needs_mol_data
def test_a_short_fit_on_tox21_subset_and_the_same_molecule_gets_the_same_prediction(tmp_path):
    from biofm.platform.lightning import BiofmDataModule, BiofmModule, Collator
    from biofm.recipes.runs import fit_and_test

    store, _ = prepare_molecules(
        str(MOL_DATA / "tox21_subset.csv"), str(tmp_path / "t.zarr"), workers=1, fragments="keep", seed=0
    )
    metrics = fit_and_test(
        [store.url],
        tmp_path / "run",
        epochs=15,
        batch_size=32,
        loggers=False,
        model={
            "d_model": 64,
            "depth": 1,
            "latents": 4,
            "dropout": 0.0,
            "lr": 2e-3,
            "encoders": {"molecule": {"layers": 3}},
        },
    )
    print({"tox21_subset macro auroc": metrics["macro/auroc"]})
    assert metrics["macro/auroc"] > 0.6

    module = BiofmModule.load_from_checkpoint(
        next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt")), weights_only=True
    )
    module.eval()
    modality = MODALITIES.resolve("molecule").from_config(store.modalities["molecule"])
    arrays = modality.featurise(["CN1CCC[C@H]1c1cccnc1", "c1cncc(c1)[C@@H]1CCCN1C", "CN1CCC[C@@H]1c1cccnc1"])
    batch = Collator(BiofmDataModule([store.url]).schema)({**arrays, "row": np.arange(3), "source": "x"})
    with torch.no_grad():
        logits = module(batch["inputs"])["logits"]["NR-AR"]
    torch.testing.assert_close(logits[0], logits[1])


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["default", "esol", "freesolv", "tox21", "multitask"])
def test_each_molecule_config_composes(name, capsys):
    from biofm.platform.cli import main

    with pytest.raises(SystemExit) as done:
        main(["fit", "-c", str(CONFIGS / "molecules" / f"{name}.yaml"), "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "molecule:" in printed and "schedule: cosine" in printed and "stores:" in printed


def test_the_default_molecule_config_trains_on_any_molecule_store(tmp_path):
    from biofm.platform.cli import main
    from biofm.testing import write_fake_modality_store

    store = write_fake_modality_store(str(tmp_path / "m.zarr"), "molecule", n=120)
    run = tmp_path / "run"
    main(
        [
            "fit",
            "-c",
            str(CONFIGS / "molecules" / "default.yaml"),
            "--data.stores",
            f"[{store.url}]",
            "--trainer.default_root_dir",
            str(run),
            "--trainer.max_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--model.d_model",
            "32",
            "--trainer.logger",
            "false",
        ]
    )
    assert (run / "checkpoints" / "last.ckpt").exists()


def test_label_columns_can_be_renamed_so_sources_do_not_share_a_head(tmp_path):
    csv = tmp_path / "z.csv"
    csv.write_text("SMILES,logp\nCCO,0.1\nCCN,0.2\nCCC,0.3\n")
    store, _ = prepare_molecules(
        str(csv), str(tmp_path / "z.zarr"), smiles_column="SMILES", label_columns=["logp=zinc_logp"], workers=1
    )
    assert list(store.tasks) == ["zinc_logp"]


def test_layer_norm_encoder_has_no_running_statistics_and_a_molecule_does_not_depend_on_its_batch():
    """With `norm: layer` a molecule's atom states are the same whatever else is in its batch, in training
    too (batch norm's are not): sources whose batches differ share one model without mixed statistics."""
    from biofm.platform.lightning import Collator

    modality = MODALITIES.resolve("molecule")()
    encoder = modality.encoder(32, layers=2, norm="layer").train()
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in encoder.modules())
    schema = {"modalities": {"molecule": modality.config()}, "tasks": {}}
    one = Collator(schema)({**modality.featurise(["CCO"]), "row": np.arange(1), "source": "x"})
    two = Collator(schema)({**modality.featurise(["CCO", "c1ccccc1O"]), "row": np.arange(2), "source": "x"})
    a, b = encoder(one["inputs"]["molecule"]), encoder(two["inputs"]["molecule"])
    torch.testing.assert_close(a[0][0, :4], b[0][0, :4])
    batch = modality.encoder(32, layers=2).train()
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in batch.modules())
    with pytest.raises(ValueError, match="norm must be batch or layer"):
        modality.encoder(32, norm="group")
