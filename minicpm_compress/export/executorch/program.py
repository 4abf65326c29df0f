"""The ExecuTorch program of a decoder: the model with a static KV cache in mutable buffers, ExecuTorch's
own cache and attention kernels (`llama::update_cache`, `llama::custom_sdpa`), our codes in its linears,
exported with torch.export and lowered to XNNPACK.

    forward(tokens [1, S] int64, input_pos [1] int64) → logits [1, S, vocab]

S is dynamic (1 … context); `input_pos` is where the S tokens start in the cache. The caches are
[1, context, kv_heads, head_dim] per layer and per K/V, held in the program between calls.
"""

from __future__ import annotations

import copy
import io

import torch
from transformers.cache_utils import Cache

from ...models.architectures import head_dim
from ...quant.qweight import QuantizedWeight

ATTENTION = "minicpm_compress_executorch"


def load_kernels() -> None:
    """Register ExecuTorch's llama:: cache/attention ops and the quantized ops with torch (export and runtime)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 - registers torch.ops.llama
    from executorch.kernels import quantized  # noqa: F401 - registers torch.ops.quantized_decomposed kernels


def _custom_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, start_pos=None, **kwargs):
    """transformers' attention interface over ExecuTorch's kernel: query [1, H, S, D] against the whole
    cache [1, C, Hkv, D] (as the cache's update returned it), causal from `start_pos`."""
    out = torch.ops.llama.custom_sdpa(query.transpose(1, 2), key, value, start_pos, None, 0.0, True, scaling)
    return out, None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, _custom_sdpa)
    AttentionMaskInterface.register(ATTENTION, lambda *args, **kwargs: None)  # the kernel is causal itself


class KernelCache(Cache):
    """A transformers cache whose update writes the new keys/values into the program's buffers with
    ExecuTorch's kernel and hands the whole buffers to the attention."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], start):
        self.keys, self.values, self.start = keys, values, start
        self.layers = []

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        torch.ops.llama.update_cache(key_states.transpose(1, 2), k, self.start)
        torch.ops.llama.update_cache(value_states.transpose(1, 2), v, self.start)
        return k, v

    def get_seq_length(self, layer_idx: int = 0):
        return self.start

    def get_mask_sizes(self, *args, **kwargs):
        return self.keys[0].shape[1], 0


class StaticCacheDecoder(torch.nn.Module):
    """(tokens, input_pos) → logits with the KV cache in registered buffers (ExecuTorch's mutable state)."""

    def __init__(self, model: torch.nn.Module, context: int):
        super().__init__()
        _register_attention()
        shared, own = model.config, copy.deepcopy(model.config)  # the state's config stays as it is
        own._attn_implementation = ATTENTION
        for module in model.modules():
            if getattr(module, "config", None) is shared:
                module.config = own
        self.model, self.context = model, context
        c = model.config
        shape = (1, context, c.num_key_value_heads, head_dim(c))
        for i in range(c.num_hidden_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def caches(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        n = self.model.config.num_hidden_layers
        return [getattr(self, f"k_cache_{i}") for i in range(n)], [getattr(self, f"v_cache_{i}") for i in range(n)]

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start + tokens.shape[1] <= self.context)
        positions = (torch.arange(tokens.shape[1]) + start).unsqueeze(0)
        cache = KernelCache(*self.caches(), start)
        out = self.model(input_ids=tokens, position_ids=positions, past_key_values=cache, use_cache=True,
                         start_pos=start)
        return out.logits


# --- our codes in the graph -------------------------------------------------------------------------

def carried_weight(q: QuantizedWeight) -> torch.Tensor:
    """q as torchao's IntxUnpackedToInt8Tensor with int8 per-token dynamic activations ("8da4w" / "8da8w"):
    the exported program stores q's codes and scales as they are. q must be symmetric, without K grids or
    codebooks, with a group size dividing the row (or per channel)."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    out, cols = q.shape
    group = q.scheme.group_size or cols
    scales = q.scales.reshape(out, -1).to(torch.float32)
    return IntxUnpackedToInt8Tensor(
        q.codes.to(torch.int8), scales, torch.zeros(scales.shape, dtype=torch.int8),
        getattr(torch, f"int{q.scheme.bits}"), (1, group), torch.float32,
        IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN)


class ByteEmbedding(torch.nn.Module):
    """A token table of int8 rows with one scale per row, looked up by ExecuTorch's quantized kernel."""

    def __init__(self, q: QuantizedWeight):
        super().__init__()
        self.register_buffer("codes", q.codes.to(torch.int8))
        self.register_buffer("scales", q.scales.reshape(-1).to(torch.float32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_byte(self.codes, self.scales, None, -128, 127, ids)


def runner_metadata(config, context: int, bos: int | None, eos: list[int]) -> dict:
    """The constant methods ExecuTorch's LLM runner (Android LlmModule, iOS TextRunner, the C++ runner) reads
    from a program to drive it: a KV-cache decoder taking (tokens, input_pos) with a dynamic token count."""
    return {"get_max_seq_len": context, "get_max_context_len": context, "get_n_layers": config.num_hidden_layers,
            "get_vocab_size": config.vocab_size, "use_kv_cache": True, "use_sdpa_with_kv_cache": False,
            "enable_dynamic_shape": True, **({"get_bos_id": bos} if bos is not None else {}), "get_eos_ids": eos}


def lower(decoder: StaticCacheDecoder, metadata: dict | None = None) -> bytes:
    """torch.export → edge → XNNPACK → ExecuTorch program bytes (with `metadata` as constant methods)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from torch.export import Dim

    load_kernels()
    example = (torch.zeros(1, 4, dtype=torch.long), torch.tensor([0], dtype=torch.long))
    seq = Dim("seq", min=1, max=decoder.context)
    with torch.no_grad():
        program = torch.export.export(decoder.eval(), example, dynamic_shapes=({1: seq}, None), strict=False)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()], constant_methods=metadata,
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    buffer = io.BytesIO()
    edge.to_executorch().write_to_file(buffer)
    return buffer.getvalue()
