import json

import pytest
import torch

from minicpm_compress.data import textsets
from minicpm_compress.errors import CompressError


def test_heldout_sets_never_overlap_calibration_sets():
    for calib, held in (("austen-calib", "austen-heldout"), ("zh-calib", "zh-heldout")):
        calib_docs, held_docs = set(textsets.read_documents(calib)), textsets.read_documents(held)
        assert len(held_docs) > 100 and len(calib_docs) > 1000
        long_held = [d for d in held_docs if len(d) > 80]  # short lines ("CHAPTER 1") may repeat by nature
        assert long_held and not any(d in calib_docs for d in long_held)


def test_evaluation_is_in_reading_order_and_sized(tokenizer):
    windows = textsets.evaluation_windows(tokenizer, ["austen-heldout"], 2048, 512)
    assert windows.shape == (4, 512)
    assert tokenizer.decode(windows[0][:12]).startswith("Persuasion")
    assert textsets.evaluation_windows(tokenizer, ["austen-heldout", "zh-heldout"], 2048, 512).shape == (4, 512)


def test_calibration_is_seeded_and_mixes_sources(tokenizer):
    sources = [("austen-calib", 3), ("zh-calib", 1)]
    a = textsets.calibration_samples(tokenizer, sources, 8, 128, seed=0)
    b = textsets.calibration_samples(tokenizer, sources, 8, 128, seed=0)
    c = textsets.calibration_samples(tokenizer, sources, 8, 128, seed=1)
    assert a.shape == (8, 128) and torch.equal(a, b) and not torch.equal(a, c)
    text = [tokenizer.decode(row) for row in a]
    han = [sum("\u4e00" <= ch <= "\u9fff" for ch in t) for t in text]
    assert all(h == 0 for h in han[:6]) and sum(han[6:]) > 30  # 6 English samples, then 2 Chinese
    assert not any("\x1b" in t for t in text)


def test_user_text_and_jsonl_files(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    assert textsets.read_documents(str(tmp_path / "a.txt")) == ["first paragraph", "second paragraph"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert textsets.read_documents(str(tmp_path / "b.jsonl")) == ["one", "two"]


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", "\n\n", "empty.txt: contains no text"),
    ("bad.jsonl", '{"text": "ok"}\n{"txt": "no"}\n', "bad.jsonl:2: each line needs a string field 'text'"),
    ("broken.jsonl", '{"text": \n', "broken.jsonl:1: not valid JSON"),
])
def test_bad_user_files_are_named(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(CompressError, match=message):
        textsets.read_documents(str(tmp_path / name))


def test_too_little_text_is_refused(tmp_path, tokenizer):
    (tmp_path / "short.txt").write_text("only a few words here")
    with pytest.raises(CompressError, match=r"calibration source '.*short.txt' has \d+ tokens, fewer than the 1024"):
        textsets.calibration_samples(tokenizer, [(str(tmp_path / "short.txt"), 1)], 2, 512, seed=0)
    with pytest.raises(CompressError, match="evaluation source .* fewer than the 512 needed"):
        textsets.evaluation_windows(tokenizer, [str(tmp_path / "short.txt")], 512, 512)
    with pytest.raises(CompressError, match="not a built-in text set"):
        textsets.read_documents("no-such-set")
