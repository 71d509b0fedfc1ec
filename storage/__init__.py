"""Inputs and outputs: fsspec sources, hardened image decoding, the Parquet lake, LanceDB, the run ledger.

storage never imports encoders: the lake is model-agnostic.
"""
