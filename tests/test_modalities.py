"""Every registered modality: prepare → store → stream → collate → encode → checkpoint round trip."""

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from biofm.platform.checkpoint import SafeCheckpointIO, safe_load
from biofm.platform.lightning import BiofmDataModule, BiofmModule, Collator
from biofm.platform.modality import MODALITIES
from biofm.platform.stream import StoreStream, StreamLoader
from biofm.registry import RegistryError
from biofm.testing import fake_raw, write_fake_modality_store


@pytest.mark.parametrize("name", MODALITIES.names())
def test_each_modality_prepares_streams_collates_and_encodes(tmp_path, name):
    store = write_fake_modality_store(str(tmp_path / "s.zarr"), name, n=60)
    assert name in store.modalities and store.modalities[name]["version"] >= 1
    raw = fake_raw(name, 60)
    present_in = {f"F{i}": r is not None for i, r in enumerate(raw)}
    schema = BiofmDataModule([store.url]).schema
    stream = StoreStream(
        store,
        split=None,
        batch_size=16,
        shuffle=False,
        arrays=store.arrays_of(name),
        with_ids=True,
        transform=Collator(schema, with_ids=True),
    )
    encoder = MODALITIES.resolve(name).from_config(store.modalities[name]).encoder(16)
    seen = 0
    for batch in StreamLoader(stream):
        inputs = batch["inputs"][name]
        assert [present_in[s] for s in batch["sample_id"]] == inputs["present"].tolist()
        x, mask = encoder(inputs)
        assert x.shape[0] == mask.shape[0] == len(batch["row"]) and x.shape[2] == 16
        assert mask.shape == x.shape[:2] and mask.dtype == torch.bool
        assert torch.isfinite(x).all()
        seen += len(batch["row"])
    assert seen == 60


@pytest.mark.parametrize("name", MODALITIES.names())
def test_each_modality_featurises_the_same_after_its_config_round_trip(name):
    raw = fake_raw(name, 30, seed=1)
    fitted = MODALITIES.resolve(name)()
    fitted.fit(raw)
    rebuilt = MODALITIES.resolve(name).from_config(fitted.config())
    a, b = fitted.featurise(raw), rebuilt.featurise(raw)
    assert sorted(a) == sorted(b)
    for key in a:
        va, vb = (a[key].values, b[key].values) if hasattr(a[key], "offsets") else (a[key], b[key])
        np.testing.assert_array_equal(va, vb)


