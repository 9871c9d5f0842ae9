import argparse
import importlib
import json
import pathlib
import sys


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m rlp_dist.bench")
    p.add_argument("name", help="benchmark module under rlp_dist.bench (e.g. ema, rollout, sampling, prepare)")
    p.add_argument("--json", dest="json_out", default=None, help="write the result here")
    args, rest = p.parse_known_args()
    try:
        mod = importlib.import_module(f"rlp_dist.bench.{args.name.replace('-', '_')}")
    except ModuleNotFoundError:
        found = sorted(x.stem for x in pathlib.Path(__file__).parent.glob("*.py") if not x.stem.startswith("_"))
        print(f"unknown benchmark {args.name!r}; available: {', '.join(found)}", file=sys.stderr)
        return 2
    result = mod.main(rest)
    text = json.dumps(result, indent=2)
    if args.json_out:
        pathlib.Path(args.json_out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
