"""int4 methods side by side: RTN, AWQ, GPTQ, GPTQ + act-order, AWQ then GPTQ — and llm-compressor's AWQ and GPTQ.

    .venv/bin/python bench/int4_methods.py [--eval-tokens 8192] [--calibration-samples 32] \
        [--models smollm2-135m,minicpm-smollm2] [--settings w4-g128-asym,w4-g128-sym,w4-g32-sym] \
        [--llmcompressor-settings ...] [--llmcompressor-timeout 1800] > int4-methods.json

Every method runs in its own process (wall time of the compression itself, and the process's peak RSS next to
a process that only loads the model, its reference statistics and the calibration data), on the same
calibration samples and measured by the same evaluator on the same held-out windows.

llm-compressor runs from a throwaway virtual environment this benchmark creates under .cache/bench/
(llmcompressor 0.14 pins transformers 5.15-5.17; torch is the same local CPU wheel). Its quantized weights are
written back as a float checkpoint and measured by this package's evaluator (bench/llmcompressor_run.py).
GPTQModel (`--gptqmodel-models`, at the llm-compressor settings) likewise, from its own throwaway environment
(bench/gptqmodel_run.py: its GPTQ checkpoint is read back by GPTQModel and dequantized).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "w4-g128-asym": {"bits": 4, "group_size": 128, "symmetric": False},
    "w4-g128-sym": {"bits": 4, "group_size": 128, "symmetric": True},
    "w4-g32-sym": {"bits": 4, "group_size": 32, "symmetric": True},
}
METHODS = {
    "rtn": [("rtn", {})],
    "awq": [("awq", {})],
    "gptq": [("gptq", {})],
    "gptq-act-order": [("gptq", {"act_order": True})],
    "awq+gptq": [("awq", {}), ("gptq", {})],
    "awq+gptq-act-order": [("awq", {}), ("gptq", {"act_order": True})],  # not run by default
    # the scale searches (quant/scale_search.py), not run by default
    "awq-no-clip": [("awq", {"clip": False})],
    "awq-search-weighted": [("awq", {"search": "weighted"})],
    "awq-search-both": [("awq", {"search": "both"})],
    "gptq-search-both": [("gptq", {"search": "both"})],
}
DEFAULT_METHODS = ("rtn", "awq", "gptq", "gptq-act-order", "awq+gptq")
MODELS = ("smollm2-135m", "minicpm-smollm2")
LLMC_VENV = ROOT / ".cache/bench/llmc-venv"
LLMC_REQUIREMENTS = ("llmcompressor==0.14.0.1", "transformers>=5.15,<5.18")
GPTQMODEL_VENV = ROOT / ".cache/bench/gptqmodel-venv"
GPTQMODEL = "gptqmodel==7.7.0"


def _peak_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _recipe(model: str, setting: str, method: str | None, args):
    from minicpm_compress.recipe import build_recipe

    stages = [{name: {**SETTINGS[setting], **extra}} for name, extra in METHODS[method]] if method else ["load"]
    data = {"calibration_samples": args.calibration_samples, "eval_tokens": args.eval_tokens}
    return build_recipe(model=model, data=data, seed=0, stages=stages)


def one(model: str, setting: str, method: str | None, args) -> dict:
    """In a child process: load (reference statistics cached), run the method's stages, measure."""
    from minicpm_compress.stages import STAGES, RunContext

    recipe = _recipe(model, setting, method, args)
    ctx = RunContext(recipe)
    stages = recipe.stage_list()
    state = STAGES["load"].handler(stages[0][1], None, ctx).state
    if method is None:  # the baseline: what loading, the evaluator and the calibration data cost
        ctx.calibration(state)
        return {"peak_rss_mib": _peak_mib()}
    start = time.perf_counter()
    for name, config in stages[1:]:
        state = STAGES[name].handler(config, state, ctx).state
    wall = time.perf_counter() - start
    metrics = ctx.evaluator.measure(state).as_dict()
    return {**metrics, "wall_s": round(wall, 1), "peak_rss_mib": _peak_mib()}


