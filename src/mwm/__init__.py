"""mwm: guided masked image modeling for medical images."""

__version__ = "0.1.0"
