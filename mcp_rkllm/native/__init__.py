"""The C boundary: the only package that imports cffi. See `binding` (loading, ABI, marshalling)."""
