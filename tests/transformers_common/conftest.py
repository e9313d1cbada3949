"""
Glue that runs transformers' own common test mixins against OmniFusion.

transformers' wheel has no tests; its PyPI source distribution holds the top-level `tests/test_*.py`.
`.ci/tier_transformers_common.sh` downloads the sdist of the installed transformers version, extracts `tests/` and
points `TRANSFORMERS_TESTS_DIR` at it. None of that code is committed here: this file only imports it.

The extracted folder is imported as the package `transformers_sdist_tests` (its modules use relative imports). The
sdist lacks a few modules that the mixin files import; each gets a stand-in here only when it is really missing:
- `generation/test_utils.py` (`GenerationTesterMixin`) and `exporters/test_export.py` (`ExportTesterMixin`):
  empty mixins, so the model, configuration and processor mixins run. What upstream's `GenerationTesterMixin`
  checks is covered by our own tests/test_modeling.py.
- `utils/test_configuration_utils.py` (`config_common_kwargs`): only read for configs without sub-configs, which
  OmniFusion's is not; an empty dict.
- `utils/fetch_hub_objects_for_ci.py` (`url_to_local_path`): maps a Hub fixture URL to a pre-downloaded file; here
  every image URL maps to one small PNG made locally (CI is offline).

Without the extracted folder the tier must fail, never skip: a missing or wrong `TRANSFORMERS_TESTS_DIR` is an error.
The main test run does not collect this folder unless `TRANSFORMERS_TESTS_DIR` is set (see tests/conftest.py).
"""

import os
import sys
import tempfile
import types
from pathlib import Path

ENV_VAR = "TRANSFORMERS_TESTS_DIR"
PACKAGE = "transformers_sdist_tests"
# upstream's checkout has an empty tests/__init__.py that the sdist drops; test_configuration_common.py reads it
# (`direct_transformers_import(Path(__file__).parent)`), so the tier script writes an empty one after extracting.
REQUIRED = ("__init__.py", "test_modeling_common.py", "test_configuration_common.py", "test_processing_common.py")


def _tests_dir() -> Path:
    value = os.environ.get(ENV_VAR)
    if not value:
        raise RuntimeError(
            f"{ENV_VAR} is not set: point it at the `tests` folder extracted from transformers' sdist "
            "(.ci/tier_transformers_common.sh does this)."
        )
    folder = Path(value)
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"{ENV_VAR}={value} is not transformers' sdist tests folder: it lacks {', '.join(missing)}")
    return folder


def _stand_in(name: str, is_package: bool = False, **attributes) -> None:
    """Register `transformers_sdist_tests.<name>` unless the sdist ships the real module."""
    full_name = f"{PACKAGE}.{name}"
    relative = Path(*name.split("."))
    real = TESTS_DIR / relative if is_package else TESTS_DIR / relative.with_suffix(".py")
    if real.exists() or full_name in sys.modules:
        return
    module = types.ModuleType(full_name)
    if is_package:
        module.__path__ = []
    module.__dict__.update(attributes)
    sys.modules[full_name] = module
    parent, _, child = full_name.rpartition(".")
    setattr(sys.modules[parent], child, module)


class GenerationTesterMixin:
    """Stand-in: the sdist has no tests/generation/test_utils.py (our tests/test_modeling.py covers generation)."""


class ExportTesterMixin:
    """Stand-in: the sdist has no tests/exporters/test_export.py."""


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_local_image = None


def url_to_local_path(url, return_url_if_not_found=True):
    """
    Stand-in for utils/fetch_hub_objects_for_ci.py, which maps a Hub fixture URL to the copy upstream's CI downloaded
    beforehand. CI here is offline, so every image URL maps to one small local PNG (the tests read shapes and keys,
    not pixels); any other URL (video, audio: OmniFusion takes neither) is returned unchanged.
    """
    global _local_image
    if not str(url).lower().endswith(_IMAGE_SUFFIXES):
        return url
    if _local_image is None:
        import numpy as np
        from PIL import Image

        _local_image = Path(tempfile.mkdtemp(prefix="omnifusion-common-")) / "image.png"
        pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(_local_image)
    return str(_local_image)


TESTS_DIR = _tests_dir()
if PACKAGE not in sys.modules:
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(TESTS_DIR)]
    sys.modules[PACKAGE] = package

_stand_in("generation", is_package=True)
_stand_in("generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
_stand_in("exporters", is_package=True)
_stand_in("exporters.test_export", ExportTesterMixin=ExportTesterMixin)
_stand_in("utils", is_package=True)
_stand_in("utils.test_configuration_utils", config_common_kwargs={})
# test_processing_common.py appends <sdist>/utils to sys.path and imports this module by its bare name.
if not (TESTS_DIR.parent / "utils" / "fetch_hub_objects_for_ci.py").exists():
    fetch_module = types.ModuleType("fetch_hub_objects_for_ci")
    fetch_module.url_to_local_path = url_to_local_path
    sys.modules.setdefault("fetch_hub_objects_for_ci", fetch_module)


def pytest_configure(config):
    # markers upstream's conftest registers and the mixins use
    markers = (
        "slow",
        "accelerate_tests",
        "flash_attn_test",
        "flash_attn_3_test",
        "flash_attn_4_test",
        "torch_compile_test",
    )
    for marker in markers:
        config.addinivalue_line("markers", f"{marker}: transformers test marker")
