"""The GGUF writer: a llama.cpp file from a model state, streamed one tensor at a time.

Architectures: `llama` for Llama/Mistral-shaped models, `minicpm` for MiniCPM (with the three muP keys
`minicpm.embedding_scale`, `.residual_scale`, `.logit_scale`; without them llama.cpp silently applies a
wrong default), `qwen2` / `qwen3` for Qwen (rope on halves: their q/k rows are not permuted). Tied embeddings are written once (no `output.weight`); q/k rows are permuted the way
llama.cpp's rope expects; the tokenizer (byte-level BPE from tokenizer.json, or SentencePiece from
tokenizer.model as MiniCPM's own tokenizers use) and the chat template go into the metadata.

How each decoder linear gets into the file, recorded in the manifest:
  * lossless: our quantized weights already have the type's layout (the scheme `layout: TYPE` of
    quant/qweight.py: Q8_0, Q4_0, IQ4_NL, Q4_1, Q5_0, Q5_1, and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
    with their super-block scale grids); codes and scales are packed into the blocks as they are
    (blocks.py), so the file holds exactly what the gate measured. In a K-quant file, rows that do not split
    into 256-wide super-blocks take llama.cpp's fallback type (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0,
    Q2_K / Q3_K → IQ4_NL);
  * requantized: other layouts; the float weights (AWQ-scaled when AWQ ran) are quantized by gguf-py
    (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), by our quantizer on the grid (IQ4_NL, Q3_K … Q6_K), or, for llama.cpp's
    mixtures (Q4_K_M, …), by llama.cpp's own quantizer.
Token embeddings are stored as Q8_0 in quantized files, norms in F32. `type: auto` (mixture.py) chooses
every linear's and the embedding's type itself, to a target size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ...errors import CompressError
from ...models import architectures
from ...models.checkpoint import untied_state_dict
from ...quant.qweight import (
    GGUF_GRIDS,
    K_FALLBACK,
    QuantizedWeight,
    QuantScheme,
    quantize,
)
from . import pretokenizers
from .blocks import is_lossless, pack_blocks

# types this module writes itself: legacy types quantized by gguf-py when not already ours, IQ4_NL and K-quants
# by our quantizer on their grid (blocks.py packs them all)
NUMPY_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
OUR_GRID_TYPES = ("IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # gguf-py has no quantizer for these


# types made by llama.cpp's quantizer (llama_model_quantize), by their llama_ftype constant's suffix
LLAMA_CPP_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M")


K_TYPES = tuple(K_FALLBACK)


# file type "stored": matrices in the dtype they are held in when GGUF has it (the intermediate file handed to
# llama.cpp's quantizer: half the size of an F32 one for a bf16 checkpoint, and the same values)
STORED_TYPES = {torch.bfloat16: "BF16", torch.float16: "F16"}


# pre-tokenizer settings of byte-level BPE tokenizers that llama.cpp's hash table does not list (our test
# tokenizers) → llama.cpp's `tokenizer.ggml.pre`
KNOWN_PRE_TOKENIZERS = {
    json.dumps({"add_prefix_space": False, "trim_offsets": True, "type": "ByteLevel", "use_regex": True},
               sort_keys=True): "gpt-2",
}


def _ggml_type(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


def rope_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp expects for q/k weights: per head, interleave the two rotary halves."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _bpe_vocabulary(writer, tokenizer, vocab_size: int, pre: str | None) -> None:
    """Byte-level BPE (tokenizer.json): tokens, types and merges; model `gpt2` with an explicit pre-tokenizer."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise CompressError(f"gguf: tokenizer model '{model.get('type')}' is not supported (byte-level BPE or "
                            "SentencePiece with tokenizer.model)")
    if pre is None:  # as llama.cpp's converter recognises it; else a plain GPT-2 byte-level pre-tokenizer
        pre, digest = pretokenizers.recognise(tokenizer)
        key = json.dumps(spec.get("pre_tokenizer"), sort_keys=True)
        pre = pre or KNOWN_PRE_TOKENIZERS.get(key)
        if pre is None:
            raise CompressError(
                "gguf: pre-tokenizer not recognised (llama.cpp's converter would not know it either: check hash "
                f"{digest[:16]}…); set the gguf stage's tokenizer_pre (--tokenizer-pre) to llama.cpp's name for it "
                f"(pre_tokenizer: {key[:120]})"
            )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])])


def _sentencepiece_vocabulary(writer, folder: Path, vocab_size: int) -> None:
    """SentencePiece (tokenizer.model, as MiniCPM's own tokenizers): pieces, scores and types; model `llama`."""
    import gguf
    from gguf.vocab import SentencePieceVocab

    tokens, scores, types = [], [], []
    for text, score, kind in SentencePieceVocab(folder).all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise CompressError(f"gguf: {folder / 'tokenizer.model'} has {len(tokens)} pieces, more than vocab_size {vocab_size}")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def _tokenizer_metadata(writer, tokenizer, folder: Path | None, vocab_size: int, pre: str | None) -> None:
    if folder is not None and (Path(folder) / "tokenizer.model").is_file():
        _sentencepiece_vocabulary(writer, Path(folder), vocab_size)
    else:
        _bpe_vocabulary(writer, tokenizer, vocab_size, pre)
    for setter, value in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if value is not None:
            setter(value)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


