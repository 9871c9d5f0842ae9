"""rlp-dist: RLP (reinforcement as a pretraining objective) on megatron-core + DeepSpeed."""

__version__ = "0.1.0"
