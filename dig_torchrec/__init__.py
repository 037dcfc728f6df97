"""dig_torchrec: DIG (Discrimination Is Generation) on TorchRec."""

__version__ = "0.1.0"
