"""The model state that flows from stage to stage, held as weights rather than as a model.

A `ModelState` never needs the whole model in memory. Its `Weights` are a tensor source (a checkpoint
read lazily, or tensors already in memory) plus what stages changed: `overrides` (float tensors that
replace the source's, e.g. healed or pruned layers, AWQ-folded norms) and `ops` (per tensor, an ordered
list of column multiplications and row divisions: AWQ's folded scales, kept as vectors so that the
scaled float weights never need storing). Quantized linears are `qweights`, packed.

Stages work through three doors:
  * `state.modules(prefix, …)` materialises the parameters under some prefixes (one decoder layer,
    the embedding, the head) on the compute device and dtype inside a model skeleton whose other
    parameters stay on the meta device, and releases them afterwards; this is how the streamed stages
    (evaluation, rtn, awq, prune scores) walk the model, one layer at a time;
  * `state.tensor(name)` gives one float32 tensor (gguf and onnx write files this way);
  * `state.materialize()` builds the whole float model, for the stages that train, cut or convert it
    as a whole (qat, heal, prune surgery, coreml, hf_awq); those that change it hand the result back
    with `state.commit(model)`, which keeps only the tensors that differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch

from .models import minicpmv
from .models.architectures import Architecture, architecture_of, layer_prefix
from .models.source import ModelSource
from .models.tensors import MemoryTensors, PrefixedTensors
from .quant.qweight import QuantizedWeight

CHANGES_FORMAT = "minicpm-compress-modified/1"


class Weights:
    """name → tensor: a source plus overrides and column/row scale ops, each tensor materialised on demand."""

    def __init__(self, base, names: list[str] | None = None):
        self.base = base
        self.overrides: dict[str, torch.Tensor] = {}
        self.ops: dict[str, list[tuple[str, torch.Tensor]]] = {}
        self._names = list(names) if names is not None else base.names()
        self._source_names = list(self._names)

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self.overrides or name in self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.overrides[name].shape) if name in self.overrides else self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """The dtype `get(name, dtype=None)` returns: the checkpoint's for an untouched tensor, else float32."""
        if name in self.overrides:
            return self.overrides[name].dtype
        return torch.float32 if self.ops.get(name) else self.base.dtype(name)

    def get(self, name: str, dtype: torch.dtype | None = torch.float32, device="cpu") -> torch.Tensor:
        """The tensor as the model computes with it: source or override, then its ops, in `dtype` (None:
        as stored, when no op applies)."""
        source = self.overrides[name] if name in self.overrides else self.base.get(name)
        ops = self.ops.get(name, ())
        t = source.to(torch.float32) if ops else source
        for op, s in ops:
            if op == "col":
                t = t * s.unsqueeze(0)
            else:  # "row": divide output rows (a weight's dim 0, a bias or norm weight)
                t = t / (s.unsqueeze(1) if t.dim() == 2 else s)
        t = t.to(device=device, dtype=dtype or t.dtype)
        return t.clone() if t is source else t  # callers may change what they get

    # what a stage changed is held on the CPU, whatever device computed it (layers are materialised from here)
    def scale_columns(self, name: str, s: torch.Tensor) -> None:
        self.ops.setdefault(name, []).append(("col", s.detach().to("cpu", torch.float32).clone()))

    def divide_rows(self, name: str, s: torch.Tensor) -> None:
        self.ops.setdefault(name, []).append(("row", s.detach().to("cpu", torch.float32).clone()))

    def set(self, name: str, tensor: torch.Tensor) -> None:
        self.overrides[name] = tensor.detach().to("cpu", torch.float32).clone()
        self.ops.pop(name, None)
        if name not in self._names:
            self._names.append(name)

    def keep_only(self, names: list[str]) -> None:
        keep = set(names)
        self._names = sorted(keep)
        for d in (self.overrides, self.ops):
            for name in [n for n in d if n not in keep]:
                del d[name]

    def ignore(self, names: set[str]) -> None:
        """Leave out tensors the model does not use (a stored copy of a tied head, rotary buffers)."""
        self._names = [n for n in self._names if n not in names]
        self._source_names = [n for n in self._source_names if n not in names]

    def changed(self) -> bool:
        return bool(self.overrides or self.ops) or sorted(self._names) != sorted(self._source_names)

    def save_changes(self, path) -> None:
        """Overrides, ops and the tensor list in one safetensors file (what an output folder stores)."""
        from . import atomic

        tensors = {f"override/{n}": t.contiguous() for n, t in sorted(self.overrides.items())}
        for name in sorted(self.ops):
            for k, (_op, s) in enumerate(self.ops[name]):
                tensors[f"op/{name}/{k}"] = s.contiguous()
        header = {"format": CHANGES_FORMAT, "names": sorted(self._names),
                  "ops": {n: [op for op, _ in self.ops[n]] for n in sorted(self.ops)}}
        atomic.save_safetensors(tensors, path, {"minicpm_compress": json.dumps(header, sort_keys=True)})

    def load_changes(self, path) -> None:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        from .errors import CompressError

        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                header = json.loads((f.metadata() or {}).get("minicpm_compress", "{}"))
            if header.get("format") != CHANGES_FORMAT:
                raise CompressError(f"{path}: not a {CHANGES_FORMAT} file")
            self._names = list(header["names"])
            for key, t in tensors.items():
                if key.startswith("override/"):
                    self.overrides[key.removeprefix("override/")] = t
            for name, ops in header["ops"].items():
                self.ops[name] = [(op, tensors[f"op/{name}/{k}"]) for k, op in enumerate(ops)]
        except (SafetensorError, OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CompressError(f"{path}: unreadable modified-weights file ({e})") from None

    def fingerprint(self, config_json: str) -> str:
        h = hashlib.sha256(config_json.encode())
        h.update(self.base.fingerprint().encode())
        h.update(json.dumps(self._names).encode())
        for name in sorted(self.overrides):
            h.update(name.encode())
            h.update(self.overrides[name].contiguous().numpy().tobytes())
        for name in sorted(self.ops):
            for op, s in self.ops[name]:
                h.update(f"{name}:{op}".encode())
                h.update(s.numpy().tobytes())
        return h.hexdigest()


def _config_json(config) -> str:
    d = config.to_dict()
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "quantization_config"):
        d.pop(key, None)
    return json.dumps(d, sort_keys=True, default=str)


