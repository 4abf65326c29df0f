from minicpm_compress.resolve import model_license


def test_licence_comes_from_a_builtin_or_the_checkpoints_model_card(tmp_path):
    assert model_license("minicpm-smollm2", tmp_path).startswith("Apache-2.0")
    assert model_license(str(tmp_path), tmp_path) is None  # no README.md
    (tmp_path / "README.md").write_text("---\nlanguage: [en]\nlicense: 'apache-2.0'\n---\n# Model\nlicense: mit\n")
    assert model_license(str(tmp_path), tmp_path) == "apache-2.0"  # the front matter, not the prose
    (tmp_path / "README.md").write_text("# Model\n\nlicense: mit\n")
    assert model_license(str(tmp_path), tmp_path) is None
