"""The top-level ``fastclip`` command: dispatch, help, and close-match hints for mistyped options."""

import pytest

from fastclip.cli import main


def test_no_command_prints_help_and_returns_2(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "train" in out and "bench" in out and "convert" in out


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bogus"])
    assert e.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,hint",
    [
        (["train", "--optim.lrr", "1"], "--optim.lrr (did you mean --optim.lr"),
        (["bench", "loss", "--bach", "4"], "--bach (did you mean --batch"),
        (["convert", "a", "b", "--modle", "x"], "--modle (did you mean --model?)"),
    ],
)
def test_mistyped_option_gets_the_close_match(argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and hint in err
