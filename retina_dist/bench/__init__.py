"""``retina-dist bench``: throughput of the data path, the train step, evaluation and packing, each
beside its baseline measured in the same run on the same inputs. A user-facing command, as timm's
benchmark.py is; the test suite only checks that it runs and reports well-formed figures."""