ALIGNMENT = 32  # gguf-py's default data alignment: every tensor's data starts at a multiple of it


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def gguf_bytes(shape: tuple[int, ...], type_name: str) -> int:
    import gguf

    numel = torch.Size(shape).numel()
    if type_name == "F32":
        return numel * 4
    if type_name in ("F16", "BF16"):
        return numel * 2
    block, size = gguf.GGML_QUANT_SIZES[_ggml_type(type_name)]
    return numel // block * size


def longrope_factors(c, rope: dict, head_dim: int, arch: str) -> dict[str, np.ndarray]:
    """LongRoPE (MiniCPM4): llama.cpp's minicpm arch takes the long/short frequency factors as tensors.

    llama.cpp picks the long factors beyond `original_max_position_embeddings`, as transformers does; it
    applies no attention factor, so a config whose factor differs from 1 (a context extended past the
    original) is refused rather than written wrong.
    """
    if rope.get("rope_type") != "longrope":
        return {}
    if arch != "minicpm":
        raise CompressError(f"gguf: LongRoPE is written for MiniCPM only, not model_type '{c.model_type}'")
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long or not short or len(long) != head_dim // 2 or len(short) != head_dim // 2:
        raise CompressError(f"config.json: rope_scaling long_factor/short_factor must each have {head_dim // 2} "
                            "values (head_dim / 2)")
    original = rope.get("original_max_position_embeddings") or c.max_position_embeddings
    factor = rope.get("attention_factor")
    if factor is None:
        scale = c.max_position_embeddings / original
        factor = 1.0 if scale <= 1 else (1 + np.log(scale) / np.log(original)) ** 0.5
    if abs(factor - 1.0) > 1e-6:
        raise CompressError(f"gguf: LongRoPE attention factor {factor:.4f} (max_position_embeddings "
                            f"{c.max_position_embeddings} > original {original}) has no llama.cpp equivalent for minicpm")
    return {"rope_factors_long": np.asarray(long, dtype=np.float32),
            "rope_factors_short": np.asarray(short, dtype=np.float32)}


def gguf_architecture(config):
    """(llama.cpp architecture name, gguf-py's MODEL_ARCH) of a model config."""
    import gguf

    arch = {"llama": "llama", "mistral": "llama", "minicpm": "minicpm", "qwen2": "qwen2", "qwen3": "qwen3"}.get(
        config.model_type)
    if arch is None:
        raise CompressError(f"gguf: model_type '{config.model_type}' is not supported yet "
                            "(llama, mistral, minicpm, qwen2, qwen3)")
    return arch, getattr(gguf.MODEL_ARCH, arch.upper())


def write_gguf(state, path: Path, file_type: str, tokenizer_pre: str | None = None,
               chosen: dict[str, QuantizedWeight] | None = None) -> dict:
    """Write `state` as a GGUF file of `file_type` (one of NUMPY_TYPES, or "auto" with every quantized tensor's
    codes in `chosen`, by checkpoint tensor name); return how tensors were stored.

    Streamed: the tensor directory is written first from shapes alone, then each tensor is read from the
    state, converted and appended, one at a time.
    """
    writer, plan, tensor_data = _start(state, path, file_type, tokenizer_pre, chosen or {})
    paths = {"lossless": 0, "requantized": 0, "float": 0}
    for _, _, how, _, _ in plan:
        if how in paths:
            paths[how] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for key, gguf_name, how, target, shape in plan:
        writer.write_tensor_data(tensor_data(key, how, target, shape))
    writer.close()
    return paths


def fixed_bytes(state, file_type: str, tokenizer_pre: str | None, quantized: set[str], scratch: Path) -> int:
    """Bytes of a GGUF file of `state` that are not the data of the `quantized` tensors (checkpoint names):
    metadata, tensor directory and the other tensors' data, with alignment; a dry run writes the
    directory to `scratch` (removed)."""
    writer, plan, _ = _start(state, scratch, file_type, tokenizer_pre, {})
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        head = writer.fout[0].tell()
    finally:
        writer.close()
        scratch.unlink(missing_ok=True)
    return aligned(head) + sum(aligned(gguf_bytes(shape, target)) for key, _, _, target, shape in plan
                               if key not in quantized)


