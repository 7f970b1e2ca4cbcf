"""Data, grouped by job: ``sources/`` read datasets in their published layouts (folders or archives
as downloaded); ``synthetic/`` draws retinas and writes them in those layouts; ``pack/`` turns a
source into tar shards and ``manifest.py``'s manifest; ``stream/`` reads shards back as device
batches. ``codec`` and ``preprocess`` are the image steps pack, stream and predict share."""
