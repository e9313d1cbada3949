"""Where the tests find the real VisDial v1.0 val sample shipped with the repository (see PROVENANCE.md there)."""

from pathlib import Path

VISDIAL_DATA_DIR = Path(__file__).resolve().parent / "data" / "visdial"
