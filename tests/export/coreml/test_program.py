import hashlib
import sys

import pytest
import torch

from minicpm_compress.errors import CompressError
from minicpm_compress.export.coreml.program import PACKAGE_NAME, QUANTIZED_OP, StatefulDecoder, import_coremltools, blockwise_constants, causal_mask, constant_name, convert_program, fits_coreml, read_back_model, read_back_weights, read_program
from minicpm_compress.export.coreml.float16_fit import SQUARE_LIMIT, activation_peaks, float16_overflow
from minicpm_compress.export.coreml.stage import CoreMLConfig, write_coreml
from minicpm_compress.models.architectures import quantizable_linears
from minicpm_compress.models.source import ModelSource
from minicpm_compress.quant.qweight import QuantScheme, quantize
from minicpm_compress.state import ModelState

from ...conftest import tiny_model


def _state(tokenizer, scheme: QuantScheme | None, every: int = 1, **overrides):
    model = tiny_model("minicpm", **overrides)
    state = ModelState.of(model, tokenizer, ModelSource("tiny", None, "tiny"))
    if scheme:
        state.qweights = {n: quantize(l.weight, scheme)
                          for i, (n, l) in enumerate(quantizable_linears(model).items()) if i % every == 0}
    return state


@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, group_size=32, symmetric=True), QuantScheme(bits=4, group_size=64),
                                    QuantScheme(bits=4, group_size=128, symmetric=True),  # 192 columns: 1.5 groups
                                    QuantScheme(bits=8, group_size=None, symmetric=True), QuantScheme(bits=8, group_size=32)],
                         ids=lambda s: s.describe())
def test_blockwise_constants_are_our_codes_scales_and_zero_points(scheme):
    q = quantize(torch.randn(24, 192) * 0.05, scheme)
    c = blockwise_constants(q)
    data, scale = torch.from_numpy(c["data"].astype("float32")), torch.from_numpy(c["scale"].astype("float32"))
    offset = torch.from_numpy(c["offset"].astype("float32")) if "offset" in c else torch.zeros_like(scale)
    assert 192 % scale.shape[1] == 0
    block = 192 // scale.shape[1]
    dequantized = scale.repeat_interleave(block, 1) * (data - offset.repeat_interleave(block, 1))
    assert torch.equal(dequantized, q.dequantize())
    from coremltools.converters.mil.mil import types

    expected = {(4, True): "int4", (4, False): "uint4", (8, True): "int8", (8, False): "uint8"}
    assert types.builtin_to_string(types.numpy_type_to_builtin_type(c["data"].dtype)) == expected[
        scheme.bits, scheme.symmetric]


def test_layouts_without_a_blockwise_form_are_not_taken_for_lossless():
    w = torch.randn(8, 96)
    assert fits_coreml(quantize(w, QuantScheme(bits=4, group_size=64)), 4)  # 96 columns: blocks of 32
    assert not fits_coreml(quantize(w, QuantScheme(bits=4, group_size=32, zero_point="float")), 4)
    assert not fits_coreml(quantize(w, QuantScheme(layout="IQ4_NL")), 4)  # non-linear levels: requantized
    assert fits_coreml(quantize(w, QuantScheme(bits=8, group_size=32)), 4)  # kept at int8 by a bit budget
    assert not fits_coreml(quantize(w, QuantScheme(bits=4, group_size=32)), 8)  # an int8 package is asked for
    assert fits_coreml(quantize(w, QuantScheme(bits=4, group_size=None)), 4)


def test_stateful_decoder_token_by_token_equals_full_recompute():
    model = tiny_model("minicpm")
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        full = model(ids).logits
        decoder = StatefulDecoder(model, context=16)
        steps = [decoder(ids[:, :5].int(), causal_mask(5))]
        for i in range(5, 9):
            steps.append(decoder(ids[:, i:i + 1].int(), causal_mask(1, past=i)))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.fixture(scope="module")
