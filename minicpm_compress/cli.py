"""The `minicpm-compress` command line. Every command builds a Recipe and runs the same pipeline."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from . import __version__
from .errors import CompressError, GateFailure, Interrupted


def _quiet_libraries() -> None:
    import logging
    import warnings

    # torchao (ExecuTorch's quantization library, which transformers imports when present) warns about its
    # GPU kernels on a CPU machine and about pytree registrations on every start
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning, module="rdata")


def _terminate(signum, frame):
    raise Interrupted()


def _reports_errors(command):
    """CompressError → one line on stderr and its exit code (2 input, 3 gate, 4 resources); SIGINT and
    SIGTERM → staging folders removed, one line, 130 / 143; an OSError from the file system → one line."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import errno
        import signal

        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            return command(*args, **kwargs)
        except CompressError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except (KeyboardInterrupt, Interrupted) as e:
            name, code = ("SIGTERM", Interrupted.exit_code) if isinstance(e, Interrupted) else ("SIGINT", 130)
            click.echo(f"error: interrupted ({name}); no output was written (staging folders removed)", err=True)
            sys.exit(code)
        except OSError as e:  # the machine, not the input: a full disk or an unwritable folder outside staging
            code = 4 if e.errno in (errno.ENOSPC, errno.EDQUOT) else 2
            click.echo(f"error: {e.filename or 'file system'}: {e.strerror or e}", err=True)
            sys.exit(code)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


@click.group()
@click.version_option(__version__, prog_name="minicpm-compress")
def main():
    """Compress MiniCPM and Llama/Qwen-shaped checkpoints into small, verified artifacts."""
    _quiet_libraries()


def _model_options(command):
    options = [
        click.option("--model", "-m", required=True, help="built-in model name, checkpoint folder, or output folder"),
        click.option("--reference", default=None, help="full-precision reference (default: the model's origin)"),
        click.option("--out", "-o", type=click.Path(path_type=Path), default=None, help="output folder"),
        click.option("--overwrite", is_flag=True, help="replace an existing output folder of this tool (one holding its manifest.json)"),
        click.option("--eval-tokens", type=int, default=None, help="held-out tokens to evaluate on (default 32768)"),
        click.option("--evaluation", multiple=True, help="held-out text set or .txt/.jsonl file (repeatable)"),
        click.option("--trust-remote-code", is_flag=True, help="allow executing model code shipped in the checkpoint"),
        click.option("--allow-pickle", is_flag=True, help="allow loading pickle (.bin) weights"),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
                     help="where layers are computed (auto: CUDA, then MPS, then CPU)"),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
                     help="compute dtype of materialised layers"),
        click.option("--no-memory-check", is_flag=True, help="run a stage even when its memory estimate exceeds free RAM"),
        click.option("--max-ppl-increase", type=float, default=None, help="gate: relative perplexity increase"),
        click.option("--max-kld", type=float, default=None, help="gate: mean KL divergence"),
        click.option("--min-top1", type=float, default=None, help="gate: top-1 agreement"),
        click.option("--min-image-cosine", type=float, default=None,
                     help="gate (MiniCPM-V): cosine of the image features to the reference's"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _recipe_fields(name: str, stage: str, stage_settings: dict, o: dict) -> dict:
    data = {}
    if o["eval_tokens"] is not None:
        data["eval_tokens"] = o["eval_tokens"]
    if o["evaluation"]:
        data["evaluation"] = list(o["evaluation"])
    gate = {k: o[k] for k in ("max_ppl_increase", "max_kld", "min_top1", "min_image_cosine") if o[k] is not None}
    load = {"trust_remote_code": o["trust_remote_code"], "allow_pickle": o["allow_pickle"]}
    return {
        "name": name,
        "model": o["model"],
        "reference": o["reference"],
        "device": o["device"],
        "dtype": o["dtype"],
        "memory_check": not o["no_memory_check"],
        "data": data,
        "stages": [{"load": load}, {stage: {**stage_settings, **({"gate": gate} if gate else {})}}],
    }


def _run(recipe, out: Path | None, overwrite: bool) -> None:
    from .pipeline import run_recipe
    from .report import summary
    import json

    out = out or Path("out") / recipe.name
    click.echo(f"running '{recipe.name}' on {recipe.model} → {out}", err=True)

    def on_start(index, name, estimate):
        parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in estimate["parts"].items())
        phase = f"while {estimate['phase']}: " if "phase" in estimate else ""
        click.echo(f"  [{index}] {name}: estimated peak memory {estimate['bytes'] / 2**30:.1f} GiB ({phase}{parts})",
                   err=True)

    def on_stage(r):
        m = r.metrics
        if r.reused:
            click.echo(f"  [{r.index}] {r.name}: reused from the stage cache (inputs and settings unchanged): "
                       f"ppl {m.ppl:.3f} ({m.ppl_increase:+.2%}), KLD {m.kld:.4f}"
                       + (f"  GATE FAILED: {'; '.join(r.failures)}" if r.failures else ""), err=True)
            return
        click.echo(f"  [{r.index}] {r.name}: ppl {m.ppl:.3f} ({m.ppl_increase:+.2%}), KLD {m.kld:.4f}, "
                   f"top-1 {m.top1:.2%}" + (f", img cos {m.image_cosine:.4f}" if m.image_cosine is not None else "")
                   + f", {r.wall_s:.0f}s" + (f"  GATE FAILED: {'; '.join(r.failures)}"
                                                              if r.failures else ""), err=True)

    def show(folder: Path) -> None:
        from .chat import try_table

        manifest = json.loads((folder / "manifest.json").read_text())
        click.echo("\n" + summary(manifest))
        written = [n for n in ("HANDOFF.md", "report.html", "report.md", "manifest.json") if (folder / n).is_file()]
        click.echo(f"\nwrote {folder}/ ({', '.join(written)})")
        tried = try_table(manifest, folder)
        if tried:
            click.echo("\n" + tried)

    try:
        run_recipe(recipe, out, overwrite=overwrite, on_stage=on_stage, on_start=on_start,
                   on_note=lambda line: click.echo(f"  {line}", err=True))
    except GateFailure as e:
        if e.record_dir is not None:
            show(e.record_dir)
        raise
    show(out)


