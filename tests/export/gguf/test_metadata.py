import gguf
import numpy as np
import pytest

from minicpm_compress.export.gguf.metadata import read_value


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 7)
    writer.add_float32("llama.rope.freq_base", 1e6)
    writer.add_bool("flag", True)
    writer.add_token_list([f"tok{i}" for i in range(1000)])  # an array of strings before the key asked for
    writer.add_array("numbers", [1, 2, 3])
    writer.add_string("tokenizer.chat_template", "{{ messages }} ünïcode")
    writer.add_tensor("w", np.ones((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_values_read_back_as_gguf_py_reads_them(gguf_file):
    reader = gguf.GGUFReader(str(gguf_file))
    field = reader.fields["tokenizer.chat_template"]
    assert read_value(gguf_file, "tokenizer.chat_template") == bytes(field.parts[field.data[0]]).decode()
    assert read_value(gguf_file, "llama.block_count") == 7
    assert read_value(gguf_file, "llama.rope.freq_base") == pytest.approx(1e6)
    assert read_value(gguf_file, "flag") is True
    assert read_value(gguf_file, "numbers") == [1, 2, 3]
    assert read_value(gguf_file, "tokenizer.ggml.tokens")[999] == "tok999"
    assert read_value(gguf_file, "general.architecture") == "llama"
    assert read_value(gguf_file, "absent") is None


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"NOPE" + bytes(40))
    with pytest.raises(ValueError, match="x.gguf: not a GGUF file"):
        read_value(path, "k")
