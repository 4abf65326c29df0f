"""GGUF for llama.cpp: writer.py (the file, streamed a tensor at a time), blocks.py (our codes packed into
llama.cpp's blocks), pretokenizers.py (llama.cpp's pre-tokenizer names), mixture.py (`type: auto`),
imatrix.py (the importance matrix), mmproj.py (MiniCPM-V's vision file and the mtmd runner), runner.py
(llama.cpp as a runner) and stage.py (the `gguf` stage)."""
