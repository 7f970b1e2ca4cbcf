"""Using a trained run: predict on files, export, serve."""
