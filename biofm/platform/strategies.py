"""Training strategies for biofm models beyond Lightning's defaults."""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy


class BiofmFSDP(FSDPStrategy):
    """Fully sharded data parallel for GPUs (`configs/trainer/fsdp-gpu.yaml`, bf16): every transformer
    `Block` (trunk, resamplers, pretext decoders) is its own FSDP unit, the rest (encoders' own layers,
    embeddings, heads) shards at the root; checkpoints are saved whole (`state_dict_type="full"`), so the
    SDK, fine-tuning and `biofm predict` read them like any other. `activation_checkpointing` recomputes
    the blocks' activations in the backward pass (less memory, about a third more compute).
    PCGrad balancing needs DDP (it takes per-task gradients of unsharded parameters)."""

    def __init__(self, activation_checkpointing: bool = False, sharding_strategy: str = "FULL_SHARD", **kwargs):
        from biofm.platform.model import Block

        super().__init__(
            auto_wrap_policy={Block},
            sharding_strategy=sharding_strategy,
            state_dict_type="full",
            activation_checkpointing_policy={Block} if activation_checkpointing else None,
            **kwargs,
        )
