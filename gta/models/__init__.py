"""Segmentation networks with the paper's feature extractor / mask predictor partition."""

from gta.models.segmenter import Segmenter

__all__ = ["Segmenter"]