@main.command()
@click.argument("names", nargs=-1)
@click.option("--prepare", is_flag=True, help="prepare the named built-in models (all without names) into the cache now")
@_reports_errors
def models(names: tuple[str, ...], prepare: bool):
    """List the built-in models (NAMES: only these)."""
    from .builtin import BUILTIN_MODELS, builtin_path, is_prepared

    unknown = [n for n in names if n not in BUILTIN_MODELS]
    if unknown:
        raise CompressError(f"unknown built-in model '{unknown[0]}' (known: {', '.join(BUILTIN_MODELS)})")
    for name, m in BUILTIN_MODELS.items():
        if names and name not in names:
            continue
        path = builtin_path(name) if prepare else None
        state = f"prepared at {path}" if path else ("prepared" if is_prepared(name) else "not prepared yet")
        click.echo(f"{name:18} {m.description}  [{state}]")


@main.command()
@click.option("--clear", is_flag=True, help="delete every entry (except those a running command is writing)")
@_reports_errors
def cache(clear: bool):
    """Show the stage cache (where, how big, its budget) or clear it."""
    import time

    from .stage_cache import StageCache, budget, cache_root, folder_bytes

    store = StageCache(cache_root(), "", budget())
    if clear:
        freed = store.clear()
        click.echo(f"cleared {store.root}: {freed / 2**20:.0f} MiB freed")
        return
    entries = store.entries()
    sizes = [folder_bytes(p) for p in entries]
    click.echo(f"stage cache {store.root}: {len(entries)} entries, {sum(sizes) / 2**20:.0f} MiB of a "
               f"{store.budget / 2**30:.1f} GiB budget (MINICPM_COMPRESS_STAGE_CACHE_SIZE)")
    for p, size in zip(reversed(entries), reversed(sizes)):
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(store.last_used(p)))
        files = ", ".join(sorted(a["path"] for a in store.read_record(p).get("artifacts", []))) or "model only"
        click.echo(f"  {p.name}  {size / 2**20:9.1f} MiB  last used {used}  {files}")


@main.command()
@click.argument("recipe_path", metavar="RECIPE.yaml", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None, help="output folder (default out/NAME)")
@click.option("--overwrite", is_flag=True, help="replace an existing output folder of this tool (one holding its manifest.json)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default=None,
              help="override the recipe's compute device")
