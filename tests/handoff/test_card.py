from minicpm_compress.handoff import HANDOFF_NAME, HTML_NAME, write_handoff
from minicpm_compress.handoff.card import render_handoff
from minicpm_compress.handoff.deliverables import deliverables
from minicpm_compress.handoff.tiers import recommendations

from .conftest import MIB, make_manifest


def test_deliverables_group_files_per_exporter_stage_and_leave_out_support_files(manifest):
    items = deliverables(manifest)
    assert [d.name for d in items] == ["model-Q8_0.gguf", "model-Q4_0.gguf", "onnx-int4/"]
    assert [len(d.files) for d in items] == [1, 1, 2]  # no imatrix, no quantized.safetensors
    assert items[2].bytes == 900 * MIB + 1000


def test_ram_grows_with_context_and_stops_at_the_context_a_file_was_built_for(manifest):
    q8, q4, onnx = deliverables(manifest)
    assert q8.ram_bytes(2048) == 3064 * MIB and q8.ram_bytes(8192) == 3256 * MIB  # 64 MiB of KV per 2k tokens
    assert onnx.ram_bytes(1024) == 900 * MIB + 1000 + 32 * MIB
    assert onnx.ram_bytes(2048) is None and onnx.ram_bytes(8192) is None


def test_device_tiers_follow_ram_and_accuracy(manifest):
    recs = dict(recommendations(deliverables(manifest)))
    names = {gb: {label: d.name if d else None for label, d in picks.items()} for gb, picks in recs.items()}
    # 2 GB: half is 1e9 bytes; Q4_0 + KV at 2k is 1.01e9; the ONNX folder at its own 1024 tokens is 0.98e9
    assert names[2] == {"llama.cpp": None, "onnxruntime-genai": "onnx-int4/"}
    assert names[3]["llama.cpp"] == names[6]["llama.cpp"] == "model-Q4_0.gguf"  # Q8_0 needs 3.2e9 bytes
    assert names[8]["llama.cpp"] == names[16]["llama.cpp"] == "model-Q8_0.gguf"  # fits: the lower KLD wins


def test_card_states_the_numbers_licence_and_load_code(manifest, tmp_path):
    card = render_handoff(manifest, tmp_path)
    assert "Licence of the source model: **apache-2.0**" in card
    assert "| 2 GB | nothing fits | `onnx-int4/` |" in card and "| 8 GB | `model-Q8_0.gguf` | `onnx-int4/` |" in card
    assert "| `model-Q8_0.gguf` | llama.cpp | 3,000.0 MiB | 8.50 | 3,064.0 MiB | 3,256.0 MiB |" in card
    assert "n/a (built for 1024)" in card and "the files hold at most 1024 tokens of context" in card
    assert 'Llama(model_path="model-Q4_0.gguf"' in card and 'og.Model("onnx-int4")' in card
    assert "`" + "a" * 64 + "`" in card and "imatrix.gguf" not in card
    assert "llama-cpp-python 0.3.36" in card and "onnxruntime-genai 0.18.0 or newer" in card
    assert "```jinja\n{{ messages }}\n```" in card


def test_no_licence_is_said_and_a_failed_run_gets_no_card(tmp_path):
    card = render_handoff(make_manifest(licence=None), tmp_path)
    assert "not stated by the source checkpoint" in card
    failed = make_manifest()
    failed["status"], failed["artifacts"] = "failed", []
    assert render_handoff(failed, tmp_path) is None
    write_handoff(failed, tmp_path)
    assert (tmp_path / HTML_NAME).is_file() and not (tmp_path / HANDOFF_NAME).exists()


HOSTILE_TEMPLATE = ("{% for m in messages %}{{ m.content }}{% endfor %}\n```\n# Install our app instead\n"
                    "<script>alert(1)</script>\n[download](http://example.invalid/x.apk)\n````")


def _tokens(markdown_text):
    from markdown_it import MarkdownIt

    def walk(tokens):
        for t in tokens:
            yield t
            yield from walk(t.children or [])

    return list(walk(MarkdownIt("commonmark").parse(markdown_text)))


def test_strings_from_the_checkpoint_cannot_escape_their_place_in_the_card(tmp_path):
    """A chat template with a fence in it used to end the card's code block; names, licence and special
    tokens come from the checkpoint too. Parsed as a CommonMark renderer does: no heading, HTML or link of
    theirs, and the template verbatim inside one code block."""
    manifest = make_manifest(licence="MIT <img src=x onerror=alert(1)> [terms](http://example.invalid)")
    manifest["model"] = "/models/# owned\n<b>x</b>`y`"
    manifest["reference"] = "ref ``` [a](http://example.invalid)"
    details = manifest["stages"][0]["details"]
    details["model_type"] = "<i>llama</i>"
    details["tokenizer"].update(chat_template=HOSTILE_TEMPLATE, eos_token="</s>`<script>`", **{"class": "T<hr>"})
    tokens = _tokens(render_handoff(manifest, tmp_path))
    assert not [t for t in tokens if t.type in ("html_block", "html_inline", "link_open", "image")]
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert not [h for h in headings if "Install" in h or "owned" in h.lower() and not h.startswith("Hand-off")]
    fences = [t for t in tokens if t.type == "fence" and t.info == "jinja"]
    assert len(fences) == 1 and fences[0].content == HOSTILE_TEMPLATE + "\n"
    assert headings[-1] == "Tokenizer and prompt format"  # the card goes on as written after the template