def int4_package(tmp_path_factory, tokenizer):
    # every second linear carries int4 g32 codes (lossless); the rest are quantized by the exporter
    state = _state(tokenizer, QuantScheme(bits=4, group_size=32, symmetric=True), every=2)
    folder = tmp_path_factory.mktemp("coreml") / "coreml-int4"
    weights, paths = write_coreml(state, folder, CoreMLConfig(bits=4, context=32), "float16")
    return state, folder, weights, paths


def test_int4_package_holds_exactly_our_codes(int4_package):
    from coremltools.converters.mil.mil import types

    state, folder, weights, paths = int4_package
    assert paths == {"lossless": 7, "requantized": 7, "embedding int8 per row": 1}
    stored, ops = read_back_weights(folder / PACKAGE_NAME)
    # 14 decoder linears + the embedding, which the gather and the tied lm_head (15th linear) share
    assert ops[QUANTIZED_OP] == 15 and ops["linear"] == 15
    assert {"read_state", "coreml_update_state", "slice_update"} <= set(ops)  # the KV cache is a Core ML state
    program = read_program(folder / PACKAGE_NAME)
    stored_types = {op.name: types.builtin_to_string(op.data.dtype)
                    for op in program.functions["main"].find_ops(op_type=QUANTIZED_OP)}
    assert stored_types.pop(constant_name("model.embed_tokens")) == "int8"
    assert set(stored_types.values()) == {"int4"}  # packed 4-bit, not widened
    for name, q in weights.items():
        assert torch.equal(stored[constant_name(name)], q.dequantize()), name
        if name in state.qweights:
            assert q is state.qweights[name]
    assert weights["model.embed_tokens"].scheme == QuantScheme(bits=8, group_size=None, symmetric=True)
    assert all(q.scheme == QuantScheme(bits=4, group_size=32, symmetric=True)
               for name, q in weights.items() if name != "model.embed_tokens")
    read_back = read_back_model(state.model, stored, weights, folder / PACKAGE_NAME)
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        state.qweights = weights
        assert torch.equal(read_back(ids).logits, state.evaluated_model()(ids).logits)


def test_a_changed_weight_is_caught_on_read_back(int4_package):
    state, folder, weights, _ = int4_package
    stored, _ = read_back_weights(folder / PACKAGE_NAME)
    name = next(iter(weights))
    stored[constant_name(name)] = stored[constant_name(name)] * 1.001
    with pytest.raises(CompressError, match=name.replace(".", r"\.")):
        read_back_model(state.model, stored, weights, folder / PACKAGE_NAME)


def test_package_is_byte_identical_when_written_again(int4_package, tmp_path):
    state, folder, _, _ = int4_package
    write_coreml(state, tmp_path / "again", CoreMLConfig(bits=4, context=32), "float16")

    def digests(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert digests(folder) == digests(tmp_path / "again")


def test_int8_asymmetric_codes_keep_their_zero_points(tokenizer, tmp_path):
    state = _state(tokenizer, QuantScheme(bits=8, group_size=None), tie_word_embeddings=False)
    weights, paths = write_coreml(state, tmp_path / "c8", CoreMLConfig(bits=8, context=32, embeddings="float"), "float32")
    assert paths == {"lossless": 14, "requantized": 0}
    stored, ops = read_back_weights(tmp_path / "c8" / PACKAGE_NAME)
    assert ops[QUANTIZED_OP] == 14  # embedding and the untied lm_head left unquantized
    for name, q in state.qweights.items():
        assert torch.equal(stored[constant_name(name)], q.dequantize())
    program = read_program(tmp_path / "c8" / PACKAGE_NAME)  # float32 compute: float32 scales, float32 logits
    assert {str(op.scale.val.dtype) for op in program.functions["main"].find_ops(op_type=QUANTIZED_OP)} == {"float32"}
    from coremltools.converters.mil.mil import types

    assert types.builtin_to_string(program.functions["main"].outputs[0].dtype) == "fp32"


def test_float16_check_names_the_module_that_would_overflow():
    model = tiny_model("llama")
    ids = torch.randint(0, 1000, (2, 16))
    peaks = activation_peaks(model, ids)
    assert 0 < peaks["norm_input"]["peak"] < SQUARE_LIMIT and float16_overflow(peaks) is None
    assert peaks["kv_output"]["module"].endswith(("k_proj", "v_proj"))
    assert 0 < peaks["kv_output"]["peak"] <= peaks["linear_output"]["peak"]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e5)
    peaks = activation_peaks(model, ids)
    assert peaks["linear_output"]["module"] == "model.layers.0.mlp.down_proj"
    assert "'model.layers.0.mlp.down_proj' outputs values up to" in float16_overflow(peaks)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e-2)  # fits float16, but its square does not
    assert "squares inputs" in float16_overflow(activation_peaks(model, ids))


