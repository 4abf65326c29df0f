"""CUDA check: the same recipes on `device: cuda` and `device: cpu`, stage by stage, on a GPU machine.

    DEVICES=cuda,cpu OUT=out/cuda-check python bench/cuda_check.py     (SMALL=1: a 64-wide model, for a quick try)

A seeded random Llama (2 layers, hidden 2048, FFN 8192, 16/4 heads, SmolLM2's tokenizer and vocabulary) is
written as a checkpoint; then rtn → awq → gptq (act-order) → qat (10 steps), and prune (FFN) → heal (5 steps), run
once per device. Written to $OUT/cuda_check.json: each stage's metrics and wall time on both devices,
and how many of the final (qat) codes are equal.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TOKENIZER = Path(os.environ.get("TOKENIZER", HERE / "tok"))  # SmolLM2's tokenizer files
OUT = Path(os.environ.get("OUT", "/tmp/out"))
RUNS = Path("/tmp/runs")
PARTIAL = {}


def build(folder: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from minicpm_compress.models.checkpoint import save_checkpoint

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    torch.manual_seed(0)
    small = os.environ.get("SMALL") == "1"  # a quick local run of this script
    config = LlamaConfig(vocab_size=49152, hidden_size=64 if small else 2048, intermediate_size=256 if small else 8192,
                         num_hidden_layers=2, num_attention_heads=4 if small else 16,
                         num_key_value_heads=2 if small else 4, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    save_checkpoint(model, tok, folder)


RECIPES = {
    "quantize": [
        {"rtn": {"bits": 4, "group_size": 32, "symmetric": True}},
        {"awq": {"bits": 4, "group_size": 128, "symmetric": False}},
        {"gptq": {"bits": 4, "group_size": 128, "symmetric": True, "act_order": True}},
        {"qat": {"bits": 4, "group_size": 128, "symmetric": True, "steps": 10, "batch_size": 2,
                 "sequence_length": 256}},
    ],
    "prune": [
        {"prune": {"method": "ffn", "ratio": 0.25, "calibration_samples": 8}},
        {"heal": {"steps": 5, "batch_size": 2, "sequence_length": 256}},
    ],
}


def run(folder: Path, device: str) -> dict:
    from minicpm_compress.pipeline import run_recipe
    from minicpm_compress.recipe import build_recipe

    out = {}
    for name, stages in RECIPES.items():
        out[name] = {"error": "did not finish"}
        recipe = build_recipe(model=str(folder), name=f"{name}-{device}", device=device, cache=False, seed=0,
                              data={"eval_tokens": 2048, "calibration_samples": 16}, stages=stages)
        start = time.perf_counter()
        run_recipe(recipe, RUNS / f"{name}-{device}")
        manifest = json.loads((RUNS / f"{name}-{device}" / "manifest.json").read_text())
        out[name] = {"wall_s": round(time.perf_counter() - start, 1),
                     "stages": [{"name": s["name"], "wall_s": s.get("wall_s"),
                                 **{k: s["metrics"][k] for k in ("ppl_increase", "kld", "top1")}}
                                for s in manifest["stages"]]}
        PARTIAL[device] = out
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    folder = Path("/tmp/random-llama")
    build(folder)
    devices = os.environ.get("DEVICES", "cuda,cpu" if torch.cuda.is_available() else "cpu").split(",")
    for device in devices:
        try:
            result[device] = run(folder, device)
        except Exception as e:  # report, keep going with the other device
            import traceback

            result[device] = {**PARTIAL.get(device, {}), "error": f"{type(e).__name__}: {e}",
                              "trace": traceback.format_exc()[-3000:]}
        (OUT / "cuda_check.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result.get(device), indent=1)[:3000], flush=True)
    try:
        from safetensors.torch import load_file

        a = load_file(str(RUNS / "quantize-cpu" / "quantized.safetensors"))
        b = load_file(str(RUNS / "quantize-cuda" / "quantized.safetensors"))
        result["final_codes_equal_fraction"] = {k: round((a[k] == b[k]).float().mean().item(), 5)
                                                for k in sorted(a) if k.endswith("codes")}
    except Exception as e:
        result["final_codes_equal_fraction"] = f"not compared: {e}"
    (OUT / "cuda_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
