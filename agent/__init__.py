"""build-agent: the per-node image build daemon."""

__version__ = "0.1.0"

# Bumped when the build process changes in a way that must invalidate content keys and
# workspace tags computed by an earlier version (DESIGN section 2).
PROCESS_VERSION = "1"
