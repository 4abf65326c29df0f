import torch

from minicpm_compress.evaluate.greedy import greedy_tokens, smoke_test, with_torch_agreement
from minicpm_compress.evaluate.runners import TorchRunner

from ..conftest import tiny_model


def test_greedy_tokens_are_generates_greedy_continuation(tokenizer):
    model = tiny_model("llama").eval()
    prompt = tokenizer("It is a truth")["input_ids"]
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
    assert greedy_tokens(TorchRunner(model), prompt, 6) == generated[0, len(prompt):].tolist()


def test_smoke_test_records_prompt_ids_text_and_agreement(tokenizer):
    smoke = smoke_test(tokenizer, TorchRunner(tiny_model("llama")), "tiny in torch", steps=4)
    assert smoke["prompt_ids"] == tokenizer(smoke["prompt"])["input_ids"] and len(smoke["tokens"]) == 4
    assert smoke["text"] == tokenizer.decode(smoke["tokens"])
    other = smoke["tokens"][:2] + [t + 1 for t in smoke["tokens"][2:]]
    assert with_torch_agreement(smoke, other)["torch_agrees"] == 2
    assert with_torch_agreement(smoke, smoke["tokens"])["torch_agrees"] == 4
