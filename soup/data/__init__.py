"""Data: read files, normalise formats, tokenize with loss masks, pad batches.

    from soup.data import build_datasets, collate_padded
"""

from soup.data.collate import collate_padded
from soup.data.dataset import DataReport, DatasetSplits, Example, build_datasets

__all__ = ["build_datasets", "collate_padded", "DatasetSplits", "DataReport", "Example"]
