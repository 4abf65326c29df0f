"""Runs inside the throwaway llm-compressor environment that bench/int4_methods.py creates (not this package's).

    python bench/llmcompressor_run.py CHECKPOINT CALIBRATION.safetensors OUT {awq|gptq} BITS GROUP {sym|asym}

Quantizes CHECKPOINT with llm-compressor (AWQModifier + QuantizationModifier, or GPTQModifier) on the given
calibration token ids, then writes OUT: a plain float checkpoint whose linears hold llm-compressor's
dequantized weights (config and tokenizer copied), so minicpm-compress's own evaluator measures it. Prints
one JSON line: wall seconds of `oneshot` and the process's peak RSS.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import external_checkpoint  # bench/, beside this script


def _register_minicpm(package_root: Path) -> None:
    """MiniCPM (1/2/4) ships its modeling code in checkpoints; use minicpm-compress's own file (torch and
    transformers only), loaded by path so none of the package's other dependencies are needed here."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("minicpm_modeling", package_root / "minicpm_compress/models/minicpm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    AutoConfig.register("minicpm", module.MiniCPMConfig)
    AutoModelForCausalLM.register(module.MiniCPMConfig, module.MiniCPMForCausalLM)


def main() -> None:
    checkpoint, calibration, out, method, bits, group, kind = sys.argv[1:8]
    _register_minicpm(Path(__file__).resolve().parents[1])

    # llm-compressor 0.14 pins cached activations for GPU transfers; on a CPU-only machine pin_memory() fails
    # ("Cannot access accelerator device"). The benchmark's workaround, not the package's:
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM

    weights = QuantizationArgs(num_bits=int(bits), type="int", symmetric=kind == "sym", strategy="group",
                               group_size=int(group))
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if method == "awq":
        recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"], bypass_divisibility_checks=True)]
    else:
        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"], bypass_divisibility_checks=True)]
    ids = load_file(calibration)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    wall = time.perf_counter() - start

    # llm-compressor's weights as deployed: each quantized linear fake-quantized with its scales/zero points
    # (every other parameter as the model now holds it: AWQ folds its scales into the norms)
    tensors = dict(model.named_parameters())
    quantized = []
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None and hasattr(module, "weight_scale"):
                tensors[f"{name}.weight"] = fake_quantize(module.weight, module.weight_scale,
                                                          getattr(module, "weight_zero_point", None), scheme.weights)
                quantized.append(name)
    external_checkpoint.write(checkpoint, out, tensors, wall, quantized)


if __name__ == "__main__":
    main()
