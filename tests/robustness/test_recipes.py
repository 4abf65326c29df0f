"""Recipes and command-line misuse: refused before any work, naming the file and key."""

import pytest

from .conftest import assert_refused, cli

BAD_RECIPES = {
    # case: (recipe text, words the one error line must contain)
    "malformed yaml": ("name: r\nmodel: smollm2-135m\nstages: [rtn\n", ["r.yaml:4", "not valid YAML"]),
    "empty file": ("", ["r.yaml", "empty"]),
    "not a mapping": ("- rtn\n- awq\n", ["r.yaml", "mapping"]),
    "unknown top-level key": ("model: smollm2-135m\ncolour: red\nstages: [rtn]\n", ["r.yaml", "colour"]),
    "unknown stage setting": ("model: smollm2-135m\nstages:\n  - rtn: {bitz: 4}\n", ["r.yaml", "bitz"]),
    "unknown stage": ("model: smollm2-135m\nstages:\n  - rtm: {}\n", ["r.yaml", "rtm"]),
    "wrong type": ("model: smollm2-135m\nstages:\n  - rtn: {bits: four}\n", ["r.yaml", "bits"]),
    "unsupported bit width": ("model: smollm2-135m\nstages:\n  - rtn: {bits: 3}\n", ["r.yaml", "bits"]),
    "negative eval tokens": ("model: smollm2-135m\ndata: {eval_tokens: -1}\nstages: [rtn]\n", ["r.yaml", "eval_tokens"]),
    "gate of the wrong type": ("model: smollm2-135m\nstages:\n  - rtn: {gate: 0.5}\n", ["r.yaml", "gate"]),
    "unknown gate key": ("model: smollm2-135m\nstages:\n  - rtn: {gate: {max_ppl: 0.5}}\n", ["r.yaml", "max_ppl"]),
    "stages not a list": ("model: smollm2-135m\nstages: rtn\n", ["r.yaml", "stages"]),
    "stage with two names": ("model: smollm2-135m\nstages:\n  - {rtn: {}, awq: {}}\n", ["r.yaml", "exactly one key"]),
    "empty stage list": ("model: smollm2-135m\nstages: []\n", ["r.yaml", "stages"]),
    "stage item a number": ("model: smollm2-135m\nstages: [4]\n", ["r.yaml", "stages"]),
    "missing model": ("stages: [rtn]\n", ["r.yaml", "model"]),
    "model that does not exist": ("model: /no/such/folder\nstages: [rtn]\n", ["r.yaml", "/no/such/folder"]),
    "unknown text set": ("model: smollm2-135m\ndata: {evaluation: [no-such-set]}\nstages: [rtn]\n",
                         ["r.yaml", "no-such-set"]),
    "missing calibration file": ("model: smollm2-135m\ndata: {calibration: [/no/such.txt]}\nstages: [awq]\n",
                                 ["r.yaml", "/no/such.txt"]),
    "impossible prune target": ("model: smollm2-135m\nstages:\n  - prune: {target_params: 1.5}\n",
                                ["r.yaml", "target_params"]),
    "group size that divides nothing": ("model: smollm2-135m\nstages:\n  - rtn: {bits: 4, group_size: 0}\n",
                                        ["r.yaml", "group_size"]),
    "binary garbage": (b"\x00\x01\x02\xff", ["r.yaml", "UTF-8"]),
    # a name is a label, never a path (out/NAME is the default output folder)
    "empty name": ("name: ''\nmodel: smollm2-135m\nstages: [rtn]\n", ["r.yaml:1", "name", "label"]),
    "absolute path as name": ("name: /tmp/elsewhere\nmodel: smollm2-135m\nstages: [rtn]\n", ["r.yaml:1", "name"]),
    "parent folder as name": ("name: '..'\nmodel: smollm2-135m\nstages: [rtn]\n", ["r.yaml:1", "name"]),
    "nested path as name": ("name: a/b\nmodel: smollm2-135m\nstages: [rtn]\n", ["r.yaml:1", "name"]),
    "dot as name": ("name: .\nmodel: smollm2-135m\nstages: [rtn]\n", ["r.yaml:1", "name"]),
    "name too long": (f"name: {'x' * 65}\nmodel: smollm2-135m\nstages: [rtn]\n", ["r.yaml:1", "name"]),
    "name with a newline": ("name: \"a\\nb\"\nmodel: smollm2-135m\nstages: [rtn]\n", ["r.yaml:1", "name"]),
    "name a number": ("name: 12\nmodel: smollm2-135m\nstages: [rtn]\n", ["r.yaml:1", "name"]),
    # YAML that is small on disk but not as data
    "alias bomb": ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                   "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                   "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
                   "g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]\n"
                   "model: smollm2-135m\nstages: [rtn]\n", ["r.yaml", "more than 100,000 values"]),
    "self-referencing alias": ("model: smollm2-135m\ndata: &d {evaluation: *d}\nstages: [rtn]\n",
                               ["r.yaml:2", "contains it"]),
    "self-referencing list": ("model: smollm2-135m\nstages: &s [rtn, *s]\n", ["r.yaml:2", "contains it"]),
    "list as a key": ("model: smollm2-135m\n[a, b]: 1\nstages: [rtn]\n", ["r.yaml:2", "key", "list"]),
    "mapping as a key": ("model: smollm2-135m\n? {a: 1}\n: 2\nstages: [rtn]\n", ["r.yaml:2", "key", "mapping"]),
    "nested too deeply": ("model: smollm2-135m\nx: " + "[" * 5000 + "]" * 5000 + "\nstages: [rtn]\n",
                          ["r.yaml", "nested too deeply"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_is_refused_before_any_work(tmp_path, case):
    text, needles = BAD_RECIPES[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "out"
    assert_refused(cli("run", recipe, "--out", out), 2, *needles, out=out)


def test_missing_recipe_file(tmp_path):
    out = tmp_path / "out"
    assert_refused(cli("run", tmp_path / "nope.yaml", "--out", out), 2, "nope.yaml", out=out)


def test_recipe_that_is_a_folder(tmp_path):
    out = tmp_path / "out"
    assert_refused(cli("run", tmp_path, "--out", out), 2, str(tmp_path), out=out)


CLI_MISUSE = {
    # case: (arguments, words click's or our error must contain)
    "command without --model": (["rtn", "--bits", "4"], "--model"),
    "unknown option": (["rtn", "--model", "smollm2-135m", "--bitz", "4"], "--bitz"),
    "bad choice": (["export", "gguf", "--model", "smollm2-135m", "--type", "Q9_9"], "Q9_9"),
    "bad number": (["rtn", "--model", "smollm2-135m", "--bits", "four"], "four"),
    "unknown command": (["compress", "--model", "smollm2-135m"], "compress"),
    "unknown device": (["rtn", "--model", "smollm2-135m", "--device", "tpu"], "tpu"),
}


@pytest.mark.parametrize("case", sorted(CLI_MISUSE))
def test_cli_misuse_is_a_usage_error(tmp_path, case):
    args, needle = CLI_MISUSE[case]
    result = cli(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["''", "..", "/tmp"])
def test_a_name_never_reaches_files_outside_the_output(tmp_path, name):
    """`name: ""` with --overwrite used to replace the whole out/ folder, another run's folder and a user's file with it."""
    (tmp_path / "out" / "other-run").mkdir(parents=True)
    (tmp_path / "out" / "other-run" / "manifest.json").write_text('{"tool": {"name": "minicpm-compress"}}')
    (tmp_path / "out" / "notes.txt").write_text("mine")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: {name}\nmodel: smollm2-135m\nstages: [rtn]\n")
    assert_refused(cli("run", recipe, "--overwrite", cwd=tmp_path), 2, "r.yaml:1", "name")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt", "other-run"]
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
