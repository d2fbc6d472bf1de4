"""The vhost-user man-in-the-middle: sans-I/O control plane, one I/O module, shadow-ring data path."""
