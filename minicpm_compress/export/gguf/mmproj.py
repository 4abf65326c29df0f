"""MiniCPM-V's vision half as the mmproj GGUF llama.cpp's mtmd loads, and a runner that measures both files.

The mmproj file (`general.architecture clip`, projector `resampler`, `clip.minicpmv_version` 3 / 5 / 6 for
MiniCPM-V 2.6 / 4.0 / 4.5) holds the SigLIP tower (`v.*`) and the resampler (`resampler.*`: attention
in-projection split into q/k/v, `proj` transposed into a matmul weight and divided by the LLM's embedding
scale, because llama.cpp multiplies every input embedding of a MiniCPM LLM by it, image rows included).
The key position embedding `resampler.pos_embed_k` is written too (llama.cpp requires the tensor although
its graph now computes the same sin-cos values itself).

Tensor types: `type` applies to the matmul weights (attention, MLP, resampler projections) whose rows
are whole blocks; everything else stays F16 (patch convolution) or F32 (norms, biases, position tables,
queries).
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

import numpy as np
import torch

from ...devices import cpu_threads
from ...errors import CompressError
from ...models.minicpm import input_scale
from ...models.minicpmv import sincos_2d
from ..native import native_log

MMPROJ_TYPES = ("F32", "F16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")


def _mmproj_tensors(vision, scale_emb: float):
    """(GGUF name, float32 array, is a matmul weight) in file order."""
    s = vision.settings
    t = vision.tensor
    yield "v.patch_embd.weight", t("vpm.embeddings.patch_embedding.weight"), False
    yield "v.patch_embd.bias", t("vpm.embeddings.patch_embedding.bias"), False
    yield "v.position_embd.weight", t("vpm.embeddings.position_embedding.weight"), False
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
             "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
    for i in range(s.vision.num_hidden_layers):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                yield (f"v.blk.{i}.{theirs}.{kind}", t(f"vpm.encoder.layers.{i}.{ours}.{kind}"),
                       kind == "weight" and "ln" not in theirs)
    yield "v.post_ln.weight", t("vpm.post_layernorm.weight"), False
    yield "v.post_ln.bias", t("vpm.post_layernorm.bias"), False
    width = s.llm_width
    yield "resampler.pos_embed_k", sincos_2d(width, s.vision.buckets, s.vision.buckets), False
    yield "resampler.query", t("resampler.query"), False
    yield "resampler.kv.weight", t("resampler.kv_proj.weight"), True
    in_w, in_b = t("resampler.attn.in_proj_weight"), t("resampler.attn.in_proj_bias")
    for k, part in enumerate("qkv"):
        yield f"resampler.attn.{part}.weight", in_w[k * width : (k + 1) * width], True
        yield f"resampler.attn.{part}.bias", in_b[k * width : (k + 1) * width], False
    yield "resampler.attn.out.weight", t("resampler.attn.out_proj.weight"), True
    yield "resampler.attn.out.bias", t("resampler.attn.out_proj.bias"), False
    for ln in ("q", "kv", "post"):
        yield f"resampler.ln_{ln}.weight", t(f"resampler.ln_{ln}.weight"), False
        yield f"resampler.ln_{ln}.bias", t(f"resampler.ln_{ln}.bias"), False
    yield "resampler.proj.weight", (t("resampler.proj") / scale_emb).T.contiguous(), True


def write_mmproj(state, path: Path, type_name: str = "F16") -> dict:
    """Write the vision half of a MiniCPM-V `state` as an mmproj GGUF; return tensor counts per stored type."""
    import gguf

    if type_name not in MMPROJ_TYPES:
        raise CompressError(f"gguf: unknown mmproj type '{type_name}' (known: {', '.join(MMPROJ_TYPES)})")
    s = state.vision.settings
    v = s.vision
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(f"MiniCPM-V {s.version} vision")
    writer.add_file_type(getattr(gguf.LlamaFileType, "ALL_F32" if type_name == "F32" else f"MOSTLY_{type_name}"))
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_minicpmv_projector", True)
    writer.add_string("clip.projector_type", "resampler")
    writer.add_int32("clip.minicpmv_version", s.llama_cpp_version)
    writer.add_uint32("clip.minicpmv_query_num", s.query_num)
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", s.scale_resolution)
    writer.add_uint32("clip.vision.patch_size", s.patch_size)
    writer.add_uint32("clip.vision.embedding_length", v.hidden_size)
    writer.add_uint32("clip.vision.feed_forward_length", v.intermediate_size)
    writer.add_uint32("clip.vision.projection_dim", 0)
    writer.add_uint32("clip.vision.attention.head_count", v.num_attention_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", v.layer_norm_eps)
    writer.add_uint32("clip.vision.block_count", v.num_hidden_layers)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    counts: dict[str, int] = {}
    block = 32
    for name, array, matmul in _mmproj_tensors(state.vision, input_scale(state.config)):
        a = array.numpy().astype(np.float32)
        if matmul and type_name not in ("F32", "F16") and a.shape[-1] % block == 0:
            stored = type_name
            writer.add_tensor(name, gguf.quants.quantize(a, getattr(gguf.GGMLQuantizationType, type_name)),
                              raw_dtype=getattr(gguf.GGMLQuantizationType, type_name))
        elif a.ndim >= 2 and name != "v.position_embd.weight" and name != "resampler.query" and (
                matmul or name == "v.patch_embd.weight") and type_name != "F32":
            stored = "F16"
            writer.add_tensor(name, a.astype(np.float16))
        else:
            stored = "F32"
            writer.add_tensor(name, a)
        counts[stored] = counts.get(stored, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


class MtmdRunner:
    """Next-token logits of image prompts from llama.cpp: the LLM GGUF plus the mmproj GGUF through mtmd.

    Each image goes through mtmd exactly as an app sends it (its own preprocessing, slicing and vision
    graph); mtmd's layout of the image's tokens must equal the prompt's, and the image rows it produces are
    compared (cosine) with the reference's image features before they are fed to the LLM in their slots.
    """

    name = "llama.cpp"

    def __init__(self, llm_path: Path, mmproj_path: Path, window: int, scale_emb: float, image_prefix: str = ""):
        try:
            import llama_cpp
            from llama_cpp import Llama, mtmd_cpp
        except (ImportError, FileNotFoundError, OSError) as e:
            raise CompressError(f"gguf: verifying an mmproj file needs llama-cpp-python built with mtmd "
                                f"(`make install` builds it): {str(e).splitlines()[0]}") from None
        self.lc, self.mtmd = llama_cpp, mtmd_cpp
        self.scale_emb = scale_emb
        self.image_prefix = image_prefix  # text an app sends before the image marker (`<image_id>0</image_id>`)
        self.llm = Llama(model_path=str(llm_path), n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
                         n_threads=cpu_threads(), n_threads_batch=cpu_threads(), verbose=False, seed=0,
                         use_mmap=False)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.warmup = False
        params.n_threads = cpu_threads()
        with native_log() as log:
            self.ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self.llm.model, params)
        if not self.ctx:
            reason = next((line for line in reversed(log) if "error" in line.lower()), log[-1] if log else "no reason given")
            raise CompressError(f"gguf: llama.cpp's mtmd could not load {mmproj_path.name}: {reason.strip()}")
        self.width = self.llm.n_embd()
        self._cosines: list[float] = []
        self._cache: dict[int, tuple[list[int], np.ndarray]] = {}

    @property
    def image_cosine(self) -> float | None:
        return float(np.mean(self._cosines)) if self._cosines else None

    def image(self, rgb: np.ndarray) -> tuple[list[int], np.ndarray]:
        """(text tokens mtmd places around the image, image rows [slots, width] as the LLM receives them)."""
        key = id(rgb)
        if key in self._cache:
            return self._cache[key]
        m = self.mtmd
        data = np.ascontiguousarray(rgb, dtype=np.uint8)
        bitmap = m.mtmd_bitmap_init(data.shape[1], data.shape[0], data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = m.mtmd_input_chunks_init()
        prompt = self.image_prefix.encode() + m.mtmd_default_marker()
        text = m.mtmd_input_text(prompt, len(prompt), False, True)
        with native_log(), contextlib.ExitStack() as cleanup:
            cleanup.callback(m.mtmd_bitmap_free, bitmap)
            cleanup.callback(m.mtmd_input_chunks_free, chunks)
            bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise CompressError("gguf: mtmd could not tokenize an image prompt")
            tokens, rows = [], []
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) == 0:  # text
                    n = ctypes.c_size_t()
                    ptr = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    tokens += [ptr[k] for k in range(n.value)]
                    continue
                n = m.mtmd_input_chunk_get_n_tokens(chunk)
                if m.mtmd_encode_chunk(self.ctx, chunk) != 0:
                    raise CompressError("gguf: mtmd could not encode an image")
                out = m.mtmd_get_output_embd(self.ctx)
                rows.append(np.ctypeslib.as_array(out, shape=(n * self.width,)).reshape(n, self.width).copy())
                tokens += [-1] * n
        self._cache[key] = (tokens, np.concatenate(rows))
        return self._cache[key]

    def _decode(self, values, pos: int, embd: bool) -> np.ndarray:
        lc = self.lc
        n = len(values)
        batch = lc.llama_batch_init(n, self.width if embd else 0, 1)
        try:
            if embd:
                ctypes.memmove(batch.embd, np.ascontiguousarray(values, dtype=np.float32).ctypes.data, values.nbytes)
            for i in range(n):
                if not embd:
                    batch.token[i] = int(values[i])
                batch.pos[i] = pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = n
            if lc.llama_decode(self.llm.ctx, batch) != 0:
                raise CompressError("gguf: llama.cpp could not decode an image prompt")
            vocab = self.llm.n_vocab()
            return np.ctypeslib.as_array(lc.llama_get_logits(self.llm.ctx), shape=(n * vocab,)).reshape(n, vocab).copy()
        finally:
            lc.llama_batch_free(batch)

    def logits(self, prompts) -> torch.Tensor:
        out = []
        for r in range(len(prompts)):
            ids, slots = prompts.ids[r].tolist(), prompts.slots[r].tolist()
            tokens, rows = self.image(prompts.rgb[r])
            block = [-1 if s else t for t, s in zip(ids, slots)][: len(tokens)]
            if block != tokens:
                raise CompressError(f"gguf: llama.cpp lays out image '{prompts.names[r]}' as {len(tokens)} tokens "
                                    "that differ from the prompt's image block")
            if prompts.features is not None:
                ref = torch.cat([prompts.features[r]]).double()
                ours = torch.from_numpy(rows).double() * self.scale_emb
                self._cosines.append(torch.nn.functional.cosine_similarity(ours, ref, dim=-1).mean().item())
            self.lc.llama_memory_clear(self.lc.llama_get_memory(self.llm.ctx), True)
            parts, start, k = [], 0, 0
            while start < len(ids):  # runs of text tokens and of image slots, in order
                end = start
                while end < len(ids) and slots[end] == slots[start]:
                    end += 1
                if slots[start]:
                    parts.append(self._decode(rows[k : k + end - start], start, True))
                    k += end - start
                else:
                    parts.append(self._decode(ids[start:end], start, False))
                start = end
            out.append(torch.from_numpy(np.concatenate(parts)))
        return torch.stack(out)

    def close(self) -> None:
        if self.ctx:
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None
        self.llm.close()

    def generate(self, prompts, row: int, tokens: int) -> list[int]:
        """Greedy continuation of one image prompt, as an app runs it: the prompt (image rows from mtmd) decoded
        into llama.cpp's cache, then one token at a time."""
        logits = self.logits(prompts[row : row + 1])[0]
        out = [int(logits[-1].argmax())]
        position = prompts.ids.shape[1]
        for _ in range(tokens - 1):
            step = self._decode([out[-1]], position, False)
            out.append(int(step[-1].argmax()))
            position += 1
        return out
