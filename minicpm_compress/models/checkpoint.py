"""Read and write Hugging Face checkpoint folders (config.json + safetensors + tokenizer files).

Nothing from the checkpoint is executed unless the caller passes `trust_remote_code=True`, and pickle
weights (`*.bin`) are refused unless the caller passes `allow_pickle=True`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .. import atomic
from ..errors import CompressError
from .architectures import ARCHITECTURES
from .tensors import FLOAT_DTYPES, WEIGHTS_NAME, CheckpointTensors


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CompressError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CompressError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise CompressError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise CompressError(f"{path}: missing key 'model_type'")
    return raw


def read_weights(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, single-file or sharded, in their own dtypes (small models only)."""
    tensors = CheckpointTensors(folder, allow_pickle)
    return {name: tensors.get(name) for name in tensors.names()}


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # it warns that config.json's model_type (e.g. minicpmv) is not a tokenizer's
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CompressError(f"{folder}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    finally:
        logging.set_verbosity(verbosity)


def supported_config(folder: Path, raw: dict | None = None):
    """The typed config of a checkpoint folder whose model_type this package implements."""
    raw = raw or read_config(folder)
    arch = ARCHITECTURES.get(raw["model_type"])
    if arch is None:
        raise CompressError(
            f"{Path(folder) / 'config.json'}: model_type '{raw['model_type']}' is not supported "
            f"(supported: {', '.join(sorted(ARCHITECTURES))}; other types need --trust-remote-code)"
        )
    path = Path(folder) / "config.json"
    check_shape_settings(raw, path)
    settings = {k: v for k, v in raw.items() if k not in ("auto_map", "architectures")}
    try:
        return arch.config_class.from_dict(settings)
    except Exception as e:  # noqa: BLE001 - transformers raises its own validation errors; say which setting
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CompressError(f"{path}: invalid settings ({lines[-1] if lines else type(e).__name__})") from None


# the settings every decoder's shapes follow from: positive integers, heads dividing as attention needs
_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim")


def check_shape_settings(raw: dict, path: Path) -> None:
    """One-line errors naming the key for shape settings of the wrong type, out of range or inconsistent."""
    for key in _SHAPE_KEYS:
        value = raw.get(key)
        if value is None and key in ("num_key_value_heads", "head_dim", "intermediate_size"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CompressError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    heads, kv = raw["num_attention_heads"], raw.get("num_key_value_heads") or raw["num_attention_heads"]
    if heads % kv:
        raise CompressError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if raw.get("head_dim") is None and raw["hidden_size"] % heads:
        raise CompressError(f"{path}: hidden_size {raw['hidden_size']} is not a multiple of "
                            f"num_attention_heads {heads} (and no head_dim is given)")


def check_tensors(weights, skeleton: torch.nn.Module, source) -> None:
    """Every parameter the config expects is present with its shape and a float dtype; nothing else is."""
    expected = {n: tuple(p.shape) for n, p in untied_state_dict(skeleton).items()}
    tied = set(getattr(skeleton, "_tied_weights_keys", None) or {}) if skeleton.config.tie_word_embeddings else set()
    for name in weights.names():
        if name not in expected:
            if name.endswith("rotary_emb.inv_freq") or name in tied:  # a stored copy of a tied weight is ignored
                continue
            raise CompressError(f"{source}: unexpected tensor '{name}' for {skeleton.config.model_type}")
        if weights.shape(name) != expected[name]:
            raise CompressError(
                f"{source}: tensor '{name}' has shape {weights.shape(name)}, config expects {expected[name]}"
            )
        if name not in weights.overrides and weights.base.dtype(name) not in FLOAT_DTYPES:
            raise CompressError(f"{source}: tensor '{name}' is {weights.base.dtype(name)}, expected a float dtype")
    missing = [n for n in expected if n not in weights]
    if missing:
        raise CompressError(f"{source}: missing tensor '{missing[0]}'" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))


def save_checkpoint(model: torch.nn.Module, tokenizer, folder: Path, tensors: dict[str, torch.Tensor] | None = None,
                    config_updates: dict | None = None, config: dict | None = None) -> None:
    """Write config.json, model.safetensors and the tokenizer files.

    By default the weights are the model's float32 state dict with tied weights stored once and the config
    is the model's; exporters pass their own `tensors` (and `config_updates`, e.g. a quantization_config,
    or a whole `config`, e.g. a MiniCPM-V one).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config) if config is not None else config_dict(model.config)
    config["dtype"] = "float32"
    config.update(config_updates or {})
    atomic.write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tensors is None:
        state = untied_state_dict(model)
        tensors = {k: v.detach().to(torch.float32) for k, v in state.items()}
    tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
    atomic.save_safetensors(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
        # transformers 5 does not write a SentencePiece model back; exporters (GGUF) need it
        spm = Path(getattr(tokenizer, "vocab_file", None) or "")
        if spm.suffix == ".model" and spm.is_file() and not (folder / "tokenizer.model").is_file():
            atomic.write_bytes(folder / "tokenizer.model", spm.read_bytes())


def checkpoint_from_gguf(gguf: Path, out: Path, architectures: list[str] | None = None) -> None:
    """A float32 checkpoint folder (weights, config, tokenizer) from a GGUF file, dequantized by transformers'
    GGUF reader; `architectures` written to config.json when given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "architectures"):
        settings.pop(key, None)
    if architectures:
        settings["architectures"] = architectures
    model = type(loaded)(type(loaded.config).from_dict(settings))
    model.load_state_dict(loaded.state_dict())
    del loaded
    save_checkpoint(model.eval(), tokenizer, out)


def config_dict(config) -> dict:
    """A config as written to config.json (without the keys that name a writer, a path or remote code)."""
    d = config.to_dict()
    for key in ("transformers_version", "_name_or_path", "quantization_config", "auto_map"):
        d.pop(key, None)
    return d


def untied_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied copies (e.g. lm_head.weight = embeddings) left out."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        for key in getattr(model, "_tied_weights_keys", None) or {}:
            state.pop(key, None)
    return state


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config and every tensor of the model: equal fingerprints, equal function."""
    h = hashlib.sha256()
    config = model.config.to_dict()
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "quantization_config"):
        config.pop(key, None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
