"""biofm: one multimodal, multi-task foundation model for biomedical and molecular data."""


def load(path, device=None):
    """A trained model from a checkpoint or run directory: `biofm.load(path).predict(smiles=[…])`."""
    from biofm.platform.sdk import load as _load
    return _load(path, device)
