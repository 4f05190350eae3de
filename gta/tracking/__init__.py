"""Experiment tracking. The MLflow backend lives in :mod:`gta.tracking.mlflow` and is imported only
by whoever selects it (``logger=mlflow``), so ``logger=none`` runs never import MLflow."""

from gta.tracking.base import Logger, NullLogger, flatten_config

__all__ = ["Logger", "NullLogger", "flatten_config"]
