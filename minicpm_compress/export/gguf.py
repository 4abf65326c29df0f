"""The `gguf` export: a llama.cpp file, measured in llama.cpp itself.

Architectures: `llama` for Llama/Mistral-shaped models, `minicpm` for MiniCPM (with the three muP keys
`minicpm.embedding_scale`, `.residual_scale`, `.logit_scale`; without them llama.cpp silently applies a
wrong default), `qwen2` / `qwen3` for Qwen (rope on halves: their q/k rows are not permuted). Tied embeddings are written once (no `output.weight`); q/k rows are permuted the way
llama.cpp's rope expects; the tokenizer (byte-level BPE from tokenizer.json, or SentencePiece from
tokenizer.model as MiniCPM's own tokenizers use) and the chat template go into the metadata.

How each decoder linear gets into the file, recorded in the manifest:
  * lossless: our quantized weights already have the type's layout (the scheme `layout: TYPE` of
    quant/qweight.py: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K with
    their super-block scale grids); codes and scales are packed into the blocks as they are (gguf_blocks.py),
    so the file holds exactly what the gate measured. In a K-quant file, rows that do not split into
    256-wide super-blocks take a fallback type (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0 as llama.cpp does;
    Q3_K → Q4_0);
  * requantized: other layouts; the float weights (AWQ-scaled when AWQ ran) are quantized by gguf-py
    (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), by our quantizer on the grid (Q3_K … Q6_K), or, for llama.cpp's
    mixtures (Q4_K_M, …) and IQ4_NL, by llama.cpp's own quantizer.
Token embeddings are stored as Q8_0 in quantized files, norms in F32. `type: auto` (gguf_mixture.py) chooses
every linear's and the embedding's type itself, to a target size.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from ..errors import CompressError
from ..footprint import DEFAULT_CONTEXT, kv_cache_bytes
from ..evaluate.greedy import smoke_test
from ..manifest import artifact_entry
from ..models.checkpoint import untied_state_dict
from ..quant.qweight import GGUF_GRIDS, K_FALLBACK, QuantizedWeight, QuantScheme, quantize
from ..sizes import parse_size
from ..stages import RunContext, StageConfig, StageOutcome, register_stage
from . import gguf_pretokenizers as pretokenizers
from .gguf_blocks import is_lossless, pack_blocks
from .gguf_mixture import AUTO_TYPES

# types this module writes itself: legacy types quantized by gguf-py when not already ours, K-quants by our
# quantizer on their grid (gguf_blocks.py packs both)
NUMPY_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# types made by llama.cpp's quantizer (llama_model_quantize), by their llama_ftype constant's suffix
LLAMA_CPP_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "IQ4_NL")
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


def _gguf_bytes(shape: tuple[int, ...], type_name: str) -> int:
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
    from .gguf_mixture import aligned

    writer, plan, _ = _start(state, scratch, file_type, tokenizer_pre, {})
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        head = writer.fout[0].tell()
    finally:
        writer.close()
        scratch.unlink(missing_ok=True)
    return aligned(head) + sum(aligned(_gguf_bytes(shape, target)) for key, _, _, target, shape in plan
                               if key not in quantized)


def _start(state, path: Path, file_type: str, tokenizer_pre: str | None, chosen: dict[str, QuantizedWeight]):
    """A GGUF writer for `state` with its metadata and tensor directory added; the plan (per tensor: key, GGUF
    name, how, type, shape) and a function giving each tensor's data."""
    import gguf

    from ..models.minicpm import mup_scales

    c = state.config
    arch, arch_id = gguf_architecture(c)
    neox = arch in ("qwen2", "qwen3")  # llama.cpp runs their rope on halves: q/k rows stay as they are
    names = gguf.get_tensor_name_map(arch_id, c.num_hidden_layers)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
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
                                   _gguf_bytes(shape, target))
        elif target == "BF16":  # numpy has no bfloat16: the raw 16 bits
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.int16), _gguf_bytes(shape, target),
                                   raw_dtype=_ggml_type(target))
        else:
            nbytes = _gguf_bytes(shape, target)
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
        if target in K_TYPES:  # gguf-py has no K-quant quantizer: ours, on the type's grid (RTN)
            return pack_blocks(quantize(torch.from_numpy(array), QuantScheme(layout=target)), target)
        return gguf.quants.quantize(array, _ggml_type(target))

    return writer, plan, tensor_data


