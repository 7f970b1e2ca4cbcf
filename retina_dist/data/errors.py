"""The one error of the data layer, importable from anywhere in it without a cycle."""


class DataError(RuntimeError):
    """A packed dataset that does not match its manifest, or a split or shard that cannot be read."""
