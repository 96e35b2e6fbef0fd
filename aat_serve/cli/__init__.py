"""The ``aat`` command line: a thin layer over adapters, training and service."""