@pytest.mark.parametrize("name", MODALITIES.names())
def test_each_modality_round_trips_through_a_checkpoint(tmp_path, name):
    store = write_fake_modality_store(str(tmp_path / "s.zarr"), name, n=80)
    data = BiofmDataModule([store.url], batch_size=16)
    module = BiofmModule(data.schema, d_model=16, depth=1, heads=2, latents=2)
    trainer = Trainer(
        max_steps=3,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        plugins=[SafeCheckpointIO()],
    )
    trainer.fit(module, datamodule=data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = safe_load(path)  # weights_only: plain values and tensors only
    assert checkpoint["hyper_parameters"]["schema"]["modalities"][name] == store.modalities[name]
    rebuilt = BiofmModule(**checkpoint["hyper_parameters"])
    rebuilt.load_state_dict(checkpoint["state_dict"])
    batch = next(iter(data.test_dataloader()))
    module.eval(), rebuilt.eval()
    with torch.no_grad():
        a, b = module(batch["inputs"]), rebuilt(batch["inputs"])
    torch.testing.assert_close(a["logits"]["flag"], b["logits"]["flag"])


def test_an_unknown_modality_names_the_choices():
    with pytest.raises(
        RegistryError, match=r"could not resolve modality 'retina' among choices \[.*'tabular', 'text'.*\]"
    ):
        MODALITIES.resolve("retina")


def test_tabular_missing_cells_and_unknown_categories_are_handled():
    tabular = MODALITIES.resolve("tabular")()
    tabular.fit([{"age": 50.0, "stage": "I"}, {"age": 70.0, "stage": "II"}, None])
    assert tabular.settings["numeric"]["age"][0] == pytest.approx(60.0)
    assert tabular.settings["categorical"]["stage"] == ["I", "II"]
    arrays = tabular.featurise([{"age": float("nan"), "stage": "IV"}, {"age": 60.0, "stage": "II"}, None])
    assert np.isnan(arrays["tabular/numeric"][0, 0]) and arrays["tabular/numeric"][1, 0] == 0.0
    assert arrays["tabular/categorical"][:, 0].tolist() == [0, 2, 0]  # unknown and missing → code 0
    assert arrays["tabular/present"].tolist() == [True, True, False]
    encoder = tabular.encoder(8)
    x, mask = encoder(tabular.collate({k.split("/")[1]: v for k, v in arrays.items() if k != "tabular/present"}))
    assert x.shape == (3, 2, 8) and mask.all()
    # a missing number gets the learned missing embedding, not the embedding of the mean (0)
    assert not torch.allclose(x[0, 0], x[1, 0])


def test_text_tokenizer_is_trained_locally_and_truncates():
    text = MODALITIES.resolve("text")(max_length=5, vocab_size=200)
    text.fit(["the margins are clear and the nodes are free"] * 5)
    tokens = text.featurise(["the margins are clear and the nodes are free", None, ""])["text/token_ids"]
    assert tokens.lengths().tolist() == [5, 0, 0]
    assert text.settings["vocab_size"] == text.tokenizer.get_vocab_size() < 200


def test_wordpiece_vocabularies_are_deterministic_and_keep_frequent_words_whole():
    import random

    from biofm.modalities.text.tokenizer import SPECIAL_TOKENS, train_wordpiece

    texts = ["margins clear", "margins involved", "nodes free", "necrosis present", "mild atypia"] * 30 + [
        f"specimen {w}" for w in ("alpha", "alpine", "altar", "alter")
    ] * 3
    shuffled = random.Random(1).sample(texts, len(texts))
    first, again = train_wordpiece(texts, vocab_size=200), train_wordpiece(shuffled, vocab_size=200)
    # ties between equally frequent pairs abound here; the same corpus in any order gives the same ids
    assert first.to_str() == again.to_str()
    vocab = first.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for word in ("margins", "necrosis", "atypia"):  # frequent: one token each
        assert first.encode(word).tokens == [word]
    assert 40 < len(vocab) < 200  # merges ran out before the budget: every pair seen twice got merged


@pytest.mark.parametrize("name", MODALITIES.names())
def test_each_modality_goes_from_raw_input_to_the_predictions_of_its_trained_model(tmp_path, name):
    """raw → prepare (a store) → fit → `biofm.load` → `predict(<its keyword>=raw)`: the SDK, featurising the
    raw inputs itself, predicts what the trained model predicted from the store; samples without an input
    get an error and no prediction."""
    import pandas as pd

    import biofm
    from biofm.recipes.runs import fit_and_test

    store = write_fake_modality_store(str(tmp_path / "s.zarr"), name, n=60)
    run = tmp_path / "run"
    fit_and_test(
        [store.url],
        run,
        epochs=1,
        batch_size=16,
        loggers=False,
        predict=True,
        model={"d_model": 16, "depth": 1, "heads": 2, "latents": 2},
    )
    model = biofm.load(run, quiet=True)
    keyword = MODALITIES.resolve(name).keyword()
    assert model.inputs == {keyword: name}
    raw = fake_raw(name, 60)
    written = pd.read_parquet(run / "predictions.parquet").set_index("sample_id")
    ids = [f"F{i}" for i in range(60)]
    ours = model.predict(**{keyword: raw}, ids=ids).set_index("sample_id")
    absent = [i for i, r in zip(ids, raw) if r is None]
    assert absent and ours.loc[absent, "error"].notna().all() and ours.loc[absent, "flag/prob/1"].isna().all()
    both = [i for i in written.index if i not in absent]
    assert len(both) >= 3
    np.testing.assert_allclose(
        ours.loc[both, "flag/prob/1"].to_numpy(float),
        written.loc[both, "flag/prob/1"].to_numpy(float),
        rtol=1e-4,
        atol=1e-5,
    )


def test_a_new_modality_defined_in_one_file_runs_end_to_end(tmp_path):
    """A fifth kind of input, written here in a few lines (a 1-D signal: numbers per sample), registered, then
    prepared, trained, loaded and predicted through the SDK and predict-cohort, with no other file changed."""
    import pandas as pd
    from torch import nn

    import biofm
    from biofm.platform.cohort import predict_cohort
    from biofm.platform.modality import Modality
    from biofm.platform.store import Ragged, StoreWriter
    from biofm.recipes.runs import fit_and_test

    class SignalEncoder(nn.Module):
        def __init__(self, d_model):
            super().__init__()
            self.value = nn.Linear(1, d_model)

        def forward(self, batch):
            return self.value(batch["values"].unsqueeze(-1)), batch["mask"]

    class Signal(Modality):
        argument, column = "signal", "signal"

        def featurise(self, raw):
            rows = [
                np.array(r.split() if isinstance(r, str) else r, dtype=np.float32)
                if r is not None
                else np.zeros(0, np.float32)
                for r in raw
            ]
            return self.prefixed(
                {"values": Ragged.from_list(rows, dtype=np.float32), "present": self.present_mask(raw)}
            )

        def collate(self, arrays):
            values: Ragged = arrays["values"]
            lengths = values.lengths()
            mask = np.arange(max(int(lengths.max()), 1))[None, :] < lengths[:, None]
            padded = np.zeros(mask.shape, np.float32)
            padded[mask] = values.values
            return {"values": torch.from_numpy(padded), "mask": torch.from_numpy(mask)}

        def encoder(self, d_model):
            return SignalEncoder(d_model)

        @classmethod
        def example_raw(cls, n, seed=0):
            rng = np.random.default_rng(seed)
            return [" ".join(f"{v:.3f}" for v in rng.normal(i % 2, 1.0, 8)) if i % 9 != 8 else None for i in range(n)]

    MODALITIES.register("signal")(Signal)
    try:
        n = 240
        raw = Signal.example_raw(n)
        flag = (np.arange(n) % 2).astype(np.float32)  # the signal's mean is 1 for odd rows, 0 for even ones
        writer = StoreWriter(
            str(tmp_path / "signal.zarr"),
            source="signals",
            modalities={"signal": Signal().config()},
            tasks={"flag": {"kind": "binary"}},
            seed=0,
        )
        writer.write_batch(
            0,
            sample_id=[f"S{i}" for i in range(n)],
            subject_id=[f"P{i}" for i in range(n)],
            labels={"flag": flag},
            arrays=Signal().featurise(raw),
        )
        store = writer.finalize()
        metrics = fit_and_test(
            [store.url],
            tmp_path / "run",
            epochs=6,
            batch_size=32,
            loggers=False,
            model={"d_model": 16, "depth": 1, "heads": 2, "latents": 2, "lr": 5e-3},
        )
        assert metrics["flag/auroc"] > 0.9  # it learned from the new input
        model = biofm.load(tmp_path / "run", quiet=True)
        assert model.inputs == {"signal": "signal"}
        sdk = model.predict(signal=raw, ids=[f"S{i}" for i in range(n)])
        assert sdk["error"].notna().sum() == sum(r is None for r in raw)
        manifest = tmp_path / "cohort.csv"
        pd.DataFrame({"sample_id": [f"S{i}" for i in range(n)], "signal": raw}).to_csv(manifest, index=False)
        summary = predict_cohort(str(tmp_path / "run"), str(manifest), str(tmp_path / "cohort"), progress=False)
        assert summary["predicted"] == n - sum(r is None for r in raw)
        cohort = pd.read_parquet(tmp_path / "cohort" / "predictions.parquet")
        np.testing.assert_allclose(
            cohort["flag/prob/1"].to_numpy(float), sdk["flag/prob/1"].to_numpy(float), rtol=1e-5, atol=1e-6
        )
    finally:
        MODALITIES._entries.pop("signal", None)
