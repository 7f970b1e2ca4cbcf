"""A small web page over a trained run (``retina-dist serve``)."""
