"""Load snippets per runtime, written with the deliverable's own file names and the run's smoke test.

The Python ones run as they are from inside the output folder and print the greedy continuation of the
smoke-test prompt, which must equal the gated model's (tests/handoff/test_snippets.py runs them on the CI
recipe's folder). Swift, C# and Java are text; the Swift one is generated from the mlpackage's spec, and a
test checks its feature names, data types and ranks against that spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .deliverables import Deliverable


@dataclass(frozen=True)
class Snippet:
    title: str
    language: str  # the Markdown fence: python, sh, swift, csharp, java, kotlin
    code: str
    runs: bool  # executed by the test suite against the built artifacts


def _smoke(d: "Deliverable") -> tuple[str, int]:
    smoke = d.stage["details"].get("smoke_test") or {}
    return smoke.get("prompt", "Hello"), len(smoke.get("tokens", [])) or 8


def llama_cpp(d: "Deliverable", root: Path) -> list[Snippet]:
    prompt, n = _smoke(d)
    details = d.stage["details"]
    model = details["file"]
    out = [Snippet("llama-cpp-python", "python", f'''from llama_cpp import Llama

llm = Llama(model_path={json.dumps(model)}, n_ctx=2048, verbose=False)
out = llm.create_completion({json.dumps(prompt)}, max_tokens={n}, temperature=0)
print(out["choices"][0]["text"])
# chat: llm.create_chat_completion(messages=[{{"role": "user", "content": "Hello"}}]) uses the file's template
''', runs=True),
        Snippet("llama.cpp command line", "sh", f'''llama-completion -m {model} -no-cnv -p {json.dumps(prompt)} -n {n} --temp 0
llama-cli -m {model}        # chat, with the chat template stored in the file
''', runs=False)]
    stem = PurePosixPath(model).stem
    out.append(Snippet("Ollama and LM Studio", "sh", f'''ollama create {stem.lower()} -f {stem}.Modelfile   # in this folder; the Modelfile holds the chat template
ollama run {stem.lower()}
lms import {model}        # LM Studio reads the chat template stored in the file
''', runs=False))
    if "mmproj" in details:
        prefix = details["mmproj"].get("image_prefix", "")
        note = (f"\n# this model numbers its images: mtmd does not, so put {prefix} before the image marker "
                "(<__media__>) in a prompt" if prefix else "")
        out.append(Snippet("llama.cpp with images (mtmd)", "sh", f'''llama-mtmd-cli -m {model} --mmproj {details["mmproj"]["file"]} \\
    --image photo.jpg -p "What is in this image?"{note}
''', runs=False))
    return out


def onnxruntime_genai(d: "Deliverable", root: Path) -> list[Snippet]:
    prompt, n = _smoke(d)
    folder = d.top_folder()
    if "vision" in d.stage["details"]:
        return [Snippet("onnxruntime (MiniCPM-V)", "text", f"""onnxruntime-genai has no MiniCPM-V model type: run the three graphs
with onnxruntime. vision.onnx turns preprocessed image slices into the LLM's image rows, embedding.onnx
turns token ids into rows, the image rows replace the slots' rows (see the prompt format below), and
model.onnx decodes from inputs_embeds with its KV cache. {folder}/genai_config.json lists every graph's
inputs and outputs.
""", runs=False)]
    return [
        Snippet("onnxruntime-genai (Python)", "python", f'''import onnxruntime_genai as og

model = og.Model({json.dumps(folder)})
tokenizer = og.Tokenizer(model)
prompt = tokenizer.encode({json.dumps(prompt)})
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(prompt) + {n}, do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(prompt)
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)[len(prompt):]))
''', runs=True),
        Snippet("onnxruntime-genai (C#, Microsoft.ML.OnnxRuntimeGenAI)", "csharp", f'''using Microsoft.ML.OnnxRuntimeGenAI;

using var model = new Model("{folder}");
using var tokenizer = new Tokenizer(model);
using var sequences = tokenizer.Encode({json.dumps(prompt)});
using var generatorParams = new GeneratorParams(model);
generatorParams.SetSearchOption("max_length", 2048);
using var generator = new Generator(model, generatorParams);
generator.AppendTokenSequences(sequences);
while (!generator.IsDone()) generator.GenerateNextToken();
Console.WriteLine(tokenizer.Decode(generator.GetSequence(0)));
''', runs=False),
        Snippet("onnxruntime-genai (Java / Android, ai.onnxruntime.genai)", "java", f'''import ai.onnxruntime.genai.*;

Model model = new Model(modelDir);  // the {folder}/ folder copied to app storage
Tokenizer tokenizer = new Tokenizer(model);
Sequences sequences = tokenizer.encode({json.dumps(prompt)});
GeneratorParams params = new GeneratorParams(model);
params.setSearchOption("max_length", 2048);
Generator generator = new Generator(model, params);
generator.appendTokenSequences(sequences);
while (!generator.isDone()) generator.generateNextToken();
String text = tokenizer.decode(generator.getSequence(0));
''', runs=False),
    ]


def executorch(d: "Deliverable", root: Path) -> list[Snippet]:
    prompt, n = _smoke(d)
    folder = d.top_folder()
    pte = f"{folder}/model.pte"
    return [
        Snippet("ExecuTorch runtime (Python)", "python", f'''import torch
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 - the llama:: cache and attention kernels
from executorch.kernels import quantized  # noqa: F401 - the int8 token table's kernel
from executorch.runtime import Runtime
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({json.dumps(folder)})
forward = Runtime.get().load_program({json.dumps(pte)}).load_method("forward")
prompt = tokenizer({json.dumps(prompt)})["input_ids"]
logits = forward.execute([torch.tensor([prompt]), torch.tensor([0])])[0]  # (tokens, start position)
out = []
for i in range({n}):
    out.append(int(logits[0, -1].argmax()))
    logits = forward.execute([torch.tensor([out[-1:]]), torch.tensor([len(prompt) + i])])[0]
print(tokenizer.decode(out))
''', runs=True),
        Snippet("ExecuTorch LLM runner (Android, Kotlin; untested here)", "kotlin", f'''import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule

// model.pte and tokenizer.json from {folder}/, copied to app storage; the program tells the runner its
// context length, BOS/EOS ids and that it takes (tokens, input_pos) with a KV cache
val module = LlmModule(modelPath, tokenizerPath, 0.0f)
module.generate({json.dumps(prompt)}, 2048, object : LlmCallback {{
    override fun onResult(result: String) {{ print(result) }}
    override fun onStats(stats: String) {{}}
}})
''', runs=False),
        Snippet("ExecuTorch LLM runner (iOS, Swift; untested here)", "swift", f'''import ExecuTorchLLM

// {folder}/model.pte and {folder}/tokenizer.json in the app bundle; link the XNNPACK backend and the
// custom-ops and quantized kernels
let runner = TextLLMRunner(modelPath: modelPath, tokenizerPath: tokenizerPath)
try runner.generate({json.dumps(prompt)}, Config {{ $0.sequenceLength = 2048 }}) {{ token in
    print(token, terminator: "")
}}
''', runs=False),
    ]


SWIFT_TYPES = {"INT32": ".int32", "FLOAT16": ".float16", "FLOAT32": ".float32", "DOUBLE": ".double"}


def coreml_features(spec) -> dict:
    """Inputs, outputs and states of an mlpackage's spec as {name: (data type, rank, upper bounds)}."""
    from coremltools.proto import FeatureTypes_pb2 as ft

    def array(t):
        dtype = ft.ArrayFeatureType.ArrayDataType.Name(t.dataType)
        bounds = [r.upperBound for r in t.shapeRange.sizeRanges] or list(t.shape)
        return dtype, len(bounds), bounds

    return {
        "inputs": {f.name: array(f.type.multiArrayType) for f in spec.description.input},
        "outputs": {f.name: array(f.type.multiArrayType) for f in spec.description.output},
        "states": {f.name: array(f.type.stateType.arrayType) for f in spec.description.state},
    }