@click.option("--no-memory-check", is_flag=True, help="run a stage even when its memory estimate exceeds free RAM")
@click.option("--no-cache", is_flag=True, help="run every stage, reusing nothing from earlier runs")
@_reports_errors
def run(recipe_path: Path, out: Path | None, overwrite: bool, device: str | None, no_memory_check: bool,
        no_cache: bool):
    """Run a YAML recipe (leading stages whose inputs and settings are unchanged are reused from the last run)."""
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path)
    if device:
        recipe.device = device
    if no_memory_check:
        recipe.memory_check = False
    if no_cache:
        recipe.cache = False
    _run(recipe, out, overwrite)


def _scheme_options(command):
    options = [
        click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True),
        click.option("--group-size", default="128", show_default=True, help="input columns per scale, or 'channel'"),
        click.option("--zero-point/--symmetric", default=True, show_default=True,
                     help="asymmetric with zero points, or symmetric"),
        click.option("--float-zero", is_flag=True, help="store zero points as float offsets (GGUF Q4_1 style)"),
        click.option("--scale-dtype", type=click.Choice(["float16", "bfloat16"]), default="float16", show_default=True,
                     help="bfloat16: positive bfloat16-exact scales, which ExecuTorch's XNNPACK int4 kernels "
                          "hold exactly"),
        click.option("--layout", default=None, metavar="TYPE",
                     help="the exact layout of a GGUF type instead (Q4_0, IQ4_NL, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, "
                          "Q4_K, Q5_K, Q6_K): sets bits, group size, symmetry, the K-quant scale grid or IQ4_NL's levels"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _scheme_settings(options: dict) -> dict:
    group = options.pop("group_size")
    layout = options.pop("layout")
    scale_dtype = options.pop("scale_dtype")
    if layout is not None:
        chosen = (options.pop("bits"), group, options.pop("zero_point"), options.pop("float_zero"), scale_dtype)
        if chosen != ("4", "128", True, False, "float16"):
            raise CompressError("--layout sets the whole scheme; leave out --bits, --group-size, --symmetric, "
                                "--float-zero and --scale-dtype")
        return {"layout": layout}
    return {
        **({"scale_dtype": scale_dtype} if scale_dtype != "float16" else {}),
        "bits": int(options.pop("bits")),
        "symmetric": not options.pop("zero_point"),
        "zero_point": "float" if options.pop("float_zero") else "int",
        "group_size": None if group in ("channel", "none", "0") else _int(group, "--group-size"),
    }


_calibration_option = click.option(
    "--calibration", multiple=True, help="calibration text set or .txt/.jsonl file (repeatable; default: built-in)"
)


def _calibrated(fields: dict, calibration: tuple[str, ...]) -> dict:
    if calibration:
        fields["data"]["calibration"] = list(calibration)
    return fields


@main.command()
@_model_options
@_scheme_options
@_reports_errors
def rtn(**options):
    """Round-to-nearest weight quantization."""
    from .recipe import build_recipe

    settings = _scheme_settings(options)
    _run(build_recipe(**_recipe_fields("rtn", "rtn", settings, options)), options["out"], options["overwrite"])


def _calibrated_options(command):
    options = [
        _calibration_option,
        click.option("--calibration-samples", type=int, default=None, help="samples of 512 tokens (default 128)"),
        click.option("--int8-linears", type=int, default=0, show_default=True,
                     help="keep the N most sensitive linears at int8"),
        click.option("--target-bits", type=float, default=None,
                     help="average bits/weight of the decoder linears: keep the linears int8 most improves at int8 "
                          "until it is reached (e.g. 4.5)"),
        click.option("--no-clip", is_flag=True, help="skip the clipping search"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _calibrated_run(name: str, stages: list[tuple[str, dict]], options: dict) -> None:
    """Run `stages` (the last one gated) after loading, with the calibration options applied to each."""
    from .recipe import build_recipe

    scheme = _scheme_settings(options)
    budget = {"int8_linears": options.pop("int8_linears"), "target_bits": options.pop("target_bits")}
    clip = not options.pop("no_clip")
    fields = _recipe_fields(name, stages[-1][0], {**scheme, **budget, "clip": clip, **stages[-1][1]}, options)
    fields["stages"][1:1] = [{stage: {**scheme, "clip": clip, **settings}} for stage, settings in stages[:-1]]
    fields = _calibrated(fields, options["calibration"])
    if options["calibration_samples"] is not None:
        fields["data"]["calibration_samples"] = options["calibration_samples"]
    _run(build_recipe(**fields), options["out"], options["overwrite"])


@main.command()
@_model_options
@_scheme_options
@_calibrated_options
@_reports_errors
def awq(**options):
    """Activation-aware weight quantization (scale search, clip search) on calibration text."""
    _calibrated_run("awq", [("awq", {})], options)


@main.command()
@_model_options
@_scheme_options
@_calibrated_options
@click.option("--act-order", is_flag=True, help="quantize columns in decreasing order of activation energy")
@click.option("--block-size", type=int, default=128, show_default=True, help="columns per lazy-batch block")
@click.option("--dampening", type=float, default=0.01, show_default=True, help="fraction of mean(diag H) added")
@click.option("--awq", "after_awq", is_flag=True, help="run AWQ's scale search first, then GPTQ on the scaled weights")
@_reports_errors
def gptq(act_order, block_size, dampening, after_awq, **options):
    """GPTQ: error-feedback quantization from calibration statistics (optionally after AWQ's scaling)."""
    settings = {"act_order": act_order, "block_size": block_size, "dampening": dampening}
    _calibrated_run("awq-gptq" if after_awq else "gptq", [("awq", {})] * after_awq + [("gptq", settings)], options)


def _training_options(command):
    options = [
        click.option("--steps", type=int, default=100, show_default=True, help="optimizer steps"),
        click.option("--batch-size", type=int, default=4, show_default=True, help="sequences per step"),
        click.option("--sequence-length", type=int, default=256, show_default=True, help="tokens per sequence"),
        click.option("--samples", type=int, default=128, show_default=True,
                     help="distinct training sequences from the calibration text"),
        click.option("--lr", type=float, default=1e-5, show_default=True, help="peak learning rate of the weights"),
        click.option("--ce-weight", type=float, default=0.0, show_default=True,
                     help="weight of the next-token loss added to the KL divergence"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _training_settings(options: dict) -> dict:
    return {k: options.pop(k) for k in ("steps", "batch_size", "sequence_length", "samples", "lr", "ce_weight")}


@main.command()
@_model_options
@_scheme_options
@_training_options
@_calibration_option
@click.option("--scale-lr", type=float, default=1e-3, show_default=True,
              help="peak learning rate of the scales' log-gains (0: keep the initial scales)")
@_reports_errors
def qat(calibration, scale_lr, **options):
    """Quantization-aware training distilled from the full-precision model (starts from AWQ/RTN weights)."""
    from .recipe import build_recipe

    settings = {**_scheme_settings(options), **_training_settings(options), "scale_lr": scale_lr}
    fields = _calibrated(_recipe_fields("qat", "qat", settings, options), calibration)
    _run(build_recipe(**fields), options["out"], options["overwrite"])


@main.command()
@_model_options
@click.option("--method", type=click.Choice(["ffn", "heads", "layers"]), default="ffn", show_default=True,
              help="FFN channels, KV-head groups (with their query heads), or whole decoder layers")
@click.option("--target-params", type=float, default=None, help="fraction of the parameters to keep, e.g. 0.7")
@click.option("--ratio", type=float, default=None, help="or: fraction of the method's structures to remove")
@click.option("--importance", type=click.Choice(["reconstruction", "activation", "magnitude", "random"]),
              default="activation", show_default=True,
              help="activation: the lowest activation energy goes; reconstruction: what leaves the least error "
                   "after the refit; magnitude / random: baselines")
@click.option("--refit/--no-refit", default=True, show_default=True,
              help="refit down_proj / o_proj's kept columns layer by layer; layers: the kept layers' down_proj "
                   "towards the unpruned model's stream (--no-refit: cut only)")
@click.option("--correct-drift", is_flag=True,
              help="ffn / heads: aim each refit at the unpruned model's own hidden states, so it also corrects "
                   "the drift of the pruned layers before it")
@click.option("--heal-steps", type=int, default=0, show_default=True,
              help="distillation steps after pruning (0: no healing; a recipe's heal stage sets the whole schedule)")
@click.option("--heal-lr", type=float, default=5e-5, show_default=True)
@click.option("--heal-layer-steps", type=int, default=0, show_default=True,
              help="block-wise distillation steps per decoder layer before any end-to-end healing (streams: one "
                   "layer in memory at a time; 0: none)")
@_calibration_option
@_reports_errors
def prune(method, target_params, ratio, importance, refit, correct_drift, heal_steps, heal_lr, heal_layer_steps,
          calibration, **options):
    """Structured pruning to a smaller dense checkpoint, optionally healed by distillation."""
    from .recipe import build_recipe

    settings = {"method": method, "importance": importance, **({} if refit else {"refit": False}),
                **({"correct_drift": True} if correct_drift else {}),
                **({"target_params": target_params} if target_params is not None else {}),
                **({"ratio": ratio} if ratio is not None else {})}
    fields = _calibrated(_recipe_fields("prune", "prune", settings, options), calibration)
    stages = fields["stages"]
    healing = ([{"heal_layers": {"steps": heal_layer_steps}}] if heal_layer_steps else []) + \
        ([{"heal": {"steps": heal_steps, "lr": heal_lr}}] if heal_steps else [])
    if healing:  # the gate given on the command line then applies to the healed model
        gate = stages[1]["prune"].pop("gate", None)
        stages.extend(healing)
        if gate:
            next(iter(stages[-1].values()))["gate"] = gate
    _run(build_recipe(**fields), options["out"], options["overwrite"])


@main.group()
def export():
    """Write deployable artifacts (each measured in its own runtime) from a model or output folder."""


@export.command("gguf")
@_model_options
@click.option("--type", "type_", default="Q4_0", show_default=True,
              help="written here: F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; "
                   "or a llama.cpp mixture made by its quantizer (Q4_K_M, Q5_K_M, Q3_K_M, IQ4_NL, ...); "
                   "or auto: our mixture to --target-size / --target-bits, types chosen per tensor by measured error")
@click.option("--target-size", default=None, help="--type auto: the file's size at most (e.g. 90MiB, 94MB, bytes)")
@click.option("--target-bits", type=float, default=None, help="--type auto: the file's bits per parameter at most")
@click.option("--candidates", default=None,
              help="--type auto: comma-separated types to choose from (default Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q4_K,Q5_K,Q6_K)")
@click.option("--tokenizer-pre", default=None, help="llama.cpp pre-tokenizer name, if not recognised")
@click.option("--mmproj-type", default="F16", show_default=True,
              help="MiniCPM-V: the vision file's matmul weights (F16, F32, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1)")
@click.option("--no-imatrix", is_flag=True,
              help="llama.cpp mixtures: quantize without an importance matrix from the calibration text")
@_calibration_option
@_reports_errors
def export_gguf(type_, target_size, target_bits, candidates, tokenizer_pre, mmproj_type, no_imatrix, calibration,
                **options):
    """A llama.cpp GGUF file (OUT/model-TYPE.gguf), measured in llama.cpp; for MiniCPM-V also the vision
    file (OUT/mmproj-TYPE.gguf), with images through llama.cpp's mtmd."""
    from .recipe import build_recipe

    settings = {"type": type_, "mmproj_type": mmproj_type, "imatrix": not no_imatrix,
                **({"tokenizer_pre": tokenizer_pre} if tokenizer_pre else {}),
                **({"target_size": target_size} if target_size is not None else {}),
                **({"target_bits": target_bits} if target_bits is not None else {}),
                **({"candidates": candidates.split(",")} if candidates else {})}
    recipe = build_recipe(**_calibrated(_recipe_fields(f"gguf-{type_}", "gguf", settings, options), calibration))
    _run(recipe, options["out"], options["overwrite"])


@export.command("onnx")
@_model_options
@click.option("--bits", type=click.Choice(["4", "8", "32"]), default="4", show_default=True,
              help="MatMulNBits int4/int8 weights, or 32 for a float graph")
@click.option("--block-size", type=int, default=32, show_default=True, help="MatMulNBits block size")
@click.option("--int8", "int8", type=click.Choice(["matmulnbits", "dynamic"]), default="matmulnbits",
              show_default=True, help="--bits 8: weight-only MatMulNBits, or onnxruntime's dynamic quantization")
@click.option("--accuracy-level", type=click.Choice(["auto", "0", "1", "2", "3", "4"]), default="auto",
              show_default=True, help="MatMulNBits compute precision: 0 exact (float activations), 4 int8 "
              "activations (faster); auto: time 4 and 0 here, keep the faster one that passes the gate")
@click.option("--embeddings", type=click.Choice(["int8", "int4", "float"]), default="int8", show_default=True,
              help="token embedding and (tied) output head: GatherBlockQuantized/MatMulNBits blocks, or float32")
@click.option("--graph", type=click.Choice(["auto", "fused", "traced"]), default="auto", show_default=True,
              help="fused: onnxruntime's decoder ops (GroupQueryAttention, SkipSimplifiedLayerNormalization); "
              "traced: torch.onnx's graph; auto: fused where the architecture allows")
@click.option("--vision", type=click.Choice(["float32", "int8"]), default="float32", show_default=True,
              help="MiniCPM-V: the vision graph's weights")
@_reports_errors
def export_onnx(bits, block_size, int8, accuracy_level, embeddings, graph, vision, **options):
    """An ONNX decoder with KV cache (OUT/onnx-int4/ ...) for onnxruntime(-genai), measured in onnxruntime;
    for MiniCPM-V also the vision and embedding graphs."""
    from .recipe import build_recipe

    settings = {"bits": int(bits), "block_size": block_size, "int8": int8, "embeddings": embeddings, "graph": graph,
                "accuracy_level": accuracy_level if accuracy_level == "auto" else int(accuracy_level), "vision": vision}
    recipe = build_recipe(**_recipe_fields(f"onnx-int{bits}", "onnx", settings, options))
    _run(recipe, options["out"], options["overwrite"])


@export.command("coreml")
@_model_options
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True,
              help="int4 blocks or int8 weights (the model's own codes when they fit, else RTN)")
@click.option("--block-size", type=int, default=32, show_default=True, help="int4 block size for linears quantized here")
@click.option("--context", type=int, default=None, help="KV-cache state length, longest prompt + output (default 2048)")
@click.option("--embeddings", type=click.Choice(["int8", "float"]), default="int8", show_default=True,
              help="token embedding (and untied lm_head) storage")
@click.option("--precision", type=click.Choice(["auto", "float16", "float32"]), default="auto", show_default=True,
              help="compute precision; auto: float16 unless the measured activations would overflow it")
@click.option("--chunks", type=int, default=1, show_default=True,
              help="N > 1: embed, N packages of decoder layers and head, converted one at a time (large models)")
@_reports_errors
def export_coreml(bits, block_size, context, embeddings, precision, chunks, **options):
    """A stateful Core ML decoder (OUT/coreml-int4/model.mlpackage, iOS 18), its weights read back and measured."""
    from .recipe import build_recipe

    settings = {"bits": int(bits), "block_size": block_size, "embeddings": embeddings, "precision": precision,
                "chunks": chunks, **({"context": context} if context else {})}
    recipe = build_recipe(**_recipe_fields(f"coreml-int{bits}", "coreml", settings, options))
    _run(recipe, options["out"], options["overwrite"])


@export.command("executorch")
@_model_options
@click.option("--bits", type=click.Choice(["4", "8", "32"]), default="4", show_default=True,
              help="int4 groups or int8 per channel with int8 activations (XNNPACK's 8da4w / 8da8w), or 32 for float")
@click.option("--group-size", type=int, default=32, show_default=True, help="int4 group for linears quantized here")
@click.option("--zero-points", type=click.Choice(["refuse", "requantize"]), default="refuse", show_default=True,
              help="linears with zero points (XNNPACK drops them silently): stop, or requantize them symmetric")
@click.option("--embeddings", type=click.Choice(["int8", "float"]), default="int8", show_default=True,
              help="token table and output head storage")
@click.option("--context", type=int, default=None,
              help="static KV-cache length, longest prompt + output (default 2048)")
@_reports_errors
def export_executorch(bits, group_size, zero_points, embeddings, context, **options):
    """An ExecuTorch program (OUT/executorch-int4/model.pte, XNNPACK) with a static KV cache, measured in
    ExecuTorch's runtime."""
    from .recipe import build_recipe

    settings = {"bits": int(bits), "group_size": group_size, "zero_points": zero_points, "embeddings": embeddings,
                **({"context": context} if context else {})}
    recipe = build_recipe(**_recipe_fields(f"executorch-int{bits}", "executorch", settings, options))
    _run(recipe, options["out"], options["overwrite"])


@export.command("hf-awq")
@_model_options
@_reports_errors
def export_hf_awq(**options):
    """A Hugging Face AWQ (GEMM) checkpoint (OUT/hf-awq/), read back and measured."""
    from .recipe import build_recipe

    _run(build_recipe(**_recipe_fields("hf-awq", "hf_awq", {}, options)), options["out"], options["overwrite"])


@main.command("eval")
@_model_options
@_reports_errors
def eval_(**options):
    """Measure a model (or an output folder) against its full-precision reference."""
    from .recipe import build_recipe

    recipe = build_recipe(**_recipe_fields("eval", "evaluate", {}, options))
    _run(recipe, options["out"], options["overwrite"])


@main.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="write the accuracy-vs-size plot (PNG) here")
@_reports_errors
def compare(folders: tuple[Path, ...], plot: Path | None):
    """Every artifact of several output folders in one table, frontier marked (*): the choice a team makes."""
    from .handoff.compare import compare as compare_runs

    click.echo(compare_runs(list(folders), plot))
    if plot is not None:
        click.echo(f"\nwrote {plot}")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--artifact", default=None, help="gguf, onnx, coreml, torch, or an artifact's file/folder name "
              "(default: the first GGUF or ONNX artifact, else the folder's torch model)")
@click.option("--prompt", default=None, help="answer this once and exit (without it: an interactive chat)")
@click.option("--system", default=None, help="a system message before the conversation")
@click.option("--max-tokens", type=click.IntRange(1, 1024), default=128, show_default=True,
              help="answer length at most (the prompt and the answer share a 2,048-token context)")
@click.option("--compare", is_flag=True, help="also answer with the full-precision reference model, side by side")
@click.option("--json", "as_json", is_flag=True, help="with --prompt: print the answer(s) as JSON, no streaming")
@_reports_errors
def chat(folder: Path, artifact: str | None, prompt: str | None, system: str | None, max_tokens: int, compare: bool,
         as_json: bool):
    """Talk to an output folder's artifact in its own runtime (greedy decoding, the model's chat template)."""
    import json

    from .chat import open_chat, shared_prefix

    if as_json and prompt is None:
        raise CompressError("--json: needs --prompt (an interactive chat is not JSON)")
    session = open_chat(folder, artifact, context=2048)
    reference = session.reference() if compare else None
    click.echo(f"{session.artifact} in {session.decoder.label}" + (" (and the reference in torch)" if compare else "")
               + ("" if prompt else "; an empty line or Ctrl-D ends"), err=True)

    def turn(text: str) -> None:
        ids = session.prompt_ids(text, system, answer_room=max_tokens)
        stream = None if as_json else (lambda piece: click.echo(piece, nl=False))
        if reference is not None and not as_json:
            click.echo(f"[{session.artifact}] ", nl=False)
        answer = session.answer(ids, max_tokens, stream=stream)
        result = {"artifact": session.artifact, "runtime": session.decoder.label, "prompt_ids": ids,
                  "answer": answer.as_dict()}
        if not as_json:
            click.echo("")
            click.echo(f"({len(answer.ids)} tokens, {answer.as_dict()['tokens_per_s'] or 0} tokens/s"
                       + ("" if answer.stopped else f", stopped at --max-tokens {max_tokens}") + ")", err=True)
        if reference is not None:
            if not as_json:
                click.echo("[reference] ", nl=False)
            ref = session.answer(ids, max_tokens, decoder=reference, stream=stream)
            shared = shared_prefix(answer.ids, ref.ids)
            result.update(reference=ref.as_dict(), shared_tokens=shared)
            if not as_json:
                click.echo(f"\n(the two answers share their first {shared} of {len(ref.ids)} tokens)")
        if as_json:
            click.echo(json.dumps(result, ensure_ascii=False))
        session.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer.text}]

    if prompt is not None:
        turn(prompt)
        return
    while True:
        try:
            text = click.prompt(">>>", default="", show_default=False, prompt_suffix=" ", err=True)
        except click.Abort:
            break
        if not text.strip():
            break
        turn(text)


def _int(value: str, option: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise CompressError(f"{option}: expected an integer or 'channel', got '{value}'") from None
