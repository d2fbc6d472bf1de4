"""fsinspect: debugger and protocol inspector for virtio-fs."""

__version__ = "0.1.0"
