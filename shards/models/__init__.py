"""Model families, one file each, registered by `architectures` in `registry.py`."""
