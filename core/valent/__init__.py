"""valent: run Python workflows on pluggable executors, and stop them for real."""