def llama_cpp_quantize(source: Path, target: Path, type_name: str, imatrix: dict | None = None) -> None:
    """llama.cpp's own quantizer, with our importance matrix (GGUF tensor name → (Σx², tokens)) if given."""
    try:
        import llama_cpp
    except ImportError:
        raise CompressError(f"gguf: type {type_name} needs llama-cpp-python (installed by `make install`)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = os.cpu_count() or 1
    if imatrix:
        from .imatrix import llama_cpp_imatrix

        array, _buffers = llama_cpp_imatrix(imatrix)  # the buffers stay referenced until quantizing is done
        params.imatrix = array
    from .native import native_log

    with native_log() as log:  # llama.cpp prints a line per tensor
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0
    if failed:
        last = next((line for line in reversed(log) if line.strip()), "no message")
        raise CompressError(f"gguf: llama.cpp could not quantize {source.name} to {type_name} ({last.strip()})")


class LlamaCppRunner:
    """Next-token logits from llama.cpp (llama-cpp-python), one window at a time."""

    name = "llama.cpp"

    def __init__(self, path: Path, window: int):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise CompressError("gguf: verification needs llama-cpp-python (installed by `make install`)") from None
        # use_mmap=False: llama.cpp repacks quantized weights for its CPU kernels; from a mapped file it
        # would hold the mapping and the repacked copy (twice the file in resident memory)
        self.llm = Llama(model_path=str(path), n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
                         n_threads=os.cpu_count() or 1, verbose=False, seed=0, use_mmap=False)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in input_ids.tolist():
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(row)], dtype=np.float32)))
        return torch.stack(rows)

    def greedy(self, prompt_ids: list[int], steps: int) -> list[int]:
        """Greedy decoding as llama.cpp's completion does it: the prompt in one batch, then one token each."""
        self.llm.reset()
        self.llm.eval(prompt_ids)
        out = []
        for i in range(steps):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            if i + 1 < steps:
                self.llm.eval(out[-1:])
        return out

    def close(self) -> None:
        self.llm.close()


class GGUFConfig(StageConfig):
    type: str = Field("Q4_0", description=f"one of {', '.join(NUMPY_TYPES + LLAMA_CPP_TYPES)}, or auto (a mixture "
                      "to target_size / target_bits, types chosen per tensor by measured error)")
    target_size: str | int | None = Field(None, description="auto: the file's size at most (bytes, or e.g. 90MiB, 94MB)")
    target_bits: float | None = Field(None, gt=0, le=32, description="auto: the file's bits per parameter at most")
    candidates: list[str] = Field(list(AUTO_TYPES), min_length=1, description="auto: the types it chooses from")
    requantize: Literal["gptq", "rtn"] = Field(
        "gptq", description="auto: codes for a type the tensor's own codes do not have: GPTQ on its grid, or RTN")
    file: str | None = Field(None, description="file name in the output folder (default model-TYPE.gguf)")
    tokenizer_pre: str | None = Field(None, description="llama.cpp pre-tokenizer name, if not recognised")
    context: int = Field(DEFAULT_CONTEXT, ge=16, description="context length for the RAM estimate")
    imatrix: bool = Field(True, description="llama.cpp types: compute an importance matrix on the calibration text, "
                          "quantize with it and write it beside the file (imatrix.gguf)")
    mmproj_type: str = Field("F16", description="MiniCPM-V: type of the vision file's matmul weights "
                             "(F32, F16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1)")

    @field_validator("mmproj_type")
    @classmethod
    def _known_mmproj(cls, value: str):
        from .mmproj import MMPROJ_TYPES

        if value not in MMPROJ_TYPES:
            raise ValueError(f"unknown mmproj type '{value}' (known: {', '.join(MMPROJ_TYPES)})")
        return value

    @field_validator("type")
    @classmethod
    def _known(cls, value: str):
        if value not in NUMPY_TYPES + LLAMA_CPP_TYPES + ("auto",):
            raise ValueError(f"unknown GGUF type '{value}' (known: {', '.join(NUMPY_TYPES + LLAMA_CPP_TYPES)}, auto)")
        return value

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, value: list[str]):
        unknown = [t for t in value if t not in AUTO_TYPES]
        if unknown:
            raise ValueError(f"candidate type(s) {', '.join(unknown)} not among {', '.join(AUTO_TYPES)}")
        return sorted(set(value), key=AUTO_TYPES.index)

    @model_validator(mode="after")
    def _auto_target(self):
        targets = (self.target_size is not None) + (self.target_bits is not None)
        if self.type == "auto" and targets != 1:
            raise ValueError("type auto needs one of target_size or target_bits")
        if self.type != "auto" and targets:
            raise ValueError("target_size / target_bits apply to type auto only")
        if self.target_size is not None:
            parse_size(self.target_size)  # a clear error now, not after calibration
        return self

    def target_bytes(self, parameters: int) -> int:
        return parse_size(self.target_size) if self.target_size is not None else int(self.target_bits * parameters / 8)


def _write_mixture(config: GGUFConfig, state, ctx: RunContext, path: Path) -> tuple[dict, dict]:
    """`type: auto`: choose every quantized tensor's type to fit the target, write the file; (mixture, paths)."""
    from .gguf_mixture import plan_mixture

    params = state.parameter_count(vision=False)
    target = config.target_bytes(params)
    keys = {f"{n}.weight" for n in state.linear_names()} | {state.head_name(), "model.embed_tokens.weight"}
    fixed = fixed_bytes(state, "F32", config.tokenizer_pre, keys, ctx.out_dir / f".{path.name}.directory")
    codes, mixture = plan_mixture(state, ctx.calibration(state), target - fixed, tuple(config.candidates),
                                  config.requantize)
    mixture = {"target_bytes": target, "planned_bytes": fixed + mixture["quantized_bytes"], **mixture}
    paths = write_gguf(state, path, "auto", config.tokenizer_pre, codes)
    own = sum(1 for t in mixture["tensors"].values() if t["codes"] == "own")
    return mixture, {"lossless": own, "requantized": paths["lossless"] - own, "float": 0}


