"""tlopt: hyperparameter optimisation for staged transfer learning on images."""

from __future__ import annotations

__version__ = "0.1.0"

from tlopt.errors import TloptError  # noqa: E402

__all__ = ["TloptError", "__version__", "load_model"]


def load_model(path: str):  # type: ignore[no-untyped-def]
    """Load a model exported by ``tlopt export-best`` (weights and config in ``path``)."""
    from tlopt.export.bundle import load_model as _load

    return _load(path)
