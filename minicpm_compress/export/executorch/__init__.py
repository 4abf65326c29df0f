"""ExecuTorch for Android and iOS: a decoder program (.pte) with a static KV cache, lowered to XNNPACK, run
in ExecuTorch's own runtime.

    forward(tokens [1, S], input_pos [1]) → logits [1, S, vocab]

The cache lives in the program's mutable buffers and is written by ExecuTorch's `llama::update_cache`;
attention is its `llama::custom_sdpa` (causal from input_pos), as in ExecuTorch's own LLM exports.

Weights (recorded per path in the manifest):
  * lossless: decoder linears whose codes XNNPACK holds exactly — symmetric int4 in groups dividing the
    row, or int8 per channel, with positive bfloat16-exact scales (`scale_dtype: bfloat16` in the
    quantizing stage) — go in as they are, as torchao tensors with int8 per-token activations ("8da4w");
  * requantized: every other linear, by the project's RTN to that scheme;
  * refused: codes with zero points (XNNPACK drops them silently), unless `zero_points: requantize`.
The token table is int8 per row (ExecuTorch's embedding_byte kernel), the head an int8 per-channel linear.

Modules: program.py (the wrapper, our codes in torchao tensors, lowering), runner.py, stage.py.
"""
