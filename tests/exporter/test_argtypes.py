"""Out-of-range numbers are refused while the command line is parsed, naming the option, for every stage."""

from __future__ import annotations

import argparse

import pytest

from exporter.argtypes import float_above, float_open_unit, int_at_least, int_between
from exporter.cli import main


def test_bounds():
    assert int_at_least(1)("3") == 3 and int_at_least(0)("0") == 0
    assert float_above(0.0)("1e-5") == 1e-5 and float_above(0.0, inclusive=True)("0") == 0.0
    assert float_open_unit("0.25") == 0.25 and int_between(0, 5)("5") == 5
    for parse, text in ((int_at_least(1), "0"), (int_at_least(1), "1.5"), (float_above(0.0), "0"),
                        (float_above(0.0), "nan"), (float_above(0.0, inclusive=True), "-inf"),
                        (float_open_unit, "1"), (int_between(0, 65535), "70000"), (int_at_least(0), "many")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


BAD = [
    (["learn", "--steps", "-5"], "--steps"), (["learn", "--lr", "0"], "--lr"),
    (["learn", "--holdout", "2"], "--holdout"), (["learn", "--budget", "0"], "--budget"),
    (["learn", "--tune-weights", "-1"], "--tune-weights"), (["learn", "--guidance-scale", "nan"], "--guidance-scale"),
    (["retrain", "--slim", "s", "--out", "o", "--steps", "-1"], "--steps"),
    (["retrain", "--slim", "s", "--out", "o", "--lr", "0"], "--lr"),
    (["validate", "--batch-size", "0"], "--batch-size"), (["validate", "--steps", "-5"], "--steps"),
    (["bench", "--slim", "s", "--size", "-8"], "--size"), (["bench", "--slim", "s", "--runs", "5"], "--runs"),
    (["build", "--out", "o", "--triton", "--steps", "-5"], "--steps"),
    (["build", "--out", "o", "--triton", "--guidance-scale", "nan"], "--guidance-scale"),
    (["build", "--out", "o", "--triton", "--threads", "-3"], "--threads"),
    (["serve", "--repo", "r", "--http-port", "70000"], "--http-port"),
    (["serve", "--repo", "r", "--timeout", "0"], "--timeout"),
    (["export", "--unet", "u", "--out", "o", "--atol", "-1"], "--atol"),
    (["prune", "--out", "o", "--plan", "p", "--atol", "-1"], "--atol"),
    (["plan", "--masks", "m", "--ratio", "0.05", "--align", "0"], "--align"),
]


@pytest.mark.parametrize("argv, option", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_stage_refuses_out_of_range_numbers_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: argument {option}: "), err
    assert "must be" in err[0] or "want a finite number" in err[0], err
