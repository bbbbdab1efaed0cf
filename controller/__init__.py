"""convctl: a rule-driven conversation controller for contact centers."""

__version__ = "0.1.0"
