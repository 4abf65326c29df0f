"""The files onnxruntime-genai needs next to model.onnx: genai_config.json and the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from ... import atomic
from ...models import architectures


def genai_config(model_config, tokenizer, context: int, fused: bool = False) -> dict:
    """The runtime config; a `fused` graph (GroupQueryAttention) takes no position_ids and lets past and
    present share one buffer of the maximum length."""
    c = model_config
    head_dim = architectures.head_dim(c)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else c.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = {
        "model": {
            "type": "llama",  # onnxruntime-genai's generic decoder-only runner; the graph carries MiniCPM's scalings
            "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else c.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "vocab_size": c.vocab_size,
            "context_length": context,
            "decoder": {
                "filename": "model.onnx",
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": head_dim,
                "hidden_size": c.hidden_size,
                "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads,
                "num_hidden_layers": c.num_hidden_layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "max_length": context, "min_length": 0,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
            "past_present_share_buffer": fused,
        },
    }
    if fused:
        del config["model"]["decoder"]["inputs"]["position_ids"]
    return config


def write_genai_files(state, folder: Path, fused: bool = False) -> int:
    """genai_config.json and the tokenizer files; returns the context length the config allows."""
    from .decoder import rotary_length

    context = min(rotary_length(state.config) if fused else
                  int(getattr(state.config, "max_position_embeddings", 2048) or 2048), 4096)
    config = genai_config(state.config, state.tokenizer, context, fused)
    if state.vision is not None:  # MiniCPM-V: vision and embedding graphs; the decoder takes inputs_embeds
        from .vision import genai_vision_sections

        model = config["model"]
        model["type"] = "minicpmv"  # not a type onnxruntime-genai runs: the layout is for app code
        model["decoder"]["inputs"]["inputs_embeds"] = model["decoder"]["inputs"].pop("input_ids")
        model["decoder"]["inputs"]["inputs_embeds"] = "inputs_embeds"
        model.update(genai_vision_sections(state))
    atomic.write_text(Path(folder) / "genai_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    state.tokenizer.save_pretrained(str(folder))
    return context
