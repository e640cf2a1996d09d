"""The fault suite reuses the integration lab fixtures."""

from tests.integration.conftest import lab, lab_unavailable

__all__ = ["lab", "lab_unavailable"]
