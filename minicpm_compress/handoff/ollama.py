"""An Ollama Modelfile beside each GGUF file: FROM the file (and the mmproj of a MiniCPM-V run), the chat
template in Ollama's template language (Go's text/template), the default system message and stop tokens.

Ollama cannot run a checkpoint's Jinja template, so the template is derived, not translated: the checkpoint's
template is rendered on a few probe conversations and, if every rendering is what the ChatML layout gives
(SmolLM2, Qwen2 / Qwen2.5, MiniCPM-V 2.6 and 4.x use it), the Modelfile gets the ChatML template in Go's
language, with the default system message the Jinja template inserts when a conversation has none. A
template of another family is not guessed at: the Modelfile then has no TEMPLATE and says so (Ollama falls
back to recognising the template stored in the GGUF file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .. import atomic

# Ollama's template data: .System (the system messages, joined), .Messages (every message, system ones too:
# the range skips them, as the system block already holds them).
CHATML_GO = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""
CHATML_STOPS = ("<|im_start|>", "<|im_end|>")

# Conversations every recognised template must render exactly as ChatML does.
PROBES = (
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "What is the capital of Italy?"}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Name a colour.\nOne word."}],
)


@dataclass(frozen=True)
class OllamaTemplate:
    template: str  # Go text/template
    system: str | None  # the default system message (Modelfile SYSTEM), if the checkpoint's template has one
    stops: tuple[str, ...]


def render_jinja(template: str, messages: list[dict]) -> str:
    """A chat template rendered as transformers renders it (sandboxed, trim_blocks and lstrip_blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="",
                                            eos_token="", tools=None)


def render_chatml(messages: list[dict], default_system: str | None) -> str:
    """What CHATML_GO renders for `messages` in Ollama, which puts the Modelfile's SYSTEM in when a
    conversation has no system message of its own."""
    system = [m["content"] for m in messages if m["role"] == "system"] or ([default_system] if default_system else [])
    out = f"<|im_start|>system\n{chr(10).join(system)}<|im_end|>\n" if system else ""
    for m in messages:
        if m["role"] in ("user", "assistant"):
            out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


def match_template(jinja_template: str | None) -> OllamaTemplate | None:
    """The Ollama template equivalent to `jinja_template` on every probe, or None if it is not ChatML."""
    if not jinja_template:
        return None
    try:
        first = render_jinja(jinja_template, PROBES[0])
        default = None
        head = "<|im_start|>system\n"
        if first.startswith(head) and "<|im_end|>\n" in first:
            default = first[len(head):first.index("<|im_end|>\n")]
        if any(render_jinja(jinja_template, p) != render_chatml(p, default) for p in PROBES):
            return None
    except Exception:  # noqa: BLE001 - any template we cannot render is one we do not translate
        return None
    if default is not None and '"""' in default:
        return None
    return OllamaTemplate(CHATML_GO, default, CHATML_STOPS)


def stored_template(gguf_path: Path) -> str | None:
    """The chat template a GGUF file carries (tokenizer.chat_template), if any."""
    from ..export.gguf.metadata import read_value

    return read_value(gguf_path, "tokenizer.chat_template")


def modelfile(gguf_name: str, mmproj_name: str | None, template: OllamaTemplate | None) -> str:
    """The Modelfile text; paths are relative to the output folder (Ollama resolves them from the Modelfile)."""
    stem = PurePosixPath(gguf_name).stem
    lines = ["# Ollama, in this folder:", f"#   ollama create {stem.lower()} -f {stem}.Modelfile",
             f"#   ollama run {stem.lower()}", f"FROM ./{gguf_name}"]
    if mmproj_name:
        lines.append(f"FROM ./{mmproj_name}")
    if template is None:
        lines.append("# The checkpoint's chat template is not ChatML, so no TEMPLATE is written: Ollama uses the one it "
                     "recognises in the GGUF file, if any. Check a conversation before shipping.")
    else:
        lines.append(f'TEMPLATE """{template.template}"""')
        if template.system is not None:
            lines.append(f'SYSTEM """{template.system}"""')
        lines += [f'PARAMETER stop "{s}"' for s in template.stops]
    return "\n".join(lines) + "\n"


def write_modelfiles(manifest: dict, root: Path) -> list[str]:
    """One `<stem>.Modelfile` per GGUF deliverable of a passed run; returns their names."""
    from .deliverables import deliverables

    written = []
    for d in deliverables(manifest):
        if d.runtime.stage != "gguf" or not (root / d.name).is_file():
            continue
        mmproj = (d.stage["details"].get("mmproj") or {}).get("file")
        text = modelfile(d.name, mmproj, match_template(stored_template(root / d.name)))
        name = f"{PurePosixPath(d.name).stem}.Modelfile"
        atomic.write_text(root / name, text)
        written.append(name)
    return written
