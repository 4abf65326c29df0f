"""The stage catalog: every built-in stage, registered by importing its module. Recipes and the pipeline
read `STAGES` from here; the registry itself (`minicpm_compress.registry`) imports no stage.

Adding a stage: a module with a `StageConfig` subclass and a handler decorated with
`@register_stage(name, Config, summary)`, and its import below.
"""

from ..registry import STAGES, RunContext, StageConfig, StageOutcome, StageType, register_stage
from . import evaluate, load  # noqa: F401
from ..quant import awq, gptq, qat, rtn  # noqa: F401
from ..export.coreml import stage as coreml_stage  # noqa: F401
from ..export.executorch import stage as executorch_stage  # noqa: F401
from ..export.gguf import stage as gguf_stage  # noqa: F401
from ..export.hf_awq import stage as hf_awq_stage  # noqa: F401
from ..export.onnx import stage as onnx_stage  # noqa: F401
from ..prune import stage as prune_stage  # noqa: F401
from ..train import heal, layer_heal  # noqa: F401

__all__ = ["STAGES", "RunContext", "StageConfig", "StageOutcome", "StageType", "register_stage"]
