"""Every registered modality: prepare → store → stream → collate → encode → checkpoint round trip."""

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from biofm.platform.checkpoint import SafeCheckpointIO, safe_load
from biofm.platform.lightning import BiofmDataModule, BiofmModule, Collator
from biofm.platform.modality import MODALITIES
from biofm.platform.registry import RegistryError
from biofm.platform.stream import StoreStream, StreamLoader
from biofm.testing import fake_raw, write_fake_modality_store


@pytest.mark.parametrize("name", MODALITIES.names())
def test_each_modality_prepares_streams_collates_and_encodes(tmp_path, name):
    store = write_fake_modality_store(str(tmp_path / "s.zarr"), name, n=60)
    assert name in store.modalities and store.modalities[name]["version"] >= 1
    raw = fake_raw(name, 60)
    present_in = {f"F{i}": r is not None for i, r in enumerate(raw)}
    schema = BiofmDataModule([store.url]).schema
    stream = StoreStream(store, split=None, batch_size=16, shuffle=False, arrays=store.arrays_of(name),
                         with_ids=True, transform=Collator(schema, with_ids=True))
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
    trainer = Trainer(max_steps=3, limit_val_batches=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, plugins=[SafeCheckpointIO()])
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
    with pytest.raises(RegistryError, match=r"could not resolve modality 'retina' among choices \[.*'tabular', 'text'.*\]"):
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

    from biofm.modalities.text import SPECIAL_TOKENS, train_wordpiece
    texts = ["margins clear", "margins involved", "nodes free", "necrosis present", "mild atypia"] * 30 + \
        [f"specimen {w}" for w in ("alpha", "alpine", "altar", "alter")] * 3
    shuffled = random.Random(1).sample(texts, len(texts))
    first, again = train_wordpiece(texts, vocab_size=200), train_wordpiece(shuffled, vocab_size=200)
    # ties between equally frequent pairs abound here; the same corpus in any order gives the same ids
    assert first.to_str() == again.to_str()
    vocab = first.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for word in ("margins", "necrosis", "atypia"):  # frequent: one token each
        assert first.encode(word).tokens == [word]
    assert 40 < len(vocab) < 200  # merges ran out before the budget: every pair seen twice got merged
