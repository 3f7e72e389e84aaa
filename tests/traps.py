"""A pickled object whose unpickling runs code, for the tests that no data file can run any."""


class CreatesAFile:
    """Unpickling this runs code: open(path, "w")."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")
