"""Transports only move bytes: /dev/fuse (standalone) and vhost-user (QEMU)."""
