"""Recordings: the fsinspect pcapng format (format), its writer, reader and side index."""
