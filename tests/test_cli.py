"""The command line: subspace building, help texts, the check command's wiring, and every
user error reported as one line with exit status 2 before any slow work starts."""

import json
import os

import pytest

from gradproj import ConceptSubspace, cli
from gradproj.lab import shapes


def _prompts(tmp_path):
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("red circle on dark acme\tred circle on dark plain\n"
                       "blue square on light acme\tblue square on light plain\n")  # fmt: skip
    return prompts


def test_subspace_from_a_config_and_a_tab_separated_prompt_file(tmp_path, capsys):
    config = tmp_path / "config.json"
    shapes.text_encoder().config.to_json_file(config)
    shapes.tokenizer().save_pretrained(tmp_path / "tok")
    out = tmp_path / "acme.safetensors"
    argv = ["subspace", "--text-encoder", str(config), "--tokenizer", str(tmp_path / "tok"),
            "--prompts", str(_prompts(tmp_path)), "--out", str(out), "--k", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    sub = ConceptSubspace.load(out)
    assert (sub.dim, sub.k) == (32, 2)
    assert sub.metadata["mode"] == "difference"
    assert json.dumps(sub.metadata["neutral_prompts"]).count("plain") == 2


def test_subspace_without_a_tokenizer_is_an_error_not_a_stand_in(tmp_path, capsys):
    """Another tokenizer gives other token ids, so a subspace of something else: refused."""
    config = tmp_path / "config.json"
    shapes.text_encoder().config.to_json_file(config)
    out = tmp_path / "acme.safetensors"
    status = cli.main(["subspace", "--text-encoder", str(config), "--prompts",
                       str(_prompts(tmp_path)), "--out", str(out), "--k", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and not out.exists()
    assert err.startswith("gradproj subspace: error: --text-encoder ")
    assert "cannot load a tokenizer" in err and "--tokenizer" in err


def test_subspace_rejects_a_half_tabbed_prompt_file(tmp_path, capsys):
    config = tmp_path / "config.json"
    shapes.text_encoder().config.to_json_file(config)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle on dark acme\tred circle on dark plain\nblue square acme\n")
    assert cli.main(["subspace", "--text-encoder", str(config), "--prompts", str(prompts),
                     "--out", str(tmp_path / "x.safetensors")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "1 of 2 lines have a tab (line 2 has none)" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["demo", "subspace", "check"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: gradproj " + command in capsys.readouterr().out


# ---------------------------------------------------------------- user errors
# Each: exit status 2, one line "gradproj <command>: error: ..." on stderr, no traceback,
# and nothing heavy (encoder loading, training, the check's models) was started.


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Make every slow entry point fail the test if a command reaches it."""
    from gradproj import check
    from gradproj.lab import demo
    from gradproj.lab import evaluate as comparison

    def heavy(*args, **kwargs):
        pytest.fail("the command started its work before rejecting its arguments")

    monkeypatch.setattr(cli, "_load_text_encoder", heavy)
    monkeypatch.setattr(demo, "run", heavy)
    monkeypatch.setattr(comparison, "run", heavy)
    monkeypatch.setattr(check, "run", heavy)


def _user_error(argv, capsys) -> str:
    """Run the command; assert it failed as a user error; return the message."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    prefix = f"gradproj {argv[0]}: error: "
    assert lines[0].startswith(prefix), err
    return lines[0][len(prefix) :]


@pytest.fixture
def subspace_args(tmp_path):
    """A valid subspace command line (config.json encoder, tabbed prompts); tests break one part."""
    config = tmp_path / "config.json"
    shapes.text_encoder().config.to_json_file(config)
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("red circle acme\tred circle plain\nblue square acme\tblue square plain\n")
    return {
        "--text-encoder": str(config),
        "--prompts": str(prompts),
        "--out": str(tmp_path / "acme.safetensors"),
    }


def _subspace(args: dict, *extra: str) -> list[str]:
    return ["subspace", *(x for kv in args.items() for x in kv), *extra]


def test_missing_prompt_file(subspace_args, tmp_path, no_heavy_work, capsys):
    subspace_args["--prompts"] = str(tmp_path / "nowhere.txt")
    message = _user_error(_subspace(subspace_args), capsys)
    assert message.startswith("--prompts ") and "nowhere.txt" in message
    assert "No such file" in message


def test_non_utf8_prompt_file(subspace_args, tmp_path, no_heavy_work, capsys):
    prompts = tmp_path / "latin1.txt"
    prompts.write_bytes("a red acme mug\nun caf\xe9 acme\n".encode("latin-1"))
    subspace_args["--prompts"] = str(prompts)
    message = _user_error(_subspace(subspace_args), capsys)
    assert "not UTF-8" in message and "line 2" in message and "0xe9" in message


def test_missing_encoder_folder_is_called_a_local_path(
    subspace_args, tmp_path, no_heavy_work, capsys
):
    subspace_args["--text-encoder"] = str(tmp_path / "sd-v1-5" / "text_encoder")
    message = _user_error(_subspace(subspace_args), capsys)
    assert message.startswith("--text-encoder ") and "no such folder" in message
    assert "local folder" in message and "hub" not in message.lower()


def test_broken_pipeline_folder_is_one_line(subspace_args, tmp_path, capsys):
    """A pipeline folder is loaded (tests/test_subspace_pipelines.py); a broken one is an error."""
    pipeline = tmp_path / "sdxl"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    subspace_args["--text-encoder"] = str(pipeline)
    message = _user_error(_subspace(subspace_args), capsys)
    assert message.startswith(f"--pipeline {pipeline}: cannot load it")
    (pipeline / "model_index.json").write_text("{not json")
    message = _user_error(_subspace(subspace_args), capsys)
    assert message.startswith(f"--pipeline {pipeline}: ") and "Expecting" in message


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--energy", "1.5"], "--energy must lie in (0, 1], got 1.5"),
        (["--energy", "0"], "--energy must lie in (0, 1], got 0.0"),
        (["--energy", "nan"], "--energy must lie in (0, 1], got nan"),
        (["--ridge", "-1"], "--ridge must be a finite number ≥ 0, got -1.0"),
        (["--ridge", "inf"], "--ridge must be a finite number ≥ 0, got inf"),
        (["--k", "-3"], "--k must be at least 1, got -3"),
        (["--k", "0"], "--k must be at least 1, got 0"),  # said "give k or energy, not both"
        (["--k", "33"], "--k 33: the encoder's states have only 32 dimensions"),
        (["--k", "2", "--energy", "0.9"], "give --k or --energy, not both"),
    ],
)
def test_bad_subspace_numbers(subspace_args, extra, expected, no_heavy_work, capsys):
    assert _user_error(_subspace(subspace_args, *extra), capsys) == expected


def test_prompt_line_with_two_tabs_names_the_line(subspace_args, tmp_path, no_heavy_work, capsys):
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("a acme\ta plain\n\nb acme\tb plain\textra\n")
    subspace_args["--prompts"] = str(prompts)
    message = _user_error(_subspace(subspace_args), capsys)
    assert "line 3 has 2 tabs" in message  # line numbers count the blank line too


def test_unwritable_subspace_out_is_found_before_the_encoder_runs(
    subspace_args, tmp_path, no_heavy_work, capsys
):
    subspace_args["--out"] = str(tmp_path / "missing" / "acme.safetensors")
    message = _user_error(_subspace(subspace_args), capsys)
    assert message == f"--out {subspace_args['--out']}: {tmp_path / 'missing'} does not exist"

    (tmp_path / "a-file").write_text("")
    subspace_args["--out"] = str(tmp_path / "a-file" / "acme.safetensors")
    assert "is not a folder" in _user_error(_subspace(subspace_args), capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_out_folder(subspace_args, tmp_path, no_heavy_work, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    subspace_args["--out"] = str(folder / "acme.safetensors")
    assert "is not writable" in _user_error(_subspace(subspace_args), capsys)


def test_unknown_arm_lists_the_valid_ones(no_heavy_work, capsys):
    from gradproj.lab.defenses import ARMS

    message = _user_error(["demo", "--arms", "plain,updat"], capsys)
    assert message.startswith("--arms plain,updat: unknown arm 'updat'; choose from ")
    assert all(arm in message for arm in ARMS)


@pytest.mark.parametrize("command", ["unlearn", "evaluate"])
def test_unknown_row_lists_the_valid_ones(command, no_heavy_work, capsys):
    from gradproj.lab.defenses import DEFENSES as ROWS

    message = _user_error([command, "--rows", "baseline,surgery"], capsys)
    assert message.startswith("--rows baseline,surgery: unknown row 'surgery'; choose from ")
    assert all(row in message for row in ROWS)


@pytest.mark.parametrize("command", ["demo", "unlearn", "evaluate"])
def test_zero_seeds(command, no_heavy_work, capsys):  # was an IndexError after a minute
    assert _user_error([command, "--seeds", "0"], capsys) == "--seeds must be at least 1, got 0"


@pytest.mark.parametrize("command", ["demo", "unlearn", "evaluate"])
def test_negative_steps(command, no_heavy_work, capsys):  # demo --steps -1 used to run
    assert _user_error([command, "--steps", "-1"], capsys) == "--steps must be at least 1, got -1"


@pytest.mark.parametrize("command", ["demo", "unlearn", "evaluate"])
def test_run_folder_under_a_file(command, tmp_path, no_heavy_work, capsys):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "run"
    message = _user_error([command, "--out", str(out)], capsys)
    assert message == f"--out {out}: {tmp_path / 'a-file'} exists and is not a folder"


def test_models_folder_under_a_file(tmp_path, no_heavy_work, capsys):
    (tmp_path / "a-file").write_text("")
    models = tmp_path / "a-file" / "models"
    message = _user_error(["evaluate", "--out", str(tmp_path), "--models", str(models)], capsys)
    assert message.startswith(f"--models {models}: ")


@pytest.mark.parametrize("command", ["unlearn", "evaluate"])
@pytest.mark.parametrize("settings", [None, "official", "previous"])
def test_settings_choose_the_seed_methods_settings(command, settings, tmp_path, monkeypatch):
    from gradproj.lab import evaluate as comparison

    seen = []
    monkeypatch.setattr(comparison, "run", lambda cfg, **kwargs: seen.append(cfg))
    argv = [command, "--out", str(tmp_path)] + (["--settings", settings] if settings else [])
    assert cli.main(argv) == 0
    official = comparison.ComparisonConfig()
    want = (
        comparison.PREVIOUS_SETTINGS
        if settings == "previous"
        else {k: getattr(official, k) for k in comparison.PREVIOUS_SETTINGS}
    )
    assert {k: getattr(seen[0], k) for k in want} == want
    previous = settings == "previous"
    assert seen[0].unlearn_objective == ("ablation" if previous else "adversarial")
    assert seen[0].attack_start == ("null" if previous else "prompt")
    assert seen[0].attack_pairs_per_image == (1 if previous else 8)
    assert seen[0].amg_variant == ("paper" if previous else "official")


def test_check_k_above_what_the_model_allows(no_heavy_work, capsys):
    # used to report k=100000 and project onto 16 directions
    message = _user_error(["check", "--k", "100000"], capsys)
    assert message.startswith("--k must lie in [1, 16]") and message.endswith("got 100000")
    assert _user_error(["check", "--k", "0"], capsys).endswith("got 0")
    assert _user_error(["check", "--seed", "-1"], capsys).startswith("--seed must lie in")


def test_check_run_refuses_k_above_the_concept_rank():
    from gradproj import check

    with pytest.raises(ValueError, match=r"k must lie in \[1, 16\]"):
        check.run(k=17)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_raises_with_the_traceback(where, subspace_args, no_heavy_work):
    argv = _subspace(subspace_args, "--k", "0")
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(cli.UsageError, match="--k must be at least 1, got 0"):
        cli.main(argv)


def test_internal_errors_keep_their_traceback(monkeypatch):
    from gradproj.lab import demo

    def bug(*args, **kwargs):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(demo, "run", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["demo", "--steps", "1", "--seeds", "1"])
