"""SIMU Studio core library: selective second-order unlearning of language models.

Plain library with no Streamlit import; the app (`app.py`, `pages/`) and the CLI
(`python -m simu_core`) are thin layers over it. Its modules form layers, each importing only from
the ones below: the table is in the README ("Layout") and `tests/test_layering.py` checks it.
"""

from simu_core.errors import SimuError

__version__ = "0.1.0"
__all__ = ["SimuError", "__version__", "versions"]


def versions(*packages: str) -> dict[str, str]:
    """simu_core's version and the installed versions of `packages` (recorded in manifests and reports)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"simu_core": __version__}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