def _child(*extra, timeout: float | None = None) -> dict:
    cmd = [sys.executable, __file__, *extra]
    env = {**os.environ, "MINICPM_COMPRESS_PROGRESS": "0"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, timeout=timeout).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- llm-compressor ---------------------------------------------------------------------------------

def _llmc_python() -> Path:
    python = LLMC_VENV / "bin/python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the local CPU wheel, never a CUDA build
        constraints = LLMC_VENV / "constraints.txt"
        constraints.write_text("torch==2.13.0\n")
        subprocess.run([*pip, "-c", str(constraints), *LLMC_REQUIREMENTS], check=True)
    return python


def _gptqmodel_python() -> Path:
    """GPTQModel 7.7 asks for torch >= 2.14.1 but quantizes on the local torch 2.13 CPU wheel: its requirements
    are installed without the torch line, then the package itself without dependencies."""
    python = GPTQMODEL_VENV / "bin/python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(GPTQMODEL_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([str(python), "-m", "pip", "download", "-q", "--no-deps", GPTQMODEL, "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("*.tar.gz"))
            with tarfile.open(sdist) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith("/requirements.txt"))
                lines = tar.extractfile(member).read().decode().splitlines()
            requirements = Path(tmp) / "requirements.txt"
            requirements.write_text("\n".join(line for line in lines if not line.startswith("torch>")) + "\n")
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text("torch==2.13.0\n")
            subprocess.run([*pip, "-c", str(constraints), "-r", str(requirements)], check=True)
            subprocess.run([*pip, "--no-deps", str(sdist)], check=True)
    return python


def gptqmodel(model: str, setting: str, args) -> dict:
    """GPTQModel's GPTQ (no act-order) on the same calibration ids, its checkpoint read back and measured."""
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": str(os.cpu_count())}
    return _external(model, setting, args, _gptqmodel_python(), "gptqmodel_run.py", [], env)


def _calibration_file(model: str, args, path: Path) -> None:
    """The calibration token ids the package's stages use, for llm-compressor and GPTQModel."""
    from safetensors.torch import save_file

    from minicpm_compress.data.textsets import calibration_samples
    from minicpm_compress.builtin import builtin_path
    from minicpm_compress.models.checkpoint import load_tokenizer

    recipe = _recipe(model, "w4-g128-asym", None, args)
    d = recipe.data
    ids = calibration_samples(load_tokenizer(builtin_path(model)), d.calibration_sources(), d.calibration_samples,
                              d.sequence_length, recipe.seed)
    save_file({"input_ids": ids.contiguous()}, str(path))


def llmcompressor(model: str, setting: str, method: str, args) -> dict:
    return _external(model, setting, args, _llmc_python(), "llmcompressor_run.py", [method])


