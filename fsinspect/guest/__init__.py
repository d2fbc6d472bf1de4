"""The real guest test bed: a Debian kernel + busybox initramfs booted under QEMU against any
vhost-user-fs backend (build.py builds it, launcher.py boots it, share.py makes a host share)."""
