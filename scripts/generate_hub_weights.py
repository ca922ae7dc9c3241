"""Write lrfinder/hub_weights.py from the installed torchvision.

The API checks torchvision weights names at submission without importing
torchvision, so it reads a generated table of weights names and the hub
cache file names they load from. Run this after upgrading torchvision:

    python scripts/generate_hub_weights.py

tests/test_models.py fails while the table and torchvision disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

import torchvision

from lrfinder.models import torchvision_weights_files

TARGET = Path(__file__).resolve().parent.parent / "lrfinder" / "hub_weights.py"

HEADER = '''"""Hub cache file names of torchvision's pretrained weights.

Generated from torchvision {version} by scripts/generate_hub_weights.py; do not
edit by hand. A test checks it against the installed torchvision. Pure Python,
so the API can check a weights name and its file without importing torch.
"""

from __future__ import annotations

# model name: {{weights name: file name under $TORCH_HOME/hub/checkpoints}}
TORCHVISION_WEIGHTS_FILES: dict[str, dict[str, str]] = {{
'''


def render(table: dict[str, dict[str, str]], version: str) -> str:
    """Return the source text of the module for ``table``."""
    lines = [HEADER.format(version=version)]
    for model, files in table.items():
        # JSON strings are valid Python strings, in the formatter's quotes.
        lines.append(f"    {json.dumps(model)}: {{\n")
        for weights_name, file_name in files.items():
            entry = f"{json.dumps(weights_name)}: {json.dumps(file_name)}"
            lines.append(f"        {entry},\n")
        lines.append("    },\n")
    lines.append("}\n")
    return "".join(lines)


def main() -> None:
    version = torchvision.__version__.split("+")[0]
    TARGET.write_text(render(torchvision_weights_files(), version))
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
