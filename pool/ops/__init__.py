"""pool's operations front: the command line, stats views, metrics and the demo."""