def _start(state, path: Path, file_type: str, tokenizer_pre: str | None, chosen: dict[str, QuantizedWeight]):
    """A GGUF writer for `state` with its metadata and tensor directory added; the plan (per tensor: key, GGUF
    name, how, type, shape) and a function giving each tensor's data."""
    import gguf

    from ...models.minicpm import mup_scales

    c = state.config
    arch, arch_id = gguf_architecture(c)
    neox = arch in ("qwen2", "qwen3")  # llama.cpp runs their rope on halves: q/k rows stay as they are
    names = gguf.get_tensor_name_map(arch_id, c.num_hidden_layers)
    head_dim = architectures.head_dim(c)
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0)}

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(c.model_type)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)  # needed once pruning leaves head_dim != hidden / heads
    writer.add_value_length(head_dim)
    writer.add_vocab_size(c.vocab_size)
    ftype = {"F32": "ALL_F32", "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S",
             "auto": "GUESSED", "stored": "GUESSED"}.get(file_type, f"MOSTLY_{file_type}")
    writer.add_file_type(getattr(gguf.LlamaFileType, ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if arch == "minicpm":
        embedding, residual, divisor = mup_scales(c)
        writer.add_embedding_scale(embedding)
        writer.add_residual_scale(residual)
        writer.add_logit_scale(divisor)
    _tokenizer_metadata(writer, state.tokenizer, state.source.checkpoint, c.vocab_size, tokenizer_pre)

    quantized_type = file_type not in ("F32", "F16", "stored")
    plan = []  # (key, GGUF name, how, target type, shape)
    extra = longrope_factors(c, rope, head_dim, arch)
    if extra:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)  # llama.cpp loads the factors only then
        original = rope.get("original_max_position_embeddings") or c.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
        for name, factors in extra.items():
            plan.append((name, f"{name}.weight", "extra", "F32", tuple(factors.shape)))
    for key in untied_state_dict(state.skeleton()):
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise CompressError(f"gguf: no GGUF name for tensor '{key}'")
        shape = state.weights.shape(key)
        linear = key.removesuffix(".weight")
        if key in chosen:  # the mixture's codes, in their own layout
            plan.append((key, gguf_name, "lossless", chosen[key].scheme.layout, shape))
            continue
        q = state.qweights.get(linear)
        if q is not None and file_type == "auto":
            raise CompressError(f"gguf: '{key}' is quantized but the mixture chose no type for it")
        # linears a bit budget promoted keep their width in a lower-bit file: int8 as Q8_0, a layout as itself
        own = file_type
        if q is not None and quantized_type and q.scheme.bits > GGUF_GRIDS[file_type]["bits"]:
            own = "Q8_0" if q.scheme.bits == 8 else (q.scheme.layout or file_type)
        if own in K_TYPES and len(shape) == 2 and shape[1] % 256:
            own = K_FALLBACK[own]  # rows that do not split into super-blocks: llama.cpp's own fallback type
        if q is not None and is_lossless(q, own):
            plan.append((key, gguf_name, "lossless", own, shape))
            continue
        if len(shape) == 1:
            plan.append((key, gguf_name, "norm", "F32", shape))  # norms stay F32
            continue
        is_linear = linear in state.qweights or key.endswith("_proj.weight")
        target = own if is_linear or not quantized_type else "Q8_0"  # embeddings: Q8_0 in quantized files
        if target not in ("F32", "F16", "stored") and shape[1] % 32:
            raise CompressError(f"gguf: '{key}' has {shape[1]} input columns, not a multiple of the 32-wide "
                                f"{target} blocks; export as F16")
        if target == "stored":  # the matrix as it is held, bf16 and f16 exactly, anything else as F32
            target = STORED_TYPES.get(state.weights.dtype(key), "F32")
        plan.append((key, gguf_name, ("requantized" if quantized_type else "float") if is_linear else "convert",
                     target, shape))

    for key, gguf_name, how, target, shape in plan:
        if target in ("F32", "F16"):
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32 if target == "F32" else np.float16),
                                   gguf_bytes(shape, target))
        elif target == "BF16":  # numpy has no bfloat16: the raw 16 bits
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.int16), gguf_bytes(shape, target),
                                   raw_dtype=_ggml_type(target))
        else:
            nbytes = gguf_bytes(shape, target)
            writer.add_tensor_info(gguf_name, (shape[0], nbytes // shape[0]), np.dtype(np.uint8), nbytes,
                                   raw_dtype=_ggml_type(target))

    def tensor_data(key: str, how: str, target: str, shape) -> np.ndarray:
        heads = None if neox else c.num_attention_heads if key.endswith("q_proj.weight") else (
            c.num_key_value_heads if key.endswith("k_proj.weight") else None)
        index = rope_permutation(shape[0], heads) if heads else None
        if how == "extra":
            return extra[key]
        if how == "lossless":
            q = chosen[key] if key in chosen else state.qweights[key.removesuffix(".weight")]
            return pack_blocks(q.rows(index) if heads else q, target)
        if STORED_TYPES.get(state.weights.dtype(key)) == target:  # 16 bits as held: no float32 copy
            data = state.weights.get(key, dtype=None)
            data = data[index] if heads else data
            return (data.view(torch.int16) if target == "BF16" else data).numpy()
        data = state.tensor(key)
        array = (data[index] if heads else data).numpy()
        if target == "F32":
            return np.ascontiguousarray(array, dtype=np.float32)
        if target == "F16":
            return array.astype(np.float16)
        if target in OUR_GRID_TYPES:  # ours, on the type's grid (RTN)
            return pack_blocks(quantize(torch.from_numpy(array), QuantScheme(layout=target)), target)
        return gguf.quants.quantize(array, _ggml_type(target))

    return writer, plan, tensor_data
