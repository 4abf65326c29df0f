"""Rerunning a recipe reuses the leading stages whose inputs and settings are unchanged, and the output
is the same bytes as a run that reused nothing."""

import hashlib
import json
import os

import pytest
from click.testing import CliRunner

from minicpm_compress import atomic
from minicpm_compress.cli import main
from minicpm_compress.stage_cache import StageCache, checkpoint_files_key

DATA = "data: {eval_tokens: 256, eval_window: 128, calibration_samples: 4, sequence_length: 64}\n"
STAGES = "  - awq: {bits: 4, group_size: 32%s}\n  - gguf: {type: %s}\n"


@pytest.fixture
def cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICPM_COMPRESS_STAGE_CACHE", str(tmp_path / "stages"))
    return tmp_path / "stages"


def _run(tmp_path, checkpoint, out, gguf="Q4_0", gate="", *flags):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {checkpoint}\n{DATA}stages:\n" + STAGES % (gate, gguf))
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / out), *flags])
    manifest = tmp_path / out / "manifest.json"
    return result, json.loads(manifest.read_text()) if manifest.is_file() else None


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ("report.md", "manifest.json")}


def test_changing_the_last_stage_reruns_only_it(tmp_path, tiny_checkpoint, cached):
    checkpoint = tiny_checkpoint("llama")
    first, m1 = _run(tmp_path, checkpoint, "a")
    assert first.exit_code == 0, first.stderr
    assert not any(s.get("reused") for s in m1["stages"]) and "reused" not in first.stderr

    second, m2 = _run(tmp_path, checkpoint, "b", "Q8_0")  # only the exporter changed
    assert second.exit_code == 0, second.stderr
    assert [s.get("reused", False) for s in m2["stages"]] == [False, True, False]
    assert "[1] awq: reused from the stage cache" in second.stderr and "[2] gguf: ppl" in second.stderr
    assert m2["stages"][1]["metrics"] == m1["stages"][1]["metrics"]
    assert "| reused |" in (tmp_path / "b/report.md").read_text()

    fresh, _ = _run(tmp_path, checkpoint, "c", "Q8_0", "", "--no-cache")  # nothing reused: the same bytes
    assert fresh.exit_code == 0, fresh.stderr
    assert _hashes(tmp_path / "b") == _hashes(tmp_path / "c")

    again, m3 = _run(tmp_path, checkpoint, "d", "Q8_0")  # everything reused, the exported file put back
    assert again.exit_code == 0, again.stderr
    assert [s.get("reused", False) for s in m3["stages"]] == [False, True, True]
    assert _hashes(tmp_path / "d") == _hashes(tmp_path / "c")
    # the previous run's entries that this recipe no longer uses (awq → gguf Q4_0) are gone
    assert len([p for p in cached.iterdir() if p.name != "runs"]) == 2


def test_a_reused_stage_meets_the_new_gate_and_a_changed_cached_file_is_not_reused(tmp_path, tiny_checkpoint, cached):
    checkpoint = tiny_checkpoint("llama")
    assert _run(tmp_path, checkpoint, "a")[0].exit_code == 0
    failed, m = _run(tmp_path, checkpoint, "b", "Q4_0", ", gate: {max_kld: 0.000001}")
    assert failed.exit_code == 3 and m["stages"][1]["reused"] and "KL divergence 0.2" in failed.stderr
    reused, _ = _run(tmp_path, checkpoint, "a2")  # a failed run drops no entry: both stages come back
    assert reused.exit_code == 0 and "[2] gguf: reused" in reused.stderr
    # outputs hold copies: changing one in place changes neither the cache nor another output
    copy = tmp_path / "a2/model-Q4_0.gguf"
    last = copy.read_bytes()[-1]
    with open(copy, "r+b") as f:
        f.seek(-1, 2)
        f.write(bytes([last ^ 0xFF]))
    assert _hashes(tmp_path / "a") != _hashes(tmp_path / "a2")
    assert _run(tmp_path, checkpoint, "c")[1]["stages"][2]["reused"]
    assert _hashes(tmp_path / "c") == _hashes(tmp_path / "a")
    # a damaged cache entry is not reused: the stage runs again
    (cached_file,) = cached.glob("*/files/model-Q4_0.gguf")
    cached_file.write_bytes(cached_file.read_bytes()[:-1])
    rerun, m2 = _run(tmp_path, checkpoint, "d")
    assert rerun.exit_code == 0, rerun.stderr
    assert [s.get("reused", False) for s in m2["stages"]] == [False, True, False]
    assert _hashes(tmp_path / "d") == _hashes(tmp_path / "a")


# ---------------------------------------------------------------- what belongs in the key


def _set_chat_template(folder, template):
    """Where transformers reads it: chat_template.jinja wins over tokenizer_config.json when both exist
    (transformers 5 saves the template to the .jinja file), so a template is set in the one it reads."""
    if (folder / "chat_template.jinja").is_file():
        (folder / "chat_template.jinja").write_text(template)
        return
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