def _external(model: str, setting: str, args, python: Path, script: str, extra: list[str], env=None) -> dict:
    """Another tool's method, run by bench/SCRIPT in its own environment on this package's calibration ids
    (SCRIPT CHECKPOINT CALIBRATION OUT *EXTRA BITS GROUP sym|asym), its float checkpoint then measured here."""
    from minicpm_compress.builtin import builtin_path

    s = SETTINGS[setting]
    with tempfile.TemporaryDirectory(prefix=f"{Path(script).stem}-", dir=ROOT / ".cache/bench") as tmp:
        tmp = Path(tmp)
        _calibration_file(model, args, tmp / "calibration.safetensors")
        cmd = [str(python), str(ROOT / "bench" / script), str(builtin_path(model)),
               str(tmp / "calibration.safetensors"), str(tmp / "model"), *extra, str(s["bits"]), str(s["group_size"]),
               "sym" if s["symmetric"] else "asym"]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.llmcompressor_timeout, env=env,
                                 cwd=tmp)
        except subprocess.TimeoutExpired:
            return {"error": f"did not finish within {args.llmcompressor_timeout} s on this machine"}
        if run.returncode:
            return {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"}
        result = json.loads(run.stdout.strip().splitlines()[-1])
        measured = _child("--measure", model, str(tmp / "model"), "--eval-tokens", str(args.eval_tokens))
        return {**measured, **result}


def measure_checkpoint(model: str, folder: str, args) -> dict:
    """In a child process: a float checkpoint measured against the built-in model by the package's evaluator."""
    from minicpm_compress.recipe import build_recipe
    from minicpm_compress.stages import STAGES, RunContext

    recipe = build_recipe(model=folder, reference=model, data={"eval_tokens": args.eval_tokens}, stages=["load"])
    ctx = RunContext(recipe)
    state = STAGES["load"].handler(recipe.stage_list()[0][1], None, ctx).state
    return ctx.evaluator.measure(state).as_dict()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--llmcompressor-settings", default=",".join(SETTINGS),
                        help="settings llm-compressor runs at ('' for none)")
    parser.add_argument("--llmcompressor-models", default="smollm2-135m",
                        help="models llm-compressor runs on (minicpm-smollm2 loads too: bench/llmcompressor_run.py "
                             "registers this package's MiniCPM class)")
    parser.add_argument("--llmcompressor-timeout", type=float, default=1800,
                        help="seconds each llm-compressor or GPTQModel method may take")
    parser.add_argument("--gptqmodel-models", default="", help="models GPTQModel's GPTQ runs on ('' for none)")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "SETTING", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        model, setting, method = args.one
        print(json.dumps(one(model, setting, None if method == "baseline" else method, args)))
        return
    if args.measure:
        print(json.dumps(measure_checkpoint(*args.measure, args)))
        return

    common = ["--eval-tokens", str(args.eval_tokens), "--calibration-samples", str(args.calibration_samples)]
    results = {"machine": f"{os.cpu_count()} CPUs, no GPU", "eval_tokens": args.eval_tokens,
               "calibration": f"{args.calibration_samples} x 512 tokens", "models": {}}
    for model in args.models.split(","):
        entry = {"baseline_peak_rss_mib": _child("--one", model, "w4-g128-asym", "baseline", *common)["peak_rss_mib"]}
        for setting in args.settings.split(","):
            rows = {}
            for m in args.methods.split(","):
                rows[m] = _child("--one", model, setting, m, *common)
                print(json.dumps({"model": model, "setting": setting, "method": m, **rows[m]}), file=sys.stderr, flush=True)
            if setting in args.llmcompressor_settings.split(",") and model in args.llmcompressor_models.split(","):
                for method in ("awq", "gptq"):
                    rows[f"llm-compressor {method}"] = llmcompressor(model, setting, method, args)
                    print(json.dumps({"model": model, "setting": setting, "method": f"llm-compressor {method}",
                                      **rows[f"llm-compressor {method}"]}), file=sys.stderr, flush=True)
            if setting in args.llmcompressor_settings.split(",") and model in args.gptqmodel_models.split(","):
                rows["gptqmodel gptq"] = gptqmodel(model, setting, args)
                print(json.dumps({"model": model, "setting": setting, "method": "gptqmodel gptq",
                                  **rows["gptqmodel gptq"]}), file=sys.stderr, flush=True)
            rtn_gap = rows["rtn"]["ppl_increase"] if "rtn" in rows else None
            for row in rows.values():
                if rtn_gap and "ppl_increase" in row:
                    row["removes_of_rtn_increase"] = round(1 - row["ppl_increase"] / rtn_gap, 4)
            entry[setting] = rows
            # every row in full as it completes: a run stopped early keeps what it measured
            print(json.dumps({"model": model, "setting": setting, "rows": rows}), file=sys.stderr, flush=True)
        results["models"][model] = entry
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
