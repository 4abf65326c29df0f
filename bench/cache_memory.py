"""What the stage cache costs: `rtn` on an 8-layer slice of the MiniCPM4-8B shape (same widths, 73k
vocabulary), once with the stage cache off and once on (an empty cache each time), each in its own process
under /usr/bin/time, after an unmeasured run that leaves the reference statistics cached. Prints JSON: wall time, peak RSS, peak anonymous memory, the cache entry's size.

    python bench/cache_memory.py [--dir out/cache-memory] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import cli, folder_bytes, timed, write_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="out/cache-memory")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=512)
    args = parser.parse_args()
    base = Path(args.dir).resolve()
    ckpt = base / f"minicpm4-8b-shaped-{args.layers}-layers"
    write_checkpoint(ckpt, layers=args.layers)
    results = {"checkpoint": str(ckpt), "layers": args.layers, "bytes_on_disk": folder_bytes(ckpt), "runs": []}
    # a first run computes the reference statistics (kept in the cache folder): not measured, so that both
    # measured runs start alike
    for cache in ("warm-up", "off", "on"):
        store = base / "stage-cache"
        shutil.rmtree(store, ignore_errors=True)
        out = base / f"rtn-cache-{cache}"
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "MINICPM_COMPRESS_PROGRESS": "0",
               "MINICPM_COMPRESS_STAGE_CACHE": str(store) if cache == "on" else "0"}
        run = timed(cli("rtn", "--model", ckpt, "--bits", "4", "--group-size", "32", "--symmetric",
                        "--eval-tokens", args.eval_tokens, "--out", out), env)
        run["stage_cache"] = cache
        run["cache_bytes"] = folder_bytes(store) if store.exists() else 0
        run["output_bytes"] = folder_bytes(out) if out.exists() else 0
        if cache != "warm-up":
            results["runs"].append(run)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
