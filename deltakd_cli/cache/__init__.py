"""The cache stage: `cache-teachers` (build.py) writes the teachers' distributions per response
token into zarr shards (schema.py, store.py); `inspect` (inspect.py) reads them back."""
