"""rhn: a command-line experiment runner for Recurrent Highway Networks and their peers."""

__version__ = "0.1.0"
