"""The cache stage: `cache-teachers` (build.py) writes the teachers' distributions per response
token into zarr shards (schema.py; location.py, writer.py, manifest.py, reader.py); `inspect`
(inspect.py) reads them back."""
