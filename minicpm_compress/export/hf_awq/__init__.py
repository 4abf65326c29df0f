"""The Hugging Face AWQ checkpoint (quant_method awq, GEMM packing) holding our int4 codes: checkpoint.py
(packing and reading back), stage.py (the `hf_awq` stage)."""
