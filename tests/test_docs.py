"""The generated parts of docs/ agree with the code they describe."""
from pathlib import Path

from spacy_ptuning.errors import errors_table
from spacy_ptuning.serving.serve_config import config_fields, options_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_serving_options_table_is_servecfgs():
    text = (DOCS / "serving.md").read_text()
    table = text.split("<!-- options:begin -->\n", 1)[1].split("<!-- options:end -->", 1)[0]
    assert table == options_table(), "regenerate with: python -m spacy_ptuning.serving.serve_config"
    assert len(config_fields()) == table.count("\n") - 2


def test_errors_page_lists_every_error_as_written():
    text = (DOCS / "errors.md").read_text()
    assert text.endswith(errors_table()), "regenerate the table with: python -m spacy_ptuning.errors"


def test_every_serve_option_is_a_cli_flag():
    from typer.testing import CliRunner

    from spacy_ptuning.cli import ptuning_cli

    out = CliRunner().invoke(ptuning_cli, ["serve", "--help"], terminal_width=200).output
    for _, _, flag, _ in config_fields():
        assert flag in out, flag
