import numpy as np
import onnx
import pytest
import torch

from minicpm_compress.export.onnx.stage import OnnxConfig, write_onnx
from minicpm_compress.export.onnx.runner import OnnxRunner
from minicpm_compress.export.onnx.graph import fits_matmul_nbits, pack_matmul_nbits, table_blocks
from minicpm_compress.models.architectures import quantizable_linears
from minicpm_compress.models.source import ModelSource
from minicpm_compress.quant.qweight import QuantScheme, quantize
from minicpm_compress.state import ModelState

from ...conftest import tiny_model

SCHEMES = [
    QuantScheme(bits=4, group_size=32, symmetric=True),
    QuantScheme(bits=4, group_size=64),
    QuantScheme(bits=4, group_size=None),
    QuantScheme(bits=8, group_size=None, symmetric=True),
    QuantScheme(bits=8, group_size=128),
]


def _single_node_session(packed: dict, n: int, k: int, bits: int, block: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("MatMulNBits", ["A", *packed], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(v, name) for name, v in packed.items()])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17),
                                                                  helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_matmulnbits_holds_exactly_our_dequantized_weight(scheme):
    torch.manual_seed(0)
    weight = torch.randn(24, 200) * 0.05  # 200 columns: a partial last block
    q = quantize(weight, scheme)
    session = _single_node_session(pack_matmul_nbits(q, 32), 24, 200, scheme.bits, 32)
    through_onnxruntime = session.run(None, {"A": np.eye(200, dtype=np.float32)})[0]
    assert np.array_equal(through_onnxruntime, q.dequantize().T.numpy())


def test_layouts_that_do_not_fit_blocks_are_not_taken_for_lossless():
    w = torch.randn(8, 64)
    assert not fits_matmul_nbits(quantize(w, QuantScheme(bits=4, group_size=16)), 32)
    assert not fits_matmul_nbits(quantize(w, QuantScheme(bits=4, group_size=32, zero_point="float")), 32)
    assert fits_matmul_nbits(quantize(w, QuantScheme(bits=4, group_size=64)), 32)
    assert not fits_matmul_nbits(quantize(w, QuantScheme(layout="IQ4_NL")), 32)  # non-linear levels: requantized
    assert fits_matmul_nbits(quantize(w, QuantScheme(layout="Q4_0")), 32)


@pytest.fixture(scope="module")
def int4_folder(tmp_path_factory, tokenizer):
    model = tiny_model("minicpm")
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    scheme = QuantScheme(bits=4, group_size=32, symmetric=True)
    state.qweights = {n: quantize(l.weight, scheme) for n, l in quantizable_linears(model).items()}
    folder = tmp_path_factory.mktemp("onnx") / "onnx-int4"
    paths = write_onnx(state, folder, OnnxConfig(bits=4, accuracy_level=0, embeddings="float"))  # exact settings
    return state, folder, paths


def test_int4_graph_holds_our_codes_and_computes_like_the_gated_torch_model(int4_folder):
    state, folder, paths = int4_folder
    assert paths == {"lossless": 14, "requantized": 0}
    ops = [n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 10  # q|k|v packed into one node per layer
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gated = state.evaluated_model()(ids).logits
    ours = OnnxRunner(folder / "model.onnx", state.model.config).logits(ids)
    assert (ours - gated).abs().max().item() < 1e-4


def test_kv_cache_decode_equals_full_recompute(int4_folder):
    state, folder, _ = int4_folder
    runner = OnnxRunner(folder / "model.onnx", state.model.config)
    ids = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(1)).numpy()
    full, _ = runner.run(ids)
    prefix, cache = runner.run(ids[:, :5])
    steps = [prefix]
    for t in range(5, 9):  # one token at a time, feeding the cache back
        logits, cache = runner.run(ids[:, t : t + 1], cache, t)
        steps.append(logits)
    assert np.abs(np.concatenate(steps, axis=1) - full).max() < 1e-5


def test_onnxruntime_genai_generates_the_greedy_continuation(int4_folder):
    import onnxruntime_genai as og

    state, folder, _ = int4_folder
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    prompt = state.tokenizer("It is a truth universally acknowledged", add_special_tokens=False)["input_ids"]
    assert list(tokenizer.encode("It is a truth universally acknowledged")) == prompt
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 8)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    generated = list(generator.get_sequence(0))
    expected = list(prompt)  # greedy decoding with the gated torch model
    fake = state.evaluated_model()
    with torch.no_grad():
        for _ in range(8):
            expected.append(int(fake(torch.tensor([expected])).logits[0, -1].argmax()))
    assert generated == expected
    assert len(tokenizer.decode(generated)) > len("It is a truth universally acknowledged")


