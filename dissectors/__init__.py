"""Protocol knowledge and codecs: FUSE, virtio split rings, vhost-user.  Pure: no I/O."""
