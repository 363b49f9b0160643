"""A method's settings are declared once, in its config classes: a toy method written here, with a fit setting and an
option of its own, is taken by `probe train` (flags), a sweep grid ([train] and an axis) and `probe.train` (keywords),
with no other file changed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
from conftest import assert_user_error, cli_in_process

import probe
from probe.errors import ProbeError
from probe.fit import setting
from probe.methods import METHODS, method_settings
from probe.methods.base import option
from probe.methods.prompt_tuning import PromptTuning, PromptTuningConfig
from probe.trainer import TrainConfig

SMALL = ["--min-steps", "2", "--epochs", "1", "--batch-size", "2", "--eval-every", "1", "--seed", "1"]


@dataclass
class ToyFitConfig(TrainConfig):
    shrink: float = setting(1.0, "scale of the prompt's starting vectors")

    def check(self) -> None:
        super().check()
        if not self.shrink > 0:
            raise ProbeError(f"--shrink must be positive, got {self.shrink}")


@dataclass
class ToyConfig(PromptTuningConfig):
    sign: str = option("plus", ("plus", "minus"), "the sign of the prompt's starting vectors")


class Toy(PromptTuning):
    """Prompt tuning whose starting vectors are scaled by its own fit setting and signed by its own option."""

    name = "toy"
    summary = "prompt tuning, its start scaled and signed (a test's method)"
    config_class = ToyConfig
    fit_config_class = ToyFitConfig
    seen: ClassVar[list[float]] = []
    signs: ClassVar[list[str]] = []

    def fit(self, backend, task):
        Toy.seen.append(task.config.shrink)
        Toy.signs.append(self.config.sign)
        with __import__("torch").no_grad():
            for p in self.parameters():
                p.mul_(task.config.shrink * (-1 if self.config.sign == "minus" else 1))
        return super().fit(backend, task)


@pytest.fixture
def toy(monkeypatch):
    import probe.sweep  # noqa: F401 (loaded before the toy is registered: a grid's axes are those registered when read)

    monkeypatch.setitem(METHODS, "toy", Toy)
    Toy.seen.clear()
    Toy.signs.clear()
    return Toy


def test_the_toy_setting_is_a_flag_a_grid_key_and_a_keyword(toy, tiny_causal_dir, fake_lama, tmp_path):
    assert "shrink" in method_settings() and "scale of the prompt's starting vectors" in method_settings()["shrink"].help()
    assert "the sign of the prompt's starting vectors" in method_settings()["sign"].help()
    # probe train --shrink --sign, recorded in the relation's config
    proc = cli_in_process("train", "-m", tiny_causal_dir, "--method", "toy", "--shrink", "0.5", "--sign", "minus",
                          "-r", "P19", "--data", fake_lama, "--out", tmp_path / "run", *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert Toy.seen == [0.5] and Toy.signs == ["minus"]
    config = json.loads((tmp_path / "run" / "P19" / "config.json").read_text())
    assert config["train"]["shrink"] == 0.5 and config["method_config"]["sign"] == "minus"
    help_text = cli_in_process("train", "--help").stdout
    assert "--shrink" in help_text and "--sign" in help_text
    # checked by the method, and refused for the methods that do not take it, before any model loads
    assert_user_error(cli_in_process("train", "-m", tiny_causal_dir, "--method", "toy", "--shrink", "0", "-r", "P19",
                                     "--data", fake_lama, "--out", tmp_path / "bad"), "--shrink must be positive, got 0.0")
    assert_user_error(cli_in_process("train", "--method", "ptuning", "--shrink", "0.5", "-r", "P19", "--data", fake_lama,
                                     "--out", tmp_path / "bad"), "--shrink does not apply to method 'ptuning'")
    assert_user_error(cli_in_process("train", "--method", "toy", "--sign", "up", "-r", "P19", "--data", fake_lama,
                                     "--out", tmp_path / "bad"), "unknown sign 'up': expected one of plus, minus")
    assert_user_error(cli_in_process("train", "--method", "ptuning", "--sign", "minus", "-r", "P19", "--data", fake_lama,
                                     "--out", tmp_path / "bad"), "--sign does not apply to method 'ptuning'")
    assert not (tmp_path / "bad").exists()
    # a sweep grid: the fit setting in its [train] table, the option as an axis (checked like the built-in ones)
    grid = tmp_path / "g.toml"
    head = f'model = "{tiny_causal_dir}"\nrelations = ["P19"]\n[axes]\nmethod = ["toy"]\nseed = [1]\n'
    train = "[train]\nshrink = 0.25\nmin_steps = 2\nepochs = 1\nbatch_size = 2\neval_every = 1\n"
    grid.write_text(head + 'sign = ["up"]\n' + train)
    assert_user_error(cli_in_process("sweep", grid, "--out", tmp_path / "bad", "--data", fake_lama),
                      "axis sign value 'up' does not exist for toy")
    grid.write_text(head + 'sign = ["minus"]\n' + train)
    proc = cli_in_process("sweep", grid, "--out", tmp_path / "sweep", "--data", fake_lama)
    assert proc.returncode == 0, proc.stderr
    assert Toy.seen == [0.5, 0.25] and Toy.signs == ["minus", "minus"]
    (cell,) = (tmp_path / "sweep" / "cells").glob("*.json")
    assert json.loads(cell.read_text())["sign"] == "minus" and "_minus_" in cell.name
    assert "sign" in (tmp_path / "sweep" / "summary.md").read_text().splitlines()[0]
    # probe.train's keywords
    model = probe.load_model(str(tiny_causal_dir), device="cpu")
    res = probe.train(model, relations="P19", method="toy", shrink=2.0, sign="minus", data=fake_lama, min_steps=2,
                      epochs=1, batch_size=2, eval_every=1, seed=1)
    assert Toy.seen == [0.5, 0.25, 2.0] and Toy.signs == ["minus"] * 3
    assert res.prompts["P19"].config["train"]["shrink"] == 2.0
    assert res.prompts["P19"].config["method_config"]["sign"] == "minus"
    with pytest.raises(ProbeError, match="--shrink does not apply to method 'ptuning'"):
        probe.train(model, relations="P19", method="ptuning", shrink=2.0, data=fake_lama)
    with pytest.raises(probe.SettingError, match="--sign does not apply to method 'ptuning'"):
        probe.train(model, relations="P19", method="ptuning", sign="minus", data=fake_lama)
