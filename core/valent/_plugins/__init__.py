"""The plugin machinery: the executor contract, the hook specifications and the plugin
manager that loads the entry-point group ``valent``. Internal: plugin authors import from
``valent.plugin``."""
