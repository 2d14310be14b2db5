"""Tool use: API catalogues, the cloud-CLI benchmark, API retrieval and tool-documentation prompting."""

from lmlab.tools.catalog import Catalog, Example, Parameter, Tool, load_catalog, save_catalog

__all__ = ["Catalog", "Example", "Parameter", "Tool", "load_catalog", "save_catalog"]
