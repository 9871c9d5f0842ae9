"""Run launch/pretrain.py with a crash injected into a checkpoint write (for test_preempt_resume).

    torchrun ... tests/ops/crash_during_save.py --crash-in step_00000004.tmp --crash-rank 1 -- OVERRIDES

On rank ``--crash-rank``, the first DeepSpeed file (``*model_states.pt``/``*optim_states.pt``) that is
being saved under a folder named in ``--crash-in`` (comma-separated) gets half of its bytes written, then the process
dies with ``os._exit`` — no exception handling, no cleanup, like a node failure mid-write.
"""

import argparse
import io
import os
import pathlib
import runpy
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _install_crash(folders: set, rank: int) -> None:
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        path = str(f) if isinstance(f, (str, os.PathLike)) else ""
        if (int(os.environ.get("RANK", "0")) == rank and pathlib.Path(path).parent.name in folders
                and path.endswith("_states.pt")):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            with open(path, "wb") as fh:
                fh.write(data[: len(data) // 2])
            os.write(2, f"crash injected while writing {path}\n".encode())
            os._exit(17)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crash-in", required=True)
    ap.add_argument("--crash-rank", type=int, default=0)
    argv = sys.argv[1:]
    split = argv.index("--")
    args = ap.parse_args(argv[:split])
    _install_crash(set(args.crash_in.split(",")), args.crash_rank)
    script = str(ROOT / "launch" / "pretrain.py")
    sys.argv = [script, *argv[split + 1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
