"""Model cards rendered from the templates in `model_cards/` (one renderer for every script)."""

from __future__ import annotations

import string
from pathlib import Path

TEMPLATE_DIRS = [Path(__file__).resolve().parent / "model_card_templates",
                 Path(__file__).resolve().parents[1] / "model_cards"]


def find_template(name: str) -> Path:
    for directory in TEMPLATE_DIRS:
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"model card template {name!r} not found in {[str(d) for d in TEMPLATE_DIRS]}")


def render_card(template_name: str, values: dict) -> str:
    """Fill `$name` placeholders of a template; a placeholder without a value is an error (no half-filled cards)."""
    template = string.Template(find_template(template_name).read_text())
    try:
        return template.substitute({k: str(v) for k, v in values.items()})
    except KeyError as err:
        raise KeyError(f"model card {template_name}: no value for placeholder {err}") from err


def write_card(directory: str | Path, template_name: str, values: dict) -> Path:
    path = Path(directory) / "README.md"
    path.write_text(render_card(template_name, values))
    return path


def datasets_line(dataset_id: str | None) -> str:
    """The card metadata's `datasets:` entry for a Hub dataset id; nothing for local data (the Hub would link a
    made-up name such as `custom` to a dataset page that does not exist)."""
    return f"datasets:\n- {dataset_id}\n" if dataset_id else ""
