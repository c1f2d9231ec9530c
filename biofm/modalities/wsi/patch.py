"""Patch encoders: tiles → feature vectors, run once during prepare.

`default` is a compact MONAI ResNet (one basic block per stage, 32–256 channels, stride-4 stem; 256
features) with a fixed seeded initialisation: it needs no download, and its random convolutional
features carry colour and texture. For real work plug a pretrained pathology encoder (UNI, CONCH, …) as
`package.module:factory` (a callable returning an `nn.Module` that maps normalised [B, 3, H, W] tiles to
[B, D]) with `--patch-weights` (a local state-dict file, read with `weights_only=True`). The weights'
checksum is stored with the settings, so inference refuses a different encoder than the store's.
`none` computes no features (tile coordinates, tissue and, with `store_tiles`, raw tiles only).
"""

from __future__ import annotations

import hashlib
import importlib

import numpy as np
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_network() -> nn.Module:
    from monai.networks.nets import ResNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ResNet(
            block="basic",
            layers=[1, 1, 1, 1],
            block_inplanes=[32, 64, 128, 256],
            spatial_dims=2,
            n_input_channels=3,
            conv1_t_stride=4,
            feed_forward=False,
        )


class NoFeatures(nn.Module):
    """`none`: no patch features (a store of tile coordinates, tissue and raw tiles, for end-to-end use)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], 0)


def build_network(spec: str = "default", weights: str | None = None) -> nn.Module:
    """The patch network named by `spec` ("default", "none" or "package.module:factory"), with `weights`."""
    if spec == "none":
        return NoFeatures()
    if spec == "default":
        network = default_network()
    else:
        module_name, _, factory = spec.partition(":")
        if not factory:
            raise ValueError(f"patch encoder {spec!r}: expected 'default' or 'package.module:factory'")
        try:
            network = getattr(importlib.import_module(module_name), factory)()
        except (ImportError, AttributeError) as err:
            raise ValueError(f"patch encoder {spec!r} cannot be imported: {err}") from None
        if not isinstance(network, nn.Module):
            raise ValueError(f"patch encoder {spec!r} returned {type(network).__name__}, not a torch module")
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = network.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(
                f"patch weights {weights}: {len(missing)} parameters of the network are not in "
                f"the file (first: {missing[0]}); is it the weights of {spec!r}?"
            )
    return network.eval()


def checksum(network: nn.Module) -> str:
    """A short digest of the network's parameters and buffers, to tell encoders apart."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class PatchEncoder:
    """Runs a patch network on uint8 tiles [T, H, W, 3] in batches; returns float16 features [T, D]."""

    def __init__(
        self, network: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size: int = 64, device: str | None = None
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.network = network.to(self.device).eval()
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255.0
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        if isinstance(self.network, NoFeatures):
            return np.zeros((len(tiles), 0), np.float16)
        out = []
        for start in range(0, len(tiles), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(tiles[start : start + self.batch_size])).to(self.device)
            x = (x.permute(0, 3, 1, 2).float() - self.mean) / self.std
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                features = self.network(x)
            out.append(features.float().flatten(1).cpu().numpy().astype(np.float16))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float16)

    @property
    def dim(self) -> int:
        with torch.no_grad():
            return int(self.network(torch.zeros(1, 3, 64, 64, device=self.device)).flatten(1).shape[1])