def test_untied_lm_head_gets_its_own_int8_constant(tokenizer, tmp_path):
    state = _state(tokenizer, None, tie_word_embeddings=False)
    weights, paths = write_coreml(state, tmp_path / "c4", CoreMLConfig(bits=4, context=32), "float16")
    assert paths == {"lossless": 0, "requantized": 14, "embedding int8 per row": 2}
    stored, _ = read_back_weights(tmp_path / "c4" / PACKAGE_NAME)
    assert torch.equal(stored[constant_name("lm_head")], weights["lm_head"].dequantize())


def test_conversion_errors_name_the_op():
    ct = import_coremltools()

    class Unsupported(torch.nn.Module):
        def forward(self, x):
            return torch.special.erfinv(x) + 1

    with pytest.raises(CompressError, match="cannot convert op 'erfinv'"):
        convert_program(Unsupported(), (torch.rand(2, 3),), [ct.TensorType(name="x", shape=(2, 3))], [],
                        [ct.TensorType(name="y")])


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predictions run only on macOS")
def test_predictions_on_macos_match_torch(int4_package):  # pragma: no cover - needs a Mac
    import numpy as np

    ct = import_coremltools()
    state, folder, weights, _ = int4_package
    mlmodel = ct.models.MLModel(str(folder / PACKAGE_NAME))
    kv = mlmodel.make_state()
    ids = np.random.default_rng(0).integers(0, 1000, (1, 8)).astype(np.int32)
    out = mlmodel.predict({"input_ids": ids, "causal_mask": causal_mask(8).numpy().astype(np.float16)}, state=kv)
    state.qweights = weights
    with torch.no_grad():
        expected = state.evaluated_model()(torch.from_numpy(ids).long()).logits
    assert (torch.from_numpy(out["logits"].astype(np.float32)).argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_a_model_that_overflows_float16_is_rewritten_to_fit_it(tmp_path, tokenizer):
    """auto precision on a model with a massive activation: the power-of-two rewrite makes the range check
    pass, the package computes in float16 and its weights (our codes, scales shifted) read back exactly."""
    from minicpm_compress.models.checkpoint import save_checkpoint
    from minicpm_compress.pipeline import run_recipe
    from minicpm_compress.recipe import build_recipe

    from .test_float16_fit import massive

    save_checkpoint(massive("minicpm"), tokenizer, tmp_path / "m")
    recipe = build_recipe(model=str(tmp_path / "m"), data={"eval_tokens": 512, "eval_window": 128,
                                                           "calibration_samples": 4, "sequence_length": 64},
                          stages=[{"rtn": {"bits": 4, "group_size": 32, "symmetric": True}},
                                  {"coreml": {"bits": 4, "context": 64}}])
    _load, rtn, coreml = run_recipe(recipe, tmp_path / "o").stages
    details = coreml.details
    assert "down_proj' outputs values up to" in details["float16_check"]["overflow"]  # as the model was
    fit = details["float16_fit"]
    assert details["precision"] == "float16" and fit["fits"] and fit["stream_shift"] > 0 and fit["mlp_shifts"]
    assert fit["largest_after"]["peak"] < 65504
    assert details["linears"]["lossless"] == 14  # the shifted scales hold the same codes
    assert abs(coreml.metrics.kld - rtn.metrics.kld) < 1e-3  # the same function, read back, in float32
    simulated = details["float16_simulation"]  # and run in float16 (torch), against itself in float32
    assert simulated["finite"] and simulated["kld"] < 0.01 and simulated["top1"] > 0.9