@register_stage("gguf", GGUFConfig, "export a llama.cpp GGUF file and measure it in llama.cpp", transforms=False,
                exports=True, calibrates=lambda c: (c.imatrix and c.type in LLAMA_CPP_TYPES) or c.type == "auto")
def export_gguf(config: GGUFConfig, state, ctx: RunContext) -> StageOutcome:
    path = ctx.out_dir / (config.file or f"model-{config.type}.gguf")
    artifacts, imatrix, mixture = [], None, None
    if config.type in LLAMA_CPP_TYPES:
        if config.imatrix:
            from .imatrix import collect_imatrix, gguf_names, write_imatrix

            data = ctx.recipe.data
            imatrix = gguf_names(state, collect_imatrix(state, ctx.calibration(state)))
            write_imatrix(ctx.out_dir / "imatrix.gguf", imatrix, "minicpm-compress calibration: " + ", ".join(
                f"{name}×{weight:g}" for name, weight in data.calibration_sources()), data.sequence_length)
            artifacts.append(artifact_entry(ctx.out_dir, ctx.out_dir / "imatrix.gguf",
                                            "llama.cpp importance matrix (llama-quantize --imatrix)", 32))
        base = ctx.out_dir / f".{path.name}.source"
        paths = write_gguf(state, base, "stored", config.tokenizer_pre)
        llama_cpp_quantize(base, path, config.type, imatrix)
        base.unlink()
        paths = {"llama.cpp quantizer": paths["float"]}
    elif config.type == "auto":
        mixture, paths = _write_mixture(config, state, ctx, path)
    else:
        paths = write_gguf(state, path, config.type, config.tokenizer_pre)
    bits = max(mixture["types"], key=mixture["types"].get) if mixture else config.type
    artifacts.insert(0, artifact_entry(ctx.out_dir, path, f"GGUF {config.type}", int(re.search(r"\d+", bits).group())))
    vision = {}
    if state.vision is not None:  # MiniCPM-V: the vision half as the mmproj file llama.cpp's mtmd loads
        from ..data.prompts import image_id_text
        from ..models.minicpm import input_scale
        from .mmproj import MtmdRunner, write_mmproj

        mmproj = ctx.out_dir / f"mmproj-{config.mmproj_type}.gguf"
        vision = {"file": mmproj.name, "type": config.mmproj_type, "tensors": write_mmproj(state, mmproj, config.mmproj_type),
                  "image_prefix": image_id_text(state.vision.settings)}
        bits = int(re.search(r"\d+", config.mmproj_type).group())
        artifacts.append(artifact_entry(ctx.out_dir, mmproj, f"GGUF mmproj (MiniCPM-V {state.vision.settings.version} "
                                        f"vision, {config.mmproj_type})", bits))
        runner = MtmdRunner(path, mmproj, ctx.recipe.data.eval_window, input_scale(state.config),
                            image_id_text(state.vision.settings))
    else:
        runner = LlamaCppRunner(path, ctx.recipe.data.eval_window)
    try:
        metrics = ctx.evaluator.measure(runner, desc=f"evaluate gguf {config.type} in llama.cpp")
        smoke = None if vision else smoke_test(state.tokenizer, runner, f"{path.name} in llama.cpp, greedy")
    finally:
        runner.close()
    size = path.stat().st_size
    params = state.parameter_count(vision=False)  # the file holds the LLM
    kv = kv_cache_bytes(state.config, config.context)
    copied = paths.get("lossless", 0)
    details = {
        "summary": f"{path.name}, {size * 8 / params:.2f} bits/weight"
                   + (f", {copied} linears copied" if copied else "") + ", in llama.cpp",
        "type": config.type,
        "file": path.name,
        "architecture": gguf_architecture(state.config)[0],
        "tensors": paths,
        "bits_per_weight": round(size * 8 / params, 3),
        "ram_estimate": {"weights_bytes": size, "kv_cache_bytes": kv, "context_tokens": config.context,
                         "total_bytes": size + kv},
        "measured": "in llama.cpp (llama-cpp-python)" + (", images through mtmd" if vision else ""),
        **({"smoke_test": smoke} if smoke else {}),
        **({"imatrix": {"file": "imatrix.gguf", "tensors": len(imatrix),
                        "tokens": max(count for _, count in imatrix.values())}} if imatrix else {}),
        **({"mixture": mixture} if mixture else {}),
    }
    if mixture:
        details["summary"] += (", " + " + ".join(f"{n} {t}" for t, n in mixture["types"].items())
                               + f" (predicted KLD {mixture['predicted_kld']:.4f})")
    if vision:
        vision["bytes"] = (ctx.out_dir / vision["file"]).stat().st_size
        details["mmproj"] = vision
        details["summary"] += f" + {vision['file']} ({vision['bytes'] / 2**20:.1f} MiB)"
    return StageOutcome(state, metrics, details, artifacts)
