"""biofm: one multimodal, multi-task foundation model for biomedical and molecular data."""


def load(path, device=None, which="best", quiet=False):
    """A trained model from a checkpoint or run directory (its best checkpoint by validation; `which="last"`
    for the last state): `biofm.load(path).predict(smiles=[…])`."""
    from biofm.platform.sdk import load as _load

    return _load(path, device, which, quiet)
