"""`minicpm-compress chat` answers with each artifact kind Linux runs, in that artifact's runtime, through the
model's chat template; every answer is one the full-precision model would give (each token among its top 5
under teacher forcing), and `--compare` shows the reference's own greedy answer."""

import json

import pytest
import torch
from click.testing import CliRunner

from minicpm_compress.cli import main
from minicpm_compress.evaluate.greedy import greedy_tokens
from minicpm_compress.evaluate.runners import TorchRunner
from minicpm_compress.models.checkpoint import load_tokenizer
from minicpm_compress.resolve import resolve_model
from minicpm_compress.state import ModelState

PROMPT = "Write one sentence about the sea."


@pytest.fixture(scope="module")
def reference():
    return ModelState.open(resolve_model("minicpm-smollm2")).materialize().eval()


def _chat(out, *args):
    result = CliRunner().invoke(main, ["chat", str(out), *args])
    return result, (json.loads(result.stdout) if result.exit_code == 0 and "--json" in args else None)


def _ranks(model, prompt_ids, answer_ids):
    """Each answer token's rank among the model's next-token logits, given the prompt and the answer so far."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0, len(prompt_ids) - 1:-1]
    return [int((row > row[t]).sum()) for row, t in zip(logits, answer_ids)]


@pytest.mark.parametrize("artifact, runtime, top5_share", [
    ("model-Q8_0.gguf", "llama.cpp", 1.0), ("onnx-int8", "onnxruntime-genai", 1.0), ("torch", "torch", 0.8)])
def test_each_artifact_answers_in_its_runtime_as_the_reference_could(ci_output, reference, minicpm_path, artifact,
                                                                     runtime, top5_share):
    out, run = ci_output
    assert run.exit_code == 0, run.output
    result, data = _chat(out, "--artifact", artifact, "--prompt", PROMPT, "--max-tokens", "16", "--json")
    assert result.exit_code == 0, result.stderr
    assert data["runtime"] == runtime and data["artifact"].rstrip("/") == artifact
    prompt = load_tokenizer(minicpm_path).decode(data["prompt_ids"])
    assert prompt.endswith(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n")  # the chat template
    answer = data["answer"]
    assert len(answer["ids"]) >= 8 and answer["text"].strip()
    ranks = _ranks(reference, data["prompt_ids"], answer["ids"])
    assert sum(r < 5 for r in ranks) / len(ranks) >= top5_share, ranks


def test_compare_puts_the_reference_greedy_answer_beside_the_artifact(ci_output, reference):
    out, _ = ci_output
    result, data = _chat(out, "--artifact", "gguf", "--prompt", PROMPT, "--max-tokens", "8", "--json", "--compare")
    assert result.exit_code == 0, result.stderr
    expected = greedy_tokens(TorchRunner(reference), data["prompt_ids"], 8)  # whole-sequence recompute, no cache
    assert data["reference"]["ids"] == expected
    shared = next((i for i, (a, b) in enumerate(zip(data["answer"]["ids"], expected)) if a != b), 8)
    assert data["shared_tokens"] == shared


def test_streamed_text_is_the_answer_and_a_conversation_continues(ci_output):
    out, _ = ci_output
    once, data = _chat(out, "--artifact", "onnx-int8", "--prompt", PROMPT, "--max-tokens", "12", "--json")
    streamed, _ = _chat(out, "--artifact", "onnx-int8", "--prompt", PROMPT, "--max-tokens", "12")
    assert streamed.exit_code == 0 and streamed.stdout.strip() == data["answer"]["text"].strip()
    talk = CliRunner().invoke(main, ["chat", str(out), "--artifact", "onnx-int8", "--max-tokens", "6"],
                              input=f"{PROMPT}\nAnd about the sky?\n\n")
    assert talk.exit_code == 0, talk.stderr
    assert talk.stdout.startswith(data["answer"]["text"][:10]) and talk.stderr.count("tokens/s") == 2


@pytest.mark.parametrize("args, message", [
    (["--artifact", "coreml-int4", "--prompt", "hi"], "Core ML runs on macOS only"),
    (["--artifact", "nothing.gguf", "--prompt", "hi"], "no artifact 'nothing.gguf' in this output folder"),
    (["--json"], "--json: needs --prompt"),
])
def test_what_chat_refuses_it_says_in_one_line(ci_output, args, message):
    out, _ = ci_output
    result = CliRunner().invoke(main, ["chat", str(out), *args])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_chat_refuses_a_folder_that_is_not_an_output(tmp_path):
    result = CliRunner().invoke(main, ["chat", str(tmp_path), "--prompt", "hi"])
    assert result.exit_code == 2 and "not a minicpm-compress output folder" in result.stderr


def test_the_run_ends_with_the_command_that_tries_each_artifact(ci_output):
    out, run = ci_output
    tail = run.stdout[run.stdout.index("try an artifact"):]
    for name in ("model-Q4_0.gguf", "model-Q8_0.gguf", "model-qat-Q4_0.gguf", "onnx-int8", "onnx-int4", "torch"):
        assert f"minicpm-compress chat {out} --artifact {name}" in tail
    assert "--artifact coreml" not in tail and "Core ML artifacts: how to load them is in HANDOFF.md" in tail


class _Fixed:
    label = "fixed"

    def __init__(self, ids):
        self.ids = ids

    def tokens(self, prompt_ids, limit):
        yield from self.ids[:limit]


def _session(tokenizer, decoder=None, context=2048):
    from pathlib import Path

    from minicpm_compress.chat import Chat, _stop_ids

    return Chat(Path("."), "fixed", decoder, tokenizer, _stop_ids(tokenizer, {}), lambda: None, context)


def test_an_answer_stops_at_end_of_turn_and_streams_exactly_its_text(tokenizer):
    words = tokenizer("Café au lait, s'il vous plaît — 東京.", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    chat = _session(tokenizer, _Fixed(words + [end] + words))
    pieces = []
    answer = chat.answer([1, 2], 100, stream=pieces.append)
    assert answer.ids == words and answer.stopped and "".join(pieces) == answer.text == tokenizer.decode(words)
    assert "\ufffd" not in "".join(pieces)  # multi-byte characters are shown whole
    cut = chat.answer([1, 2], 3)
    assert cut.ids == words[:3] and not cut.stopped


def test_old_turns_leave_the_prompt_before_it_outgrows_the_context(tokenizer):
    chat = _session(tokenizer, context=120)
    chat.history = [{"role": "user", "content": "tell me a story " * 8}, {"role": "assistant", "content": "once " * 30},
                    {"role": "user", "content": "more"}, {"role": "assistant", "content": "fine."}]
    ids = chat.prompt_ids("last question", answer_room=40)
    text = tokenizer.decode(ids)
    assert len(ids) + 40 <= 120 and "once once" not in text and "more" in text and text.count("<|im_start|>user") == 2
    with pytest.raises(Exception, match="does not fit the 120-token context"):
        chat.prompt_ids("word " * 200, answer_room=40)
