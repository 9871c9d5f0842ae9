"""megatron_compat's Mamba additions: applied, megatron's mixer uses our dispatcher; reverted, it does not."""

import pytest


def test_mamba_kernels_bound_and_reverted():
    from rlp_dist.distributed import megatron_compat

    if megatron_compat.is_applied():
        pytest.skip("compat already applied in this process by another test")
    import importlib.util

    if importlib.util.find_spec("mamba_ssm") is not None:
        pytest.skip("mamba-ssm installed: megatron binds the real kernels, nothing to patch")
    from rlp_kernels import dispatch

    assert megatron_compat.apply(force=True)
    try:
        from megatron.core.ssm import mamba_mixer

        assert mamba_mixer.HAVE_MAMBA_SSM is True
        assert mamba_mixer.mamba_chunk_scan_combined is dispatch.mamba_chunk_scan_combined
        assert mamba_mixer.selective_state_update is dispatch.selective_state_update
        assert mamba_mixer.causal_conv1d_update is dispatch.causal_conv1d_update
        assert issubclass(mamba_mixer.ExtendedRMSNorm, dispatch.RMSNormGated)
    finally:
        megatron_compat.revert()
    assert mamba_mixer.HAVE_MAMBA_SSM is False
    assert mamba_mixer.selective_state_update is None
    assert getattr(mamba_mixer, "mamba_chunk_scan_combined", None) is None
