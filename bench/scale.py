"""Scale: every command on a checkpoint shaped exactly like MiniCPM4-8B, with peak RSS, wall time, output size.

    .venv/bin/python bench/scale.py [--dir out/scale] [--eval-tokens 512] [--awq-layers 2] > scale.json
    .venv/bin/python bench/scale.py --only-135m --old-tree /path/to/a/checkout/of/the/previous/version

The checkpoint (32 layers, hidden 4096, FFN 16384, 32 heads / 2 KV heads, vocabulary 73,448, untied head,
MiniCPM muP constants, bf16, seeded random weights, one shard per layer: 16 GB) is written once into
--dir. Its tokenizer is the built-in model's (49,152 tokens, all valid ids here). Random weights make
perplexities meaningless; what this measures is memory, time and size. Each command runs in its own
process under /usr/bin/time -v (peak RSS of the process, llama.cpp included since it runs in-process).
AWQ runs on a slice of the same checkpoint (its first --awq-layers layers, same shapes) so its
seconds per layer can be extrapolated to a full run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=4096, intermediate_size=16384, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=2, vocab_size=73448)
TARGET_RSS = lambda float32_bytes: 0.25 * float32_bytes + 2 * 2**30  # noqa: E731 - the issue's target


def write_checkpoint(folder: Path, seed: int = 0, layers: int | None = None) -> dict:
    """The MiniCPM4-8B-shaped bf16 checkpoint, one safetensors shard per layer (plus one for the rest); with
    `layers`, only that many decoder layers (same shapes)."""
    import torch
    from safetensors.torch import save_file

    from minicpm_compress.builtin import builtin_path
    from minicpm_compress.models.checkpoint import config_dict, load_tokenizer
    from minicpm_compress.models.minicpm import MiniCPMConfig
    from minicpm_compress.state import build_skeleton
    from minicpm_compress.models.architectures import architecture_of

    config = MiniCPMConfig(**(SHAPE | ({"num_hidden_layers": layers} if layers else {})), scale_emb=12.0, scale_depth=1.4, dim_model_base=256, tie_word_embeddings=False,
                           max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0,
                           bos_token_id=1, eos_token_id=2, head_dim=128)
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text())
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    skeleton = build_skeleton(config, architecture_of(config))
    shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    shards: dict[str, list[str]] = {}
    for name in shapes:
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, []).append(name)
    total = len(shards)
    weight_map = {}
    for k, (key, names) in enumerate(sorted(shards.items(), key=lambda kv: (kv[0] == "rest", int(kv[0]) if kv[0].isdigit() else 0))):
        file = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:  # std 1/sqrt(fan-in): activations keep their scale through 32 layers
                t = torch.randn(shape, generator=generator) * shape[1] ** -0.5
                tensors[name] = t.to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    d = config_dict(config)
    d["dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(d, indent=2))
    load_tokenizer(builtin_path("smollm2-135m")).save_pretrained(str(tmp))
    os.replace(tmp, folder)
    return d


def slice_checkpoint(full: Path, folder: Path, layers: int) -> None:
    """The first `layers` layers of `full` (links to its shards; same shapes)."""
    if (folder / "config.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((full / "config.json").read_text())
    config["num_hidden_layers"] = layers
    index = json.loads((full / "model.safetensors.index.json").read_text())["weight_map"]
    keep = {n: f for n, f in index.items()
            if not n.startswith("model.layers.") or int(n.split(".")[2]) < layers}
    for f in set(keep.values()):
        if not (folder / f).exists():
            os.symlink((full / f).resolve(), folder / f)
    for p in full.iterdir():
        if p.name.startswith("tokenizer") or p.name.endswith(("special_tokens_map.json", "chat_template.jinja")):
            shutil.copy(p, folder / p.name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": keep}, indent=1))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` under /usr/bin/time -v: exit code, wall seconds, peak RSS (the kernel's high-water mark,
    which includes pages of files the process maps, e.g. llama.cpp reading a GGUF) and, sampled every
    0.2 s, peak anonymous memory (RSS less file-backed pages: what must really fit in RAM)."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    peak_anon = 0
    watcher = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in [watcher, *watcher.children(recursive=True)]:
                m = p.memory_info()
                peak_anon = max(peak_anon, m.rss - m.shared)
        except psutil.Error:
            pass
        time.sleep(0.2)
    _, stderr = proc.communicate()
    wall = time.perf_counter() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    tail = [l for l in stderr.splitlines() if l.strip() and not l.startswith("\t")][-6:]
    shown = cmd[cmd.index("--") + 1:] if "--" in cmd else cmd
    return {"cmd": "minicpm-compress " + " ".join(shown), "exit_code": proc.returncode, "wall_s": round(wall, 1),
            "peak_rss_gib": round(int(rss.group(1)) / 2**20, 2) if rss else None,
            "peak_anonymous_gib": round(peak_anon / 2**30, 2), "log": tail}


def cli(*args, tree: Path | None = None) -> list[str]:
    path = f"sys.path.insert(0, {str(tree)!r}); " if tree else ""
    code = f"import sys; sys.argv[1:2] = []; {path}from minicpm_compress.cli import main; main()"
    return [sys.executable, "-c", code, "--", *map(str, args)]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def manifest_stage(out: Path, index: int) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    s = m["stages"][index]
    return {"stage": s["name"], "wall_s": s["wall_s"], "metrics": s["metrics"], "details": s["details"]}


def run_8b(args) -> dict:
    base = Path(args.dir)
    ckpt = base / "minicpm4-8b-shaped"
    t = time.perf_counter()
    write_checkpoint(ckpt)
    from minicpm_compress.resolve import resolve_model
    from minicpm_compress.state import ModelState

    state = ModelState.open(resolve_model(str(ckpt)))
    params = state.parameter_count()
    float32 = params * 4
    results = {"checkpoint": {"path": str(ckpt), "parameters": params, "bytes_on_disk": folder_bytes(ckpt),
                              "float32_bytes": float32, "write_s": round(time.perf_counter() - t, 1)},
               "target_peak_rss_gib": round(TARGET_RSS(float32) / 2**30, 2), "commands": {}}
    env = dict(os.environ, MINICPM_COMPRESS_PROGRESS="0")
    common = ["--eval-tokens", args.eval_tokens, "--overwrite"]
    out = base / "runs"
    steps = {
        "rtn int4 g32 sym": cli("rtn", "--model", ckpt, "--bits", 4, "--group-size", 32, "--symmetric", *common,
                                "--out", out / "rtn"),
        "export gguf Q4_0 (codes copied)": cli("export", "gguf", "--model", out / "rtn", "--type", "Q4_0", *common,
                                               "--out", out / "gguf-q4_0"),
        "export gguf Q4_K_M (llama.cpp quantizer)": cli("export", "gguf", "--model", out / "rtn", "--type", "Q4_K_M",
                                                        "--no-imatrix", *common, "--out", out / "gguf-q4_k_m"),
        "export onnx int4": cli("export", "onnx", "--model", out / "rtn", "--bits", 4, *common, "--out", out / "onnx"),
        "export coreml int4, chunks 16": cli("export", "coreml", "--model", out / "rtn", "--bits", 4, "--chunks", 16,
                                             "--context", 512, *common, "--out", out / "coreml"),
        "rtn on the Q4_K grid": cli("rtn", "--model", ckpt, "--layout", "Q4_K", *common, "--out", out / "rtn-q4_k"),
        "export gguf Q4_K (codes copied)": cli("export", "gguf", "--model", out / "rtn-q4_k", "--type", "Q4_K",
                                               *common, "--out", out / "gguf-q4_k"),
    }
    for name, cmd in steps.items():
        if args.skip and any(s in name for s in args.skip):
            continue
        r = timed(cmd, env)
        folder = Path(cmd[cmd.index("--out") + 1])
        if r["exit_code"] == 0:
            r["output_bytes"] = folder_bytes(folder)
            r["stage"] = manifest_stage(folder, 1)
        results["commands"][name] = r
        print(json.dumps({name: r}), file=sys.stderr, flush=True)

    if args.awq_layers:
        sliced = base / f"minicpm4-8b-shaped-first{args.awq_layers}"
        slice_checkpoint(ckpt, sliced, args.awq_layers)
        recipe = base / "awq-slice.yaml"
        recipe.write_text(f"name: awq-slice\nmodel: {sliced}\n"
                          f"data: {{eval_tokens: {args.eval_tokens}, calibration_samples: {args.awq_samples}, "
                          f"sequence_length: 512}}\nstages:\n  - awq: {{bits: 4, group_size: 128}}\n")
        r = timed(cli("run", recipe, "--out", out / "awq-slice", "--overwrite"), env)
        if r["exit_code"] == 0:
            stage = manifest_stage(out / "awq-slice", 1)
            r["stage"] = stage
            r["output_bytes"] = folder_bytes(out / "awq-slice")
            r["seconds_per_layer"] = round(stage["wall_s"] / args.awq_layers, 1)
            r["calibration_tokens"] = args.awq_samples * 512
            r["predicted_full_model_awq_s"] = round(r["seconds_per_layer"] * SHAPE["num_hidden_layers"])
        results["commands"][f"awq int4 g128 on the first {args.awq_layers} layers"] = r
    for r in results["commands"].values():
        if r.get("peak_rss_gib") is not None:
            r["within_rss_target"] = r["peak_rss_gib"] <= results["target_peak_rss_gib"]
            r["anonymous_within_target"] = r["peak_anonymous_gib"] <= results["target_peak_rss_gib"]
    return results


def run_coreml(args) -> dict:
    """Core ML in chunks at 8B shapes, on a checkpoint of the first --coreml-layers layers (one package per
    two layers, plus the embedding and head packages at full size): seconds per layer and peak memory, which
    does not grow with the number of layer packages."""
    base = Path(args.dir)
    layers = args.coreml_layers
    ckpt = base / f"minicpm4-8b-shaped-{layers}-layers"
    write_checkpoint(ckpt, layers=layers)
    env = dict(os.environ, MINICPM_COMPRESS_PROGRESS="0")
    common = ["--eval-tokens", args.eval_tokens, "--overwrite"]
    out = base / "runs-coreml"
    results = {"checkpoint": {"path": str(ckpt), "layers": layers, "bytes_on_disk": folder_bytes(ckpt)}}
    steps = {
        "rtn int4 g32 sym": cli("rtn", "--model", ckpt, "--bits", 4, "--group-size", 32, "--symmetric", *common,
                                "--out", out / "rtn"),
        f"export coreml int4, chunks {layers // 2}": cli("export", "coreml", "--model", out / "rtn", "--bits", 4,
                                                         "--chunks", layers // 2, "--context", 512, *common,
                                                         "--out", out / "coreml"),
    }
    for name, cmd in steps.items():
        r = timed(cmd, env)
        folder = Path(cmd[cmd.index("--out") + 1])
        if r["exit_code"] == 0:
            r["output_bytes"] = folder_bytes(folder)
            r["stage"] = manifest_stage(folder, 1)
        results[name] = r
        print(json.dumps({name: r}), file=sys.stderr, flush=True)
    return results


def run_135m(args) -> dict:
    """rtn and eval of the built-in model with this tree and (optionally) an older one, same settings."""
    env = dict(os.environ, MINICPM_COMPRESS_PROGRESS="0")
    out = Path(args.dir) / "135m"
    results = {}
    trees = {"this version": None} | ({"previous version": Path(args.old_tree)} if args.old_tree else {})
    for label, tree in trees.items():
        for name, argv in {
            "rtn int4 g128": ("rtn", "--model", "minicpm-smollm2", "--bits", 4, "--group-size", 128),
            "eval": ("eval", "--model", "minicpm-smollm2"),
        }.items():
            target = out / f"{label.replace(' ', '-')}-{name.split()[0]}"
            r = timed(cli(*argv, "--eval-tokens", args.eval_tokens_135m, "--out", target, "--overwrite", tree=tree), env)
            r["output_bytes"] = folder_bytes(target) if target.exists() else None
            results.setdefault(name, {})[label] = r
            print(json.dumps({label: {name: r}}), file=sys.stderr, flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(ROOT / "out" / "scale"))
    parser.add_argument("--eval-tokens", type=int, default=512)
    parser.add_argument("--awq-layers", type=int, default=2)
    parser.add_argument("--awq-samples", type=int, default=16)
    parser.add_argument("--skip", nargs="*", default=[], help="skip commands whose name contains one of these")
    parser.add_argument("--only-135m", action="store_true")
    parser.add_argument("--only-8b", action="store_true")
    parser.add_argument("--only-coreml", action="store_true", help="only Core ML in chunks on an 8B-shaped slice")
    parser.add_argument("--coreml-layers", type=int, default=4, help="0: no Core ML run")
    parser.add_argument("--old-tree", default=None, help="a checkout of the previous version, for the 135M comparison")
    parser.add_argument("--eval-tokens-135m", type=int, default=8192)
    args = parser.parse_args()
    results = {"machine": f"{os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"}
    if args.only_coreml:
        results["coreml in chunks, minicpm4-8b-shaped slice"] = run_coreml(args)
    else:
        if not args.only_135m:
            results["minicpm4-8b-shaped"] = run_8b(args)
            if args.coreml_layers:
                results["coreml in chunks, minicpm4-8b-shaped slice"] = run_coreml(args)
        if not args.only_8b:
            results["minicpm-smollm2 (135M)"] = run_135m(args)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
