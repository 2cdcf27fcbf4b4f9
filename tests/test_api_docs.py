"""Every public name of leanmoe's packages (their ``__all__``) has a docstring, and so has every public method of a
public class: ``help()`` and the docs never show an undocumented entry point."""

from __future__ import annotations

import importlib
import inspect

import pytest

PACKAGES = ["leanmoe", "leanmoe.lora", "leanmoe.hf", "leanmoe.parallel", "leanmoe.calibration", "leanmoe.testing"]


def _undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    missing = []
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            missing += [f"{name}.{attr}" for attr, value in vars(obj).items()
                        if not attr.startswith("_") and inspect.isfunction(value) and not inspect.getdoc(value)]
    return missing


@pytest.mark.parametrize("module_name", PACKAGES)
def test_every_public_name_has_a_docstring(module_name):
    if module_name == "leanmoe.hf":
        pytest.importorskip("transformers")
    assert _undocumented(module_name) == []


def test_the_check_sees_a_missing_docstring(monkeypatch):
    import leanmoe

    def undocumented() -> None:
        pass

    monkeypatch.setattr(leanmoe, "__all__", [*leanmoe.__all__, "undocumented_name"])
    monkeypatch.setattr(leanmoe, "undocumented_name", undocumented, raising=False)
    assert _undocumented("leanmoe") == ["undocumented_name"]
