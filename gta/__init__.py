"""GTA-Seg: semi-supervised semantic segmentation with a Gentle Teaching Assistant."""
