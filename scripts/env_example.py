"""Regenerate .env.example from the settings class: `.venv/bin/python scripts/env_example.py`."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.settings import ENV_PREFIX, PROJECT_ROOT, UNPREFIXED, Settings  # noqa: E402


def main() -> None:
    lines = [
        "# Every setting of modelworkers (shared/settings.py), with its default. Each name is",
        "# MODELWORKERS_ + the setting; the name without the prefix is still read, with a",
        "# deprecation warning, for one release. FLOWER_BASIC_AUTH and PROMETHEUS_MULTIPROC_DIR",
        "# keep the names Flower and prometheus_client read themselves.",
        "# Copy to .env and edit; environment variables override .env. Empty = unset.",
        "# Regenerate: .venv/bin/python scripts/env_example.py",
        "",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default
        if default is None or hasattr(default, "get_secret_value"):
            default = ""
        elif isinstance(default, Path):
            default = default.relative_to(PROJECT_ROOT) if default.is_absolute() else default
        lines += [f"# {line}" for line in textwrap.wrap(field.description or "", 96)]
        prefix = "" if name in UNPREFIXED else ENV_PREFIX
        lines += [f"{prefix}{name.upper()}={default}", ""]
    (ROOT / ".env.example").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