def coreml_swift(package: str, features: dict) -> str:
    """Swift that runs the stateful decoder package: one prediction per step, the KV cache in MLState."""
    ins = features["inputs"]
    ids_t, _, ids_bounds = ins["input_ids"]
    mask_t = ins["causal_mask"][0]
    states = ", ".join(f"{name} [{', '.join(map(str, b))}] {t.lower()}" for name, (t, _, b) in features["states"].items())
    extra = [n for n in ins if n not in ("input_ids", "causal_mask")]
    image = ""
    if extra:
        image = "\n".join(
            f'//   "{n}": MLMultiArray, {ins[n][0].lower()}, rank {ins[n][1]}, dimensions up to {ins[n][2]}' for n in extra)
        image = "\n// MiniCPM-V: image rows from vision.mlpackage go in through\n" + image
    output = next(iter(features["outputs"]))
    return f'''import CoreML

// {package}: iOS 18 / macOS 15 or newer (stateful model). Xcode compiles a bundled package to .mlmodelc.
let url = Bundle.main.url(forResource: "{package.removesuffix(".mlpackage")}", withExtension: "mlmodelc")!
let model = try MLModel(contentsOf: url, configuration: MLModelConfiguration())
let cache = model.makeState()  // {states}

// Token ids from tokenizer.json (a Hugging Face tokenizer, e.g. swift-transformers' AutoTokenizer).
let tokens: [Int32] = promptTokens
let past = 0  // tokens already in the cache; up to {ids_bounds[-1]} in all
let inputIds = try MLMultiArray(shape: [1, NSNumber(value: tokens.count)], dataType: {SWIFT_TYPES[ids_t]})
for (i, t) in tokens.enumerated() {{ inputIds[i] = NSNumber(value: t) }}
// Additive causal mask [1, 1, new, past + new]: 0 where a token may attend, -1e4 above the diagonal.
let total = past + tokens.count
let mask = try MLMultiArray(shape: [1, 1, NSNumber(value: tokens.count), NSNumber(value: total)], dataType: {SWIFT_TYPES[mask_t]})
for i in 0..<tokens.count {{ for j in 0..<total {{ mask[[0, 0, i, j] as [NSNumber]] = NSNumber(value: j > past + i ? -1e4 : 0.0) }} }}
let inputs = try MLDictionaryFeatureProvider(dictionary: ["input_ids": inputIds, "causal_mask": mask])
let output = try await model.prediction(from: inputs, using: cache)
let logits = output.featureValue(for: "{output}")!.multiArrayValue!  // [1, new, vocabulary]: argmax of the last row is the next token{image}
'''


def coreml(d: "Deliverable", root: Path) -> list[Snippet]:
    details = d.stage["details"]
    if details.get("chunks", 1) > 1:
        order = " → ".join(details["packages"])
        return [Snippet("Core ML (Swift): chained packages", "text",
                        f"Run the packages in order, each one's output the next one's input: {order}.\n", runs=False)]
    import coremltools as ct

    package = details["packages"][0]
    spec = ct.utils.load_spec(str(root / d.top_folder() / package))
    return [Snippet("Core ML (Swift)", "swift", coreml_swift(package, coreml_features(spec)), runs=False)]