CHANGES = {
    # each alone must change the key: all of them reach an artifact (GGUF metadata, runtime folders, HANDOFF.md)
    "chat template": lambda f: _set_chat_template(f, "{% for m in messages %}<<{{ m.content }}>>{% endfor %}"),
    "chat_template.jinja": lambda f: (f / "chat_template.jinja").write_text("{{ messages }}"),
    "tokenizer.json": lambda f: (f / "tokenizer.json").write_text((f / "tokenizer.json").read_text().replace("}", " }", 1)),
    "special tokens": lambda f: (f / "special_tokens_map.json").write_text('{"eos_token": "<|end|>"}'),
    "generation config": lambda f: (f / "generation_config.json").write_text('{"temperature": 0.1}'),
    "image settings": lambda f: (f / "preprocessor_config.json").write_text('{"image_size": 448}'),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_non_weight_file_of_the_checkpoint_is_in_the_key(tiny_checkpoint, change):
    folder = tiny_checkpoint("llama")
    before = checkpoint_files_key(folder)
    assert checkpoint_files_key(folder) == before  # deterministic
    CHANGES[change](folder)
    assert checkpoint_files_key(folder) != before


def test_weight_files_are_left_to_the_model_fingerprint(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    before = checkpoint_files_key(folder)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes() + b" ")
    assert checkpoint_files_key(folder) == before


def test_a_changed_chat_template_is_a_miss_and_reaches_the_gguf(tmp_path, tiny_checkpoint, cached):
    """The bug: a second checkpoint's export was reused from the cache with the first one's chat template."""
    import gguf

    checkpoint = tiny_checkpoint("llama")
    _set_chat_template(checkpoint, "{{ 'first' }}")
    assert _run(tmp_path, checkpoint, "a")[0].exit_code == 0
    _set_chat_template(checkpoint, "{{ 'second' }}")
    result, m = _run(tmp_path, checkpoint, "b")
    assert result.exit_code == 0, result.stderr
    assert not any(s.get("reused") for s in m["stages"])
    field = gguf.GGUFReader(tmp_path / "b/model-Q4_0.gguf").fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == "{{ 'second' }}"


# ---------------------------------------------------------------- size budget, eviction, clean-up


def test_an_entry_larger_than_the_budget_is_not_stored_and_the_run_says_so(tmp_path, tiny_checkpoint, cached, monkeypatch):
    monkeypatch.setenv("MINICPM_COMPRESS_STAGE_CACHE_SIZE", "1KB")
    result, m = _run(tmp_path, tiny_checkpoint("llama"), "a")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("stage cache: not storing this stage") == 2, result.stderr
    assert [p for p in cached.iterdir() if p.name != "runs"] == []


def _fake_entry(root, name, size, used):
    entry = root / name
    entry.mkdir(parents=True)
    (entry / "files").mkdir()
    (entry / "files" / "blob").write_bytes(b"0" * size)
    (entry / "record.json").write_text("{}")
    os.utime(entry / "record.json", (used, used))
    return entry


def test_eviction_removes_least_recently_used_entries_until_the_budget_fits(tmp_path):
    cache = StageCache(tmp_path, "r", budget=2500)
    a, b, c, d = (_fake_entry(tmp_path, f"{i:032x}", 1000, used=1000 + i) for i in range(4))  # a oldest
    cache.evict(keep={a.name})  # 4000 bytes: two must go, never a (the running recipe's own)
    assert [p.name for p in cache.entries()] == [a.name, d.name]
    assert len(cache.notes) == 2 and all("least recently used" in n for n in cache.notes)
    cache.touch(a.name)  # used now: d is the oldest
    assert cache.entries()[0].name == d.name


def test_cache_command_shows_and_clears(tmp_path, cached):
    for i in range(2):
        _fake_entry(cached, f"{i:032x}", 2 * 2**20, used=1000 + i)
    shown = CliRunner().invoke(main, ["cache"])
    assert shown.exit_code == 0 and f"stage cache {cached}: 2 entries, 4 MiB of a 10.0 GiB budget" in shown.output
    cleared = CliRunner().invoke(main, ["cache", "--clear"])
    assert cleared.exit_code == 0 and "4 MiB freed" in cleared.output
    assert [p for p in cached.iterdir()] == []


def test_a_killed_store_is_swept_unless_its_writer_is_alive(tmp_path, cached):
    cached.mkdir()
    dead = cached / f".{'a' * 32}.k3j4x9_a.partial"
    alive = cached / f".{'b' * 32}.m2n7q1_b.partial"
    for staging in (dead, alive):
        staging.mkdir()
        (staging / "record.json").write_text("{}")
    with atomic.exclusive(cached / ("b" * 32)):  # a live run is storing entry bbbb…
        StageCache.open(type("R", (), {"name": "r"}))
    assert not dead.exists() and alive.exists()


def test_a_record_of_the_wrong_shape_is_not_reused(tmp_path, tiny_checkpoint, cached):
    checkpoint = tiny_checkpoint("llama")
    assert _run(tmp_path, checkpoint, "a")[0].exit_code == 0
    for record in cached.glob("*/record.json"):
        data = json.loads(record.read_text())
        del data["metrics"]["tokens"]
        record.write_text(json.dumps(data))
    result, m = _run(tmp_path, checkpoint, "b")
    assert result.exit_code == 0, result.stderr
    assert not any(s.get("reused") for s in m["stages"])
