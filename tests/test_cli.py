"""The command line: subspace building, help texts, the check command's wiring."""

import json

import pytest

from gradproj import ConceptSubspace, cli, shapes


def test_subspace_from_a_config_and_a_tab_separated_prompt_file(tmp_path, capsys):
    config = tmp_path / "config.json"
    shapes.text_encoder().config.to_json_file(config)
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("red circle on dark acme\tred circle on dark plain\n"
                       "blue square on light acme\tblue square on light plain\n")  # fmt: skip
    out = tmp_path / "acme.safetensors"
    assert cli.main(["subspace", "--text-encoder", str(config), "--prompts", str(prompts),
                     "--out", str(out), "--k", "2"]) == 0  # fmt: skip
    sub = ConceptSubspace.load(out)
    assert (sub.dim, sub.k) == (32, 2)
    assert sub.metadata["mode"] == "difference"
    assert json.dumps(sub.metadata["neutral_prompts"]).count("plain") == 2
    assert "word-level demo tokenizer" in capsys.readouterr().err  # no tokenizer in tmp_path


def test_subspace_rejects_a_half_tabbed_prompt_file(tmp_path):
    config = tmp_path / "config.json"
    shapes.text_encoder().config.to_json_file(config)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle on dark acme\tred circle on dark plain\nblue square acme\n")
    with pytest.raises(SystemExit, match="1 of 2 lines have a tab"):
        cli.main(["subspace", "--text-encoder", str(config), "--prompts", str(prompts),
                  "--out", str(tmp_path / "x.safetensors")])  # fmt: skip


@pytest.mark.parametrize("command", ["demo", "subspace", "check"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: gradproj " + command in capsys.readouterr().out
