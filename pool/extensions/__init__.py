"""pool's taskiq extensions: the embedded broker, its result backend, task handles, errors.

Each class here subclasses the matching taskiq class, so anything written for taskiq works
with it unchanged.
"""