def test_dynamic_int8_is_recorded_and_close_to_float(tmp_path, tokenizer):
    model = tiny_model("llama")
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    paths = write_onnx(state, tmp_path / "d", OnnxConfig(bits=8, int8="dynamic"))
    assert paths == {"dynamic int8 (onnxruntime)": 14}
    ops = [n.op_type for n in onnx.load(str(tmp_path / "d/model.onnx")).graph.node]
    assert ops.count("MatMulInteger") == 14  # every decoder linear; attention and the tied lm_head stay float
    ids = torch.randint(0, 49152, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    ours = OnnxRunner(tmp_path / "d/model.onnx", model.config).logits(ids)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75
    # onnxruntime's int8 kernels differ by CPU (AVX2 without VNNI sums pairs in int16): the largest error
    # measured 0.106 × max|logit| on such a CPU and under 0.1 × on CI's; wrong weights give ~1×
    assert (ours - ref).abs().max().item() < 0.2 * ref.abs().max().item()


def test_accuracy_level_4_is_written_and_stays_close(tmp_path, int4_folder):
    state, _, _ = int4_folder
    write_onnx(state, tmp_path / "a4", OnnxConfig(bits=4, accuracy_level=4, embeddings="float"))
    nodes = [n for n in onnx.load(str(tmp_path / "a4/model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 10
    assert all(onnx.helper.get_attribute_value(a) == 4 for n in nodes for a in n.attribute if a.name == "accuracy_level")
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gated = state.evaluated_model()(ids).logits
    ours = OnnxRunner(tmp_path / "a4/model.onnx", state.model.config).logits(ids)
    # int8 activations: no longer exact, but close
    assert 0 < (ours - gated).abs().max().item() < 0.05 * gated.abs().max().item()
    assert (ours.argmax(-1) == gated.argmax(-1)).float().mean() >= 0.75  # a random tiny model: near-ties


@pytest.mark.parametrize("settings, expected", [({"bits": 4}, True), ({"bits": 8}, True),
                                                ({"bits": 8, "int8": "dynamic"}, False), ({"bits": 32}, False),
                                                ({"bits": 4, "int8": "dynamic"}, True)])  # int8 ignored at 4 bits
def test_only_matmul_nbits_graphs_take_an_accuracy_level(settings, expected):
    assert OnnxConfig(**settings).matmul_nbits is expected


def test_minicpm4_longrope_untied_head_export_computes_like_torch(tmp_path, tokenizer):
    """LongRoPE, an untied head and a vocabulary larger than the tokenizer's, through the streamed writer:
    the float graph computes what torch computes, and its weights live in model.onnx.data."""
    rope = {"rope_type": "longrope", "original_max_position_embeddings": 1024,
            "long_factor": [1.0 + 0.37 * i for i in range(8)], "short_factor": [1.0 + 0.21 * i for i in range(8)]}
    model = tiny_model("minicpm", rope_scaling=rope, max_position_embeddings=1024, tie_word_embeddings=False,
                       vocab_size=49152 + 64)
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    write_onnx(state, tmp_path / "f", OnnxConfig(bits=32))
    assert (tmp_path / "f/model.onnx").stat().st_size < 1e6 < (tmp_path / "f/model.onnx.data").stat().st_size
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = model(ids).logits
    ours = OnnxRunner(tmp_path / "f/model.onnx", model.config).logits(ids)
    assert ours.shape[-1] == 49152 + 64 and (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("model_type", ["llama", "minicpm"])
def test_embedding_and_tied_head_are_blocks_sharing_one_table(tmp_path, tokenizer, bits, model_type):
    """GatherBlockQuantized looks rows up and MatMulNBits computes the head from the same codes and scales:
    the graph computes exactly the model whose table (and linears) hold our dequantized blocks."""
    model = tiny_model(model_type)
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    write_onnx(state, tmp_path, OnnxConfig(bits=8, embeddings=f"int{bits}", accuracy_level=0))
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 10 + 1
    table = [i for i in graph.initializer if i.name.endswith(".B") and i.dims[0] == 49152]
    assert len(table) == 1 and [d for d in table[0].dims] == [49152, 64 // 32, 32 * bits // 8]  # one copy
    assert not any(49152 in i.dims and i.data_type == onnx.TensorProto.FLOAT for i in graph.initializer)
    zero_points = [i.name for i in graph.initializer if "zero_points" in i.name]
    assert len(zero_points) == (2 if bits == 4 else 0)  # int4 blocks: packed for the head, one per byte for the lookup

    expected = tiny_model(model_type).eval()
    with torch.no_grad():
        for name in quantizable_linears(expected):
            linear = expected.get_submodule(name)
            linear.weight.copy_(quantize(linear.weight, QuantScheme(bits=8, group_size=32, symmetric=True)).dequantize())
        table_weight = expected.get_input_embeddings().weight
        table_weight.copy_(table_blocks(table_weight, bits, 32).dequantize())
    ids = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(1))
    got = OnnxRunner(tmp_path / "model.onnx", state.config).logits(ids)
    assert torch.allclose(got, expected(ids).logits, atol=2e-4, rtol=1e-4)
    size = sum(p.stat().st_size for p in tmp_path.glob("model.onnx*"))
    assert size < (0.3 if bits == 8 else 0.17) * 49152 * 64 * 4 + 2e6  # the table was 12.6 MB as float32


def test_table_blocks_clip_where_it_helps_and_int4_blocks_carry_zero_points():
    torch.manual_seed(0)
    table = torch.randn(300, 96) * torch.rand(300, 1)
    table[::7, 5] *= 12  # outliers, as real tables have

    def error(q):
        return ((q.dequantize() - table) ** 2).sum().item()

    for bits in (8, 4):
        q = table_blocks(table, bits, 32, rows_per_chunk=128)
        assert q.scheme.symmetric is (bits == 8) and q.shape == (300, 96)
        plain = quantize(table, q.scheme)
        assert error(q) <= error(plain)
        assert bits == 8 or error(q) < 0.9 * error(quantize(table, QuantScheme(bits=4, group_size=32, symmetric=True)))
        whole = table_blocks(table, bits, 32, rows_per_chunk=1000)  # chunks are only a memory bound
        for part in ("packed", "scales", "zeros"):
            assert (getattr(q, part) is None and getattr(whole, part) is None) or torch.equal(getattr(q, part),
                                                                                                getattr(whole, part))
    half = table.to(torch.bfloat16)  # a bf16 table is read as such, each chunk widened exactly
    assert torch.equal(table_blocks(half, 4, 32, rows_per_chunk=128).dequantize(),
                       table_blocks(half.float(), 4, 32, rows_per_chunk=300).dequantize())


def test_auto_accuracy_level_times_both_levels_and_keeps_the_chosen_one(tmp_path, tiny_checkpoint):
    import json

    from minicpm_compress.errors import GateFailure
    from minicpm_compress.export.onnx.stage import LEVEL_MARGIN
    from minicpm_compress.pipeline import run_recipe
    from minicpm_compress.recipe import build_recipe

    def recipe(gate=None):
        return build_recipe(model=str(tiny_checkpoint("llama")), data={"eval_tokens": 512, "eval_window": 128},
                            stages=[{"rtn": {"bits": 8, "group_size": None, "symmetric": True}},
                                    {"onnx": {"bits": 8, **({"gate": gate} if gate else {})}}])

    details = run_recipe(recipe(), tmp_path / "o").stages[2].details
    choice = details["accuracy_level_choice"]
    speed = choice["decode_tokens_per_s"]
    assert set(speed) == {0, 4} and min(speed.values()) > 0
    first = 4 if speed[4] >= LEVEL_MARGIN * speed[0] else 0
    assert details["accuracy_level"] == first and choice["measured"] == [first]  # no gate: the first one stays
    nodes = [n for n in onnx.load(str(tmp_path / "o/onnx-int8/model.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    assert len(nodes) == 11 and {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"} == {first}
    # a gate neither level meets: both are measured, the stage fails
    with pytest.raises(GateFailure):
        run_recipe(recipe({"max_kld": 1e-12}), tmp_path / "f")
    failed = json.loads((tmp_path / "f/manifest.json").read_text())["stages"][2]["details"]
    assert failed["accuracy_level_choice"]["measured"] == [0, 4]


def test_an_untied_head_gets_its_own_blocks_and_partial_blocks_are_sliced(tmp_path, tokenizer):
    model = tiny_model("llama", tie_word_embeddings=False)
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    write_onnx(state, tmp_path, OnnxConfig(bits=8, block_size=128, embeddings="int8", accuracy_level=0))
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 11 and "Slice" in ops
    assert len([i for i in graph.initializer if i.name.endswith(".B") and i.dims[0] == 49152]) == 2  # table, head
    expected = tiny_model("llama", tie_word_embeddings=False).eval()
    scheme = QuantScheme(bits=8, group_size=128, symmetric=True)
    with torch.no_grad():
        for module in quantizable_linears(expected).values():
            module.weight.copy_(quantize(module.weight, scheme).dequantize())
        for module in (expected.get_input_embeddings(), expected.lm_head):
            module.weight.copy_(table_blocks(module.weight, 8, 128).dequantize())
    ids = torch.randint(0, 49152, (1, 7), generator=torch.Generator().manual_seed(2))
    got = OnnxRunner(tmp_path / "model.onnx", state.config).logits(ids)
    assert torch.allclose(got, expected(ids).logits, atol=2e-4, rtol=1e-4)
