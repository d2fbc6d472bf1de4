/*
 * scan_core: walks a buffer of pcapng blocks and takes every packet block written in the recording
 * writer's canonical layout (a FUSE message, epb_flags, META_RECORD, optionally META_NUMBER), in plain C
 * (no Python.h).
 *
 * Why C: the UI's live stream is ~2 packet blocks per exchange at 100k exchanges/s; parsing them in
 * Python took a third of the ingest thread.  The layout's constants (option codes, PEN, kinds, the
 * exported-PDU prefixes) are not written here: the caller passes them from fsinspect/recording/format.py
 * (sc_config).  Anything else (another block type, a packet with notes, a block that lies) is
 * left to the caller, which reads it with the general parser: the scan stops in front of it.  The
 * pure-Python twin is fsinspect/recording/scan.py; the same tests run on both.
 */
#ifndef FSINSPECT_SCAN_CORE_H
#define FSINSPECT_SCAN_CORE_H

#include <stddef.h>
#include <stdint.h>

#define SC_MAX_PREFIX 64

struct sc_config {
    uint8_t prefix[2][SC_MAX_PREFIX]; /* the exported-PDU tags in front of a FUSE message: [0] inbound, [1] outbound */
    uint32_t prefix_len;
    uint32_t bt_epb;
    uint32_t max_block;  /* a block longer than this is left to the caller (which refuses it) */
    uint16_t opt_epb_flags, opt_custom_bin, opt_end;
    uint16_t meta_record, meta_number, meta_layout;
    uint16_t meta_record_size, meta_number_size;
    uint32_t pen;
    uint32_t no_head;
    uint32_t dir_mask, dir_inbound;
    uint32_t rf_snapped;
    uint32_t dir_outbound;  /* sc_frame's: epb_flags of a reply, and the option code of a note */
    uint16_t opt_comment;
};

/* One packet block taken: where its PDU lies in the buffer and what its options say. */
struct sc_row {
    uint64_t offset;   /* the block's offset: base + its position in the buffer */
    uint64_t ts;
    uint64_t n;        /* META_NUMBER, 0 when absent */
    int64_t orig_len;  /* the PDU's original length (may be < 0 in a lying block: the caller keeps it) */
    uint32_t iface;
    uint64_t pdu_off;  /* from the start of the body (sc_epb) or of the buffer (sc_scan) */
    uint32_t pdu_len;
    uint32_t head;     /* no_head: none */
    uint32_t epoch;
    uint16_t queue, flags;
    uint8_t inbound;
    uint8_t has_layout;  /* a descriptor layout (META_LAYOUT) right after META_RECORD: its items at layout_off */
    uint64_t layout_off; /* like pdu_off */
    uint32_t layout_len; /* bytes of (u32 len, u16 flags, u16 0) items */
};

/* Tail sizes of the canonical layout (after the padded packet data): without and with META_NUMBER; a
 * descriptor layout option (META_LAYOUT) may come between META_RECORD and the rest, as the writer puts it. */
#define SC_TAIL 36u
#define SC_TAIL_N 56u

/* Parse one EPB body (the bytes between the block's length words) in the canonical layout; 0 and *row
 * filled if it is one, -1 if not. */
int sc_epb(const struct sc_config *c, const uint8_t *body, size_t blen, uint64_t offset, struct sc_row *row);

/* Take consecutive complete canonical packet blocks from buf[*pos..len), at most `max` (interface index
 * below n_ifaces); returns how many, *pos moved past them.  It stops in front of the first block that is
 * incomplete, not a packet block, not canonical, or that breaks the framing. */
size_t sc_scan(const struct sc_config *c, const uint8_t *buf, size_t len, size_t *pos, uint64_t base,
               uint32_t n_ifaces, struct sc_row *rows, size_t max);

/* One FUSE message to frame as a packet block in the writer's layout (sc_frame): epb_flags, META_RECORD,
 * META_LAYOUT when layout_len is not 0 (the descriptor items, packed), META_NUMBER when n is not 0, then an
 * opt_comment per note (notes[i] of note_lens[i] UTF-8 bytes). */
struct sc_packet {
    const uint8_t *data;
    uint64_t len, orig_len; /* orig_len >= len */
    uint64_t ts, n;
    uint32_t iface, head, epoch;
    uint16_t queue, flags;
    uint8_t inbound;
    uint32_t n_notes;
    const char *const *notes;
    const uint16_t *note_lens;
    const uint8_t *layout;
    uint32_t layout_len; /* a multiple of 8 */
};

/* The packet block's total length, or 0 when its length fields cannot say it (over 4 GiB). */
uint64_t sc_frame_len(const struct sc_config *c, const struct sc_packet *p);

/* Write the packet block (sc_frame_len bytes) to out: the same bytes as the writer's. */
void sc_frame(const struct sc_config *c, const struct sc_packet *p, uint8_t *out);

#endif
