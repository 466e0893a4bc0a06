"""Python client for the VLA edge inference appliance (see clients/python/README.md)."""

from . import errors
from .client import Client, Result
from .errors import ApplianceError
from .openpi import OpenpiPolicy

__all__ = ["Client", "Result", "ApplianceError", "OpenpiPolicy", "errors"]
