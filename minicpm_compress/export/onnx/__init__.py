"""ONNX for onnxruntime: a decoder with KV-cache inputs/outputs, int4/int8 weights as MatMulNBits, run in onnxruntime.

Two graph builders, one weight layout:
  * fused (decoder.py, the default for Llama, Mistral and MiniCPM text models): the decoder built
    directly from onnxruntime's fused decoder ops, as onnxruntime-genai's own model builder lays it out;
  * traced (traced.py): `torch.onnx.export(dynamo=True)` of the model itself (MiniCPM's muP scalings are in its
    forward, hence in the graph), traced without weights (zero-strided stand-ins) and wrapped so the
    cache is flat tensors; for every other architecture and MiniCPM-V's decoder on inputs_embeds:

  input_ids, attention_mask, [position_ids], past_key_values.N.key/value  →  logits, present.N.key/value

with dynamic batch, sequence and past lengths; the names are the ones onnxruntime-genai expects.

Weights (recorded per path in the manifest):
  * lossless: every decoder linear whose quantized weight fits MatMulNBits (int4 or int8; symmetric or
    integer zero points; a group size that is a multiple of the block size, or per-channel) becomes a
    `com.microsoft.MatMulNBits` node holding **our** codes, float16-exact scales and zero points;
  * requantized: linears without such weights are quantized by the project's quantizer (RTN) to the
    requested bits and block size first;
  * dynamic int8 (`int8: dynamic`): onnxruntime's `quantize_dynamic` instead (its own int8 weights and
    run-time activation quantization), on the traced graph; not lossless, measured like the rest.
Weights are streamed into model.onnx.data one tensor at a time (in the traced graph the Transpose the
exporter puts on a linear's weight is replaced by MatMulNBits or folded into the stored tensor), so an 8B
model never has to fit in memory as a graph.

Modules: graph.py (pieces both builders share), decoder.py, traced.py, genai.py (onnxruntime-genai's
files), vision.py (MiniCPM-V's vision and embedding graphs), runner.py, stage.py (the `onnx` stage).
"""
