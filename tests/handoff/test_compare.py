import json

from click.testing import CliRunner

from minicpm_compress.cli import main

from .conftest import make_manifest


def _folder(tmp_path, name, manifest):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _compare(*args):
    return CliRunner().invoke(main, ["compare", *map(str, args)])


def test_one_table_across_runs_with_the_frontier_marked(tmp_path):
    a = _folder(tmp_path, "a", make_manifest())
    other = make_manifest(small=500 * 2**20)
    other["stages"][2]["metrics"]["kld"] = 0.3  # b's files are smaller (500 MiB); its Q4_0 worse than a's
    b = _folder(tmp_path, "b", other)
    result = _compare(a, b, "--plot", tmp_path / "f.png")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()[2:8]]
    assert [r[:2] for r in rows] == [["b", "model-Q4_0.gguf"], ["b", "onnx-int4/"], ["a", "model-Q4_0.gguf"],
                                     ["a", "onnx-int4/"], ["a", "model-Q8_0.gguf"], ["b", "model-Q8_0.gguf"]]
    # b's ONNX (500 MiB, KLD 0.15) beats a's Q4_0 and ONNX (900 MiB, 0.20 and 0.15); b's Q8_0 only ties a's
    assert [r[-1] == "*" for r in rows] == [True, True, False, False, True, False]
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_runs_measured_differently_or_not_runs_are_refused(tmp_path):
    a = _folder(tmp_path, "a", make_manifest())
    other = make_manifest()
    other["stages"][0]["metrics"]["tokens"] = 1024
    b = _folder(tmp_path, "b", other)
    result = _compare(a, b)
    assert result.exit_code == 2 and "not comparable" in result.stderr and str(b) in result.stderr
    result = _compare(a, tmp_path / "missing")
    assert result.exit_code == 2 and "manifest.json: not found" in result.stderr
    failed = make_manifest()
    failed["status"], failed["artifacts"] = "failed", []
    result = _compare(a, _folder(tmp_path, "c", failed))
    assert result.exit_code == 2 and "holds no artifact to compare (status failed)" in result.stderr


def test_compare_two_real_recipe_outputs(ci_output, tmp_path, minicpm_path):
    folder, _ = ci_output
    second = tmp_path / "q8"
    made = CliRunner().invoke(main, ["export", "gguf", "--model", "minicpm-smollm2", "--type", "Q8_0",
                                     "--eval-tokens", "1024", "--out", str(second)])
    assert made.exit_code == 0, made.stderr
    result = _compare(folder, second)
    assert result.exit_code == 0, result.stderr
    lines = result.output.splitlines()
    assert sum(line.startswith("ci ") for line in lines) == 7  # every artifact of the CI recipe
    q8 = [line for line in lines if line.startswith("q8 ")]
    assert len(q8) == 1 and "model-Q8_0.gguf" in q8[0]


def test_plot_labels_are_shown_as_written_not_as_math(tmp_path):
    """A folder name with `$…$` made matplotlib parse it as math text and fail (an unbalanced `$` or `\\frac{`)."""
    a = _folder(tmp_path, "run $\\frac{ $x^", make_manifest())
    b = _folder(tmp_path, "cost_$5", make_manifest(small=500 * 2**20))
    result = _compare(a, b, "--plot", tmp_path / "f.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