def set_param(model: torch.nn.Module, name: str, tensor: torch.Tensor, requires_grad: bool) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=requires_grad)


def build_skeleton(config, arch: Architecture) -> torch.nn.Module:
    """The model with every parameter on the meta device (no memory) and real rotary buffers."""
    with torch.device("meta"):
        model = arch.model_class(config)
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None:
        model.model.rotary_emb = type(rotary)(config=config)
    return model.eval()


class ModelState:
    def __init__(self, config, tokenizer, source: ModelSource, weights: Weights,
                 qweights: dict[str, QuantizedWeight] | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.config = config
        self.tokenizer = tokenizer
        self.source = source
        self.weights = weights
        self.qweights: dict[str, QuantizedWeight] = qweights or {}  # linear name → quantized weight
        self.device = torch.device(device)
        self.dtype = dtype
        self._skeleton = None
        self._model = None
        self.vision = None  # a MiniCPM-V model's vision half (models.minicpmv.VisionPart), None for an LLM

    @classmethod
    def of(cls, model: torch.nn.Module, tokenizer, source: ModelSource,
           qweights: dict[str, QuantizedWeight] | None = None) -> "ModelState":
        """A state whose source is an in-memory model (its tensors are shared, not copied)."""
        from .models.checkpoint import untied_state_dict

        tensors = {k: v.detach() for k, v in untied_state_dict(model).items()}
        return cls(model.config, tokenizer, source, Weights(MemoryTensors(tensors)), qweights)

    @classmethod
    def open(cls, source: ModelSource, *, allow_pickle: bool = False, trust_remote_code: bool = False,
             device: str = "cpu", dtype: torch.dtype = torch.float32) -> "ModelState":
        """The state of a built-in model, checkpoint or output folder; no weight is read yet."""
        from .errors import CompressError
        from .models.checkpoint import check_tensors, load_tokenizer, read_config, supported_config, untied_state_dict
        from .models.tensors import CheckpointTensors
        from .quant.qweight import load_qweights

        folder = source.checkpoint
        if trust_remote_code:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32)
            return cls.of(model.eval(), load_tokenizer(folder), source)
        config_folder = source.config.parent if source.config else folder
        raw = read_config(config_folder)
        tensors = CheckpointTensors(folder, allow_pickle)
        if source.weights_sha256 and tensors.fingerprint() != source.weights_sha256:
            raise CompressError(f"{folder}: its weights changed since {source.spec} was made from it "
                                f"(sha256 {tensors.fingerprint()[:12]}… ≠ recorded {source.weights_sha256[:12]}…)")
        vision = None
        if minicpmv.is_minicpmv(raw):  # the LLM is the `llm.*` tensors under their plain names
            vision = minicpmv.VisionPart(minicpmv.vlm_settings(raw, config_folder / "config.json"), raw,
                                         PrefixedTensors(tensors, minicpmv.VISION_PREFIXES))
            vision.check(folder)
            raw = minicpmv.llm_config_dict(raw)
            tensors = PrefixedTensors(tensors, (minicpmv.LLM_PREFIX,), strip=minicpmv.LLM_PREFIX)
        config = supported_config(config_folder, raw)
        try:
            skeleton = build_skeleton(config, architecture_of(config))
        except (TypeError, ValueError, RuntimeError) as e:
            raise CompressError(f"{config_folder / 'config.json'}: inconsistent settings "
                                f"({str(e).splitlines()[0][:200]})") from None
        weights = Weights(tensors)
        if source.modified:
            weights.load_changes(source.modified)
        check_tensors(weights, skeleton, source.modified or folder)
        weights.ignore(set(weights.names()) - set(untied_state_dict(skeleton)))
        state = cls(config, load_tokenizer(folder), source, weights,
                    load_qweights(source.qweights) if source.qweights else {}, device, dtype)
        state._skeleton = skeleton
        state.vision = vision
        return state

    @property
    def arch(self) -> Architecture:
        return architecture_of(self.config)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def tied(self) -> bool:
        return bool(self.config.tie_word_embeddings)

    def linear_names(self) -> list[str]:
        """Full names of every decoder-layer linear (e.g. `model.layers.3.mlp.up_proj`), in layer order."""
        return [f"{layer_prefix(i)}.{n}" for i in range(self.num_layers) for n in self.arch.linears]

    def head_name(self) -> str:
        return "model.embed_tokens.weight" if self.tied else "lm_head.weight"

    def tensor(self, name: str, quantized: bool = False) -> torch.Tensor:
        """One float32 tensor (a quantized linear's dequantized weight if `quantized`)."""
        linear = name.removesuffix(".weight")
        if quantized and linear in self.qweights:
            return self.qweights[linear].dequantize()
        return self.weights.get(name)

    def parameter_count(self, vision: bool = True) -> int:
        """Parameters of the model (of the LLM alone, for a MiniCPM-V model, with vision=False)."""
        n = self.vision.parameter_count() if self.vision and vision else 0
        for name in self.weights.names():
            shape = self.weights.shape(name)
            n += torch.Size(shape).numel()
        return n

    def fingerprint(self) -> str:
        """Equal fingerprints, equal float function (quantized weights not included)."""
        llm = self.weights.fingerprint(_config_json(self.config))
        return llm if self.vision is None else hashlib.sha256(f"{llm}:{self.vision.fingerprint()}".encode()).hexdigest()

    def config_dict(self) -> dict:
        """The config.json an output folder of this state holds (a MiniCPM-V config keeps its vision keys)."""
        from .models.checkpoint import config_dict

        llm = config_dict(self.config)
        if self.vision is None:
            return llm
        out = dict(self.vision.raw_config)
        out.update({k: v for k, v in llm.items() if k != "model_type"})
        return out

    # -- streaming -------------------------------------------------------------------------------
    def skeleton(self) -> torch.nn.Module:
        if self._skeleton is None:
            self._skeleton = build_skeleton(self.config, self.arch)
        return self._skeleton

    @contextlib.contextmanager
    def modules(self, *prefixes: str, quantized: bool = False) -> Iterator[torch.nn.Module]:
        """The skeleton with the parameters under `prefixes` materialised (compute device and dtype).

        `quantized`: quantized linears hold their dequantized weights (the model as deployed). The
        parameters go back to the meta device on exit.
        """
        model = self.skeleton()
        names = [n for n, _ in model.named_parameters(remove_duplicate=False)
                 if any(n == p or n.startswith(p + ".") for p in prefixes)]
        try:
            for name in names:  # no local reference kept: a caller may convert a parameter (`.half()`) in place
                source = self.head_name() if name == "lm_head.weight" else name
                set_param(model, name, self.tensor(source, quantized).to(device=self.device, dtype=self.dtype),
                           requires_grad=False)
            yield model
        finally:
            for name in names:
                p = model.get_parameter(name)
                set_param(model, name, torch.empty(p.shape, device="meta", dtype=p.dtype), requires_grad=False)

    @contextlib.contextmanager
    def computing_in(self, dtype: torch.dtype) -> Iterator[None]:
        """Materialise in `dtype` for a while (e.g. AWQ's search runs in float32 whatever --dtype says)."""
        saved, self.dtype = self.dtype, dtype
        try:
            yield
        finally:
            self.dtype = saved

    def layer(self, index: int, quantized: bool = False):
        """Context manager: decoder layer `index`, materialised."""
        state = self

        @contextlib.contextmanager
        def one():
            with state.modules(layer_prefix(index), quantized=quantized) as model:
                yield model.model.layers[index]

        return one()

    # -- whole model (stages that train or cut it) -------------------------------------------------
    def materialize(self, quantized: bool = False) -> torch.nn.Module:
        """A complete float32 model on the CPU that the caller owns (needs the whole float model's memory)."""
        model = build_skeleton(self.config, self.arch)
        for name, _ in list(model.named_parameters(remove_duplicate=False)):
            if name == "lm_head.weight" and self.tied:
                continue
            set_param(model, name, self.tensor(name, quantized), requires_grad=True)
        if self.tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    @property
    def model(self) -> torch.nn.Module:
        """The whole float model (materialised once and kept until the state changes)."""
        if self._model is None:
            self._model = self.materialize()
        return self._model

    @model.setter
    def model(self, model: torch.nn.Module) -> None:
        self.commit(model)

    def commit(self, model: torch.nn.Module) -> None:
        """Take `model` (same or new config, e.g. pruned) as the state's float weights; store what differs."""
        from .models.checkpoint import untied_state_dict

        if _config_json(model.config) != _config_json(self.config):
            self.config = model.config
            self._skeleton = None
        state = untied_state_dict(model)
        for name, value in state.items():
            value = value.detach()
            if name in self.weights and self.weights.shape(name) == tuple(value.shape):
                if torch.equal(self.weights.get(name), value.to(torch.float32)):
                    continue
            self.weights.set(name, value)
        self.weights.keep_only(list(state))
        self._model = None  # not kept: a later whole-model stage materialises afresh

    def weights_changed(self) -> None:
        """Forget the cached whole model after a stage changed `weights` directly."""
        self._model = None

    def evaluated_model(self) -> torch.nn.Module:
        """The model as deployed, whole: quantized linears hold their dequantized weights."""
        return self.materialize(quantized=True)


def load_checkpoint(folder: Path, *, allow_pickle: bool = False, trust_remote_code: bool = False):
    """(whole float32 model in eval mode, tokenizer) from a checkpoint folder (small models; see ModelState)."""
    folder = Path(folder)
    state = ModelState.open(ModelSource(str(folder), folder, str(folder)), allow_pickle=allow_pickle,
                            trust_remote_code=trust_remote_code)
    return state.model, state.tokenizer
