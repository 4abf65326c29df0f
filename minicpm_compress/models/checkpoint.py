"""Read and write Hugging Face checkpoint folders (config.json + safetensors + tokenizer files).

Nothing from the checkpoint is executed unless the caller passes `trust_remote_code=True`, and pickle
weights (`*.bin`) are refused unless the caller passes `allow_pickle=True`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import atomic
from ..errors import CompressError
from .architectures import ARCHITECTURES

WEIGHTS_NAME = "model.safetensors"


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CompressError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CompressError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise CompressError(f"{path}: missing key 'model_type'")
    return raw


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CompressError(f"{path}: unreadable safetensors file ({e})") from None


def _read_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise CompressError(
            f"{path}: pickle weights are refused by default (they can run code); convert to safetensors "
            "or pass --allow-pickle"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def read_weights(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, single-file or sharded (via its index.json)."""
    folder = Path(folder)
    for index_name, reader in (
        ("model.safetensors.index.json", _read_safetensors),
        ("pytorch_model.bin.index.json", lambda p: _read_pickle(p, allow_pickle)),
    ):
        index_path = folder / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CompressError(f"{index_path}: not a valid shard index (needs a 'weight_map' object)") from None
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise CompressError(f"{index_path}: shard '{shard}' listed but missing")
                tensors.update(reader(folder / shard))
            return tensors
    if (folder / WEIGHTS_NAME).is_file():
        return _read_safetensors(folder / WEIGHTS_NAME)
    if (folder / "pytorch_model.bin").is_file():
        return _read_pickle(folder / "pytorch_model.bin", allow_pickle)
    raise CompressError(f"{folder}: no weights found (expected {WEIGHTS_NAME} or a sharded index)")


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CompressError(f"{folder}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None


def load_checkpoint(folder: Path, *, allow_pickle: bool = False, trust_remote_code: bool = False):
    """(float32 model in eval mode, tokenizer) from a checkpoint folder."""
    folder = Path(folder)
    raw = read_config(folder)
    if trust_remote_code:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32)
        return model.eval(), load_tokenizer(folder)
    arch = ARCHITECTURES.get(raw["model_type"])
    if arch is None:
        raise CompressError(
            f"{folder / 'config.json'}: model_type '{raw['model_type']}' is not supported "
            f"(supported: {', '.join(sorted(ARCHITECTURES))}; other types need --trust-remote-code)"
        )
    config = arch.config_class.from_dict({k: v for k, v in raw.items() if k not in ("auto_map", "architectures")})
    tensors = read_weights(folder, allow_pickle)
    model = arch.model_class(config)
    load_state(model, tensors, source=folder)
    return model.eval(), load_tokenizer(folder)


def load_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `tensors` into `model` (as float32), naming any missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    for name, tensor in tensors.items():
        if name not in expected:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise CompressError(f"{source}: unexpected tensor '{name}' for {model.config.model_type}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CompressError(
                f"{source}: tensor '{name}' has shape {tuple(tensor.shape)}, config expects {tuple(expected[name].shape)}"
            )
    missing = [n for n in expected if n not in tensors and n not in tied]
    if missing:
        raise CompressError(f"{source}: missing tensor '{missing[0]}'" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    with torch.no_grad():
        model.load_state_dict({k: v.float() for k, v in tensors.items() if k in expected}, strict=False)
    model.float()


def save_checkpoint(model: torch.nn.Module, tokenizer, folder: Path, tensors: dict[str, torch.Tensor] | None = None,
                    config_updates: dict | None = None) -> None:
    """Write config.json, model.safetensors and the tokenizer files.

    By default the weights are the model's float32 state dict with tied weights stored once; exporters
    pass their own `tensors` (and `config_updates`, e.g. a quantization_config).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    for key in ("transformers_version", "_name_or_path", "quantization_config", "auto_map"):
        config.pop(key, None)
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
