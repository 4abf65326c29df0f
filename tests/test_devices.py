"""The runtimes that verify an artifact compute on as many CPU threads as torch does."""

import torch

from minicpm_compress.devices import cpu_threads
from minicpm_compress.export.gguf.llama_cpp import LlamaCppRunner
from minicpm_compress.export.gguf.writer import write_gguf
from minicpm_compress.export.onnx.runner import OnnxRunner
from minicpm_compress.export.onnx.stage import OnnxConfig, write_onnx
from minicpm_compress.models.source import ModelSource
from minicpm_compress.state import ModelState

from .conftest import tiny_model


def test_llama_cpp_and_onnxruntime_take_torchs_thread_count(tmp_path, tokenizer):
    state = ModelState.of(tiny_model("llama"), tokenizer, ModelSource("tiny", None, "tiny"))
    write_gguf(state, tmp_path / "m.gguf", "F32")
    write_onnx(state, tmp_path / "onnx", OnnxConfig(bits=32, accuracy_level=0, embeddings="float"))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert cpu_threads() == threads
            runner = LlamaCppRunner(tmp_path / "m.gguf", 16)
            try:
                assert runner.llm.context_params.n_threads == threads
                assert runner.llm.context_params.n_threads_batch == threads
            finally:
                runner.close()
            options = OnnxRunner(tmp_path / "onnx" / "model.onnx", state.config).session.get_session_options()
            assert options.intra_op_num_threads == threads
    finally:
        torch.set_num_threads(before)
