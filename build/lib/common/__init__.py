"""What every stage of the pipeline uses: the project version and atomic file writes."""

__version__ = "0.1.0"
