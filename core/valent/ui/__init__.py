"""``valent ui`` (a live local web view of the results store, with cancel) and the graph
drawings behind ``Lattice.draw`` / ``Result.draw``."""
