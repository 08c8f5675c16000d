"""The LightningCLI every example uses: a `fit` then a `test` of the final weights, configs in YAML."""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run(model_class, description: str, args=None) -> None:
    """Run ``LightningCLI`` for one example; ``fit`` is followed by ``test`` unless ``--no_test`` is given."""
    import importlib

    from lightning_phases._lightning import preferred

    LightningCLI = importlib.import_module(preferred.__name__ + ".cli").LightningCLI

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")

    class _CLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--no_test", action="store_true", help="skip the test run after fit")

    cli = _CLI(
        model_class,
        subclass_mode_model=model_class is None,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": description},
        args=args,
    )
    if cli.subcommand == "fit" and not cli.config.fit.get("no_test", False):
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
