"""Rank/world/master address from torchrun, deepspeed or SLURM variables."""

from rlp_dist.distributed import parallel


def test_rank_info_precedence(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    assert parallel.env_rank_info() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert parallel.env_rank_info() == (5, 8, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert parallel.env_rank_info() == (2, 4, 0)  # a launcher's variables win over SLURM's


def test_master_address_override(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    monkeypatch.delenv("RLP_MASTER_ADDR", raising=False)
    assert parallel.master_address() == "127.0.0.1"
    monkeypatch.setenv("MASTER_ADDR", "node-a")
    assert parallel.master_address() == "node-a"
    monkeypatch.setenv("RLP_MASTER_ADDR", "10.1.2.3")
    assert parallel.master_address() == "10.1.2.3"
