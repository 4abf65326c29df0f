"""The Modelfile's template, rendered by Go's text/template as Ollama renders it, gives the same prompt as the
checkpoint's own Jinja template, for the real tokenizers of both text built-ins; other families get none."""

import json
import shutil
import subprocess

import pytest

from minicpm_compress.handoff.ollama import (CHATML_GO, PROBES, match_template, modelfile, render_chatml,
                                             render_jinja, stored_template)
from minicpm_compress.models.checkpoint import load_tokenizer

# Ollama's data for a chat: .System holds the system message (the Modelfile's SYSTEM when the conversation
# has none, which Ollama then puts first among the messages) and .Messages every message.
GO_RENDER = r"""package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Data struct {
	System   string
	Messages []Message
}

func main() {
	var cases struct {
		Template string
		Data     []Data
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("t").Parse(cases.Template))
	var out []string
	for _, d := range cases.Data {
		var b stringsBuilder
		if err := tmpl.Execute(&b, d); err != nil {
			panic(err)
		}
		out = append(out, string(b))
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

type stringsBuilder []byte

func (s *stringsBuilder) Write(p []byte) (int, error) { *s = append(*s, p...); return len(p), nil }
"""


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    go = shutil.which("go")
    if go is None:
        pytest.fail("needs Go (installed by `make test` through `make test-tools`)")
    folder = tmp_path_factory.mktemp("gotmpl")
    (folder / "main.go").write_text(GO_RENDER)
    binary = folder / "render"
    subprocess.run([go, "build", "-o", str(binary), str(folder / "main.go")], check=True, cwd=folder,
                   env={"HOME": str(folder), "GOCACHE": str(folder / "cache"), "PATH": "/usr/bin:/bin",
                        "GO111MODULE": "off"}, timeout=600)

    def render(template: str, conversations: list[list[dict]], default_system: str | None) -> list[str]:
        data = []
        for messages in conversations:
            if default_system and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": default_system}] + messages
            system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
            data.append({"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
        done = subprocess.run([str(binary)], input=json.dumps({"Template": template, "Data": data}),
                              capture_output=True, text=True, check=True, timeout=60)
        return json.loads(done.stdout)

    return render


@pytest.mark.parametrize("model", ["minicpm_path", "qwen_path"])
def test_the_go_template_renders_what_the_checkpoint_template_renders(model, request, go_render):
    template = load_tokenizer(request.getfixturevalue(model)).chat_template
    matched = match_template(template)
    assert matched is not None and matched.template == CHATML_GO
    expected = {"minicpm_path": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                "qwen_path": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}[model]
    assert matched.system == expected
    conversations = list(PROBES) + [[{"role": "user", "content": "Quote: \"{{ .System }}\" & <b>"}]]
    rendered = go_render(matched.template, conversations, matched.system)
    assert rendered == [render_jinja(template, c) for c in conversations]


def test_a_mutated_go_template_is_caught(go_render):
    """The check above can fail: one dropped newline changes Go's rendering away from the Jinja one."""
    broken = CHATML_GO.replace("<|im_start|>user\n", "<|im_start|>user")
    assert go_render(broken, [PROBES[0]], None) != [render_chatml(PROBES[0], None)]


def test_other_families_get_no_template():
    llama3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
              "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    assert match_template(llama3) is None
    assert match_template(None) is None and match_template("{{ raise_exception('no') }}") is None
    text = modelfile("model-Q4_0.gguf", None, None)
    assert "FROM ./model-Q4_0.gguf" in text and "no TEMPLATE" in text
    assert not any(line.startswith(("TEMPLATE", "SYSTEM", "PARAMETER")) for line in text.splitlines())


def test_every_gguf_of_the_ci_run_has_a_modelfile(ci_output):
    out, result = ci_output
    assert result.exit_code == 0, result.output
    ggufs = sorted(p.name for p in out.glob("*.gguf"))
    assert ggufs and sorted(p.name for p in out.glob("*.Modelfile")) == [g.replace(".gguf", ".Modelfile") for g in ggufs]
    for g in ggufs:
        text = (out / g.replace(".gguf", ".Modelfile")).read_text()
        assert f"FROM ./{g}\n" in text and 'PARAMETER stop "<|im_end|>"' in text
        assert match_template(stored_template(out / g)).template in text
    card = (out / "HANDOFF.md").read_text()
    assert "ollama create model-q4_0 -f model-Q4_0.Modelfile" in card
