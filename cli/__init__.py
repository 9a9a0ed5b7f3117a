"""The `qdtk` command line (installed as the package qdtk.cli)."""
