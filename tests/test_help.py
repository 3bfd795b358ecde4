"""Every init argument of every exported class has a description in ``--help``, read by jsonargparse itself.

jsonargparse takes an option's help from the Google-style ``Args:`` entries of the class and of its bases
(docstring-parser); one malformed line drops every description of that class, so this walks the classes
the CLI offers (methods, backbones, data modules, callbacks) and builds the same arguments ``--help`` shows.
"""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import pytest
from jsonargparse import ArgumentParser

import manynets.callbacks
import manynets.datamodules
import manynets.lightning_modules
import manynets.networks
from manynets.cli import main


def _exported_classes(package, base: type | None = None) -> list[type]:
    names = getattr(package, "__all__", None) or [n for n in dir(package) if not n.startswith("_")]
    found = [getattr(package, name) for name in names]
    return [c for c in found if inspect.isclass(c) and not issubclass(c, BaseException)
            and (base is None or issubclass(c, base))]


CLASSES = (
    _exported_classes(manynets.lightning_modules)
    + _exported_classes(manynets.networks)
    + _exported_classes(manynets.datamodules)
    + _exported_classes(manynets.callbacks, pl.Callback)
)


def test_the_walk_finds_every_kind_of_class():
    names = {c.__name__ for c in CLASSES}
    assert {"SuperpositionModule", "WideResNet", "DigitsDataModule", "Saturation"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_init_argument_has_a_description(cls):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "x", fail_untyped=False)
    options = [a for a in parser._actions if a.dest.startswith("x.") and not a.dest.endswith(".help")]
    undocumented = [a.dest.removeprefix("x.") for a in options if not (a.help or "").strip()]
    assert not undocumented, (
        f"{cls.__module__}.{cls.__name__}: no description for {undocumented}; add a Google-style "
        "'name: text' line per argument under 'Args:' in the class docstring"
    )


def test_model_help_shows_the_options_of_a_method(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "SuperpositionModule"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--model.capacity" in text
    assert "N, the number of slots" in text  # capacity's own description
    assert "label smoothing of the cross-entropy" in text  # an option inherited from ClassifierModule
