"""The dependency floors: pyproject.toml's lowest versions are the ones `make test-deps` installs (.ci/lowest.txt),
and a transformers too new for the torch installed is one error line."""

from __future__ import annotations

import re
import tomllib

import pytest

from tests.conftest import REPO


def test_lowest_txt_pins_every_floor_of_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(m.groups() for d in deps if (m := re.fullmatch(r"([\w.-]+)>=([\w.]+)", d)))
    pins = dict(line.split("==") for line in (REPO / ".ci" / "lowest.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert floors["torch"] == "2.4"
    for name, floor in floors.items():
        assert name in pins, name
        assert pins[name] == floor or pins[name].startswith(floor + "."), (name, floor, pins[name])


def test_a_transformers_that_disables_this_torch_is_one_error(monkeypatch, tiny_causal_dir):
    """transformers switches PyTorch off below the torch it requires; probe says which transformers fits."""
    import transformers.utils

    from probe.backends import model_info
    from probe.errors import ProbeError

    monkeypatch.setattr(transformers.utils, "is_torch_available", lambda: False)
    with pytest.raises(ProbeError, match=r"pip install 'transformers<5.15' for torch 2.4"):
        model_info(str(tiny_causal_dir))
