"""Rerun a recording against a virtio-fs back-end without a guest, and diff how back-ends answer.

front: the vhost-user front-end (memfd guest memory, rings, negotiation); plan: what a recording asks
for; remap: nodeids, file handles and cookies between back-ends; compare: reply against reply; runner:
order, overlap and timing; share: rebuild the share a recording started from; report: the output.
"""
