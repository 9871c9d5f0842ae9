"""Entry point: `deepspeed launch/pretrain.py +model=NAME [overrides]` (also torchrun or python).

The deepspeed launcher appends `--local_rank=N` to argv; Hydra would reject it, so it is removed
here (LOCAL_RANK is in the environment as well). Every rank composes the same config and writes to
the same run.dir.
"""

import os
import sys

# First thing, before the seconds of torch/DeepSpeed imports: a SIGUSR1/SIGTERM from SLURM or the user
# is recorded (the run stops after its first step boundary with a checkpoint) instead of killing us.
from rlp_dist.ops import preemption  # noqa: E402 - stdlib-only import

preemption.install()


def _strip_launcher_args(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(a)
    return out


sys.argv = _strip_launcher_args(sys.argv)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import warnings  # noqa: E402

# Known, harmless notices from the stack on every rank (CPU fallbacks, deprecations inside
# DeepSpeed's collectives); real warnings still show.
for _msg in ("Apex is not installed", "Transformer Engine and Apex are not installed", "full scope is deprecated",
             r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"):
    warnings.filterwarnings("ignore", message=_msg)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from rlp_dist.config import CONF_DIR, ConfigError, from_hydra  # noqa: E402


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(hcfg: DictConfig) -> None:
    try:
        cfg = from_hydra(hcfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    from rlp_dist.train import main as train_main

    try:
        train_main(cfg)
    except (ConfigError, FileNotFoundError) as e:
        # User-facing errors: one line, no traceback noise from every rank.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
