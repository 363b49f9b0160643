"""A method's settings are declared once, in its config classes: a toy method written here, with a fit setting of its
own, is taken by `probe train` (a flag), a sweep grid ([train]) and `probe.train` (a keyword), with no other file
changed."""

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
from probe.methods.prompt_tuning import PromptTuning
from probe.trainer import TrainConfig

SMALL = ["--min-steps", "2", "--epochs", "1", "--batch-size", "2", "--eval-every", "1", "--seed", "1"]


@dataclass
class ToyFitConfig(TrainConfig):
    shrink: float = setting(1.0, "scale of the prompt's starting vectors")

    def check(self) -> None:
        super().check()
        if not self.shrink > 0:
            raise ProbeError(f"--shrink must be positive, got {self.shrink}")


class Toy(PromptTuning):
    """Prompt tuning whose starting vectors are scaled by its own fit setting."""

    name = "toy"
    summary = "prompt tuning, its start scaled (a test's method)"
    fit_config_class = ToyFitConfig
    seen: ClassVar[list[float]] = []

    def fit(self, backend, task):
        Toy.seen.append(task.config.shrink)
        with __import__("torch").no_grad():
            for p in self.parameters():
                p.mul_(task.config.shrink)
        return super().fit(backend, task)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", Toy)
    Toy.seen.clear()
    return Toy


def test_the_toy_setting_is_a_flag_a_grid_key_and_a_keyword(toy, tiny_causal_dir, fake_lama, tmp_path):
    assert "shrink" in method_settings() and "scale of the prompt's starting vectors" in method_settings()["shrink"].help()
    # probe train --shrink, recorded in the relation's config
    proc = cli_in_process("train", "-m", tiny_causal_dir, "--method", "toy", "--shrink", "0.5", "-r", "P19",
                          "--data", fake_lama, "--out", tmp_path / "run", *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert Toy.seen == [0.5]
    assert json.loads((tmp_path / "run" / "P19" / "config.json").read_text())["train"]["shrink"] == 0.5
    assert "--shrink" in cli_in_process("train", "--help").stdout
    # checked by the method, and refused for the methods that do not take it, before any model loads
    assert_user_error(cli_in_process("train", "-m", tiny_causal_dir, "--method", "toy", "--shrink", "0", "-r", "P19",
                                     "--data", fake_lama, "--out", tmp_path / "bad"), "--shrink must be positive, got 0.0")
    assert_user_error(cli_in_process("train", "--method", "ptuning", "--shrink", "0.5", "-r", "P19", "--data", fake_lama,
                                     "--out", tmp_path / "bad"), "--shrink does not apply to method 'ptuning'")
    assert not (tmp_path / "bad").exists()
    # a sweep grid's [train] table
    grid = tmp_path / "g.toml"
    grid.write_text(f'model = "{tiny_causal_dir}"\nrelations = ["P19"]\n[axes]\nmethod = ["toy"]\nseed = [1]\n'
                    "[train]\nshrink = 0.25\nmin_steps = 2\nepochs = 1\nbatch_size = 2\neval_every = 1\n")
    proc = cli_in_process("sweep", grid, "--out", tmp_path / "sweep", "--data", fake_lama)
    assert proc.returncode == 0, proc.stderr
    assert Toy.seen == [0.5, 0.25] and len(list((tmp_path / "sweep" / "cells").glob("*.json"))) == 1
    # probe.train's keyword
    model = probe.load_model(str(tiny_causal_dir), device="cpu")
    res = probe.train(model, relations="P19", method="toy", shrink=2.0, data=fake_lama, min_steps=2, epochs=1,
                      batch_size=2, eval_every=1, seed=1)
    assert Toy.seen == [0.5, 0.25, 2.0] and res.prompts["P19"].config["train"]["shrink"] == 2.0
    with pytest.raises(ProbeError, match="--shrink does not apply to method 'ptuning'"):
        probe.train(model, relations="P19", method="ptuning", shrink=2.0, data=fake_lama)
