"""Core ML for iOS and macOS: a stateful (iOS 18 / macOS 15) decoder mlpackage whose linears hold our quantized codes.

The program comes from coremltools' torch converter (mlprogram) applied to the model
itself behind a small wrapper, so MiniCPM's muP scalings are in the graph:

  inputs   input_ids [1, S] int32, causal_mask [1, 1, S, P+S] float16 (0 = attend, -1e4 = masked)
  states   key_cache, value_cache [layers, 1, kv_heads, context, head_dim] float16 (Core ML states)
  output   logits [1, S, vocab] (float16, or float32 with float32 compute)

Compute precision: float16 (what the Neural Engine runs) only when a range check on calibration text
passes: no linear output at or above float16's 65,504 and no RMSNorm input at or above 256 (the norm
squares it). A model that fails it is first rewritten to fit float16 with the same function
(float16_fit.py: the residual stream and MLP inner values shifted by powers of two, norms that square
nothing above 1); if it still does not fit: float32 (CPU/GPU), or an error if float16 was asked for.

The cache length P is the mask's last dimension minus S, so an app prefills a prompt (S = prompt
length, P = 0) and then decodes one token at a time (S = 1) against the same state. The explicit mask
keeps transformers' mask code out of the traced graph.

Weights (recorded per path in the manifest):
  * lossless: every decoder linear whose quantized weight fits (same bits; symmetric or integer zero
    points; any group size) becomes a `constexpr_blockwise_shift_scale` holding **our** codes, scales
    and zero points (block = gcd(group, row); a group spanning several blocks repeats its scale);
  * requantized: other linears are quantized by the project's quantizer (RTN) first, to int4 blocks of
    `block_size` or int8 per channel (symmetric).
The token embedding (and an untied lm_head) is quantized here to int8 per row unless `embeddings:
float`; norms stay float.

Checked on Linux without a Mac: the saved mlpackage is read back (spec + weight blob), its blockwise
constants dequantized, loaded into the torch model and evaluated ("weights read back"), and every
quantized weight must equal our codes × scales exactly. Core ML predictions need macOS.

Modules: program.py (the program, its constants, the package and reading it back), float16_fit.py (the
float16 range check and the power-of-two rewrite), chunks.py (a large model as several packages),
vision.py (MiniCPM-V's vision package), stage.py (the `coreml` stage).
"""
