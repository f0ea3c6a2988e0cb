"""softpage: soft-page pruning for Xen live migration (dom0 library)."""

__version__ = "0.1.0"
