"""biofm: one multimodal, multi-task foundation model for biomedical and molecular data."""


def load(path, device=None, which="best", quiet=False):
    """A trained model from a checkpoint or run directory (its best checkpoint by validation; `which="last"`
    for the last state): `biofm.load(path).predict(smiles=[…])`."""
    from biofm.platform.sdk import load as _load

    return _load(path, device, which, quiet)


def merge(models, base=None, method="ties", out=None, **options):
    """One multi-task model from checkpoints fine-tuned from `base`: `biofm.merge(["a.ckpt", "b.ckpt"],
    base="pretrained.ckpt", method="ties", out="merged.ckpt")`; returns a summary (see biofm.platform.merge)."""
    from biofm.platform.merge import merge as _merge

    return _merge(models, base=base, method=method, out=out, **options)
