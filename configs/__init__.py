"""Settings and the model catalog: the only place configuration is read."""

from configs.catalog import Catalog, CatalogEntry, CatalogError, load_catalog
from configs.settings import Settings, get_settings

__all__ = ["Catalog", "CatalogEntry", "CatalogError", "Settings", "get_settings", "load_catalog"]
