/* scan_core: see scan_core.h.  Every read is bounds-checked against the block, the block against the
 * buffer; the layout mirrors scan.py's _TAIL / _TAIL_N structs (little endian, no alignment), and sc_frame
 * writes it as the recording writer's _epb does (twin: scan.py frame_python). */
#include <string.h>

#include "scan_core.h"

static inline uint16_t u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint32_t u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint64_t u64(const uint8_t *p)
{
    return (uint64_t)u32(p) | ((uint64_t)u32(p + 4) << 32);
}

int sc_epb(const struct sc_config *c, const uint8_t *body, size_t blen, uint64_t offset, struct sc_row *row)
{
    uint32_t pl = c->prefix_len;
    if (blen < 20u + pl)
        return -1;
    uint32_t caplen = u32(body + 12), origlen = u32(body + 16);
    int pre;
    if (memcmp(body + 20, c->prefix[0], pl) == 0)
        pre = 1;
    else if (memcmp(body + 20, c->prefix[1], pl) == 0)
        pre = 0;
    else
        return -1;
    if (caplen < pl)
        return -1;
    uint64_t end = 20u + (uint64_t)caplen;
    uint64_t tail = end + ((4u - (caplen & 3u)) & 3u);
    if (tail > blen)
        return -1;
    uint64_t rest = blen - tail;
    const uint8_t *t = body + tail;
    uint64_t n = 0;
    row->has_layout = 0;
    row->layout_off = 0;
    row->layout_len = 0;
    if (rest >= SC_TAIL + 12u && u16(t + 32) == c->opt_custom_bin && u16(t + 34) >= 8u && u32(t + 36) == c->pen
        && u16(t + 40) == c->meta_layout) {
        uint32_t size = u16(t + 34);
        if ((size - 8u) % 8u || rest < SC_TAIL + 4u + size)
            return -1;
        row->has_layout = 1;
        row->layout_off = tail + 44u;
        row->layout_len = size - 8u;
        t += 4u + size; /* what follows is as without it */
        rest -= 4u + size;
    }
    if (rest == SC_TAIL) {
        if (u16(t + 32) != c->opt_end)
            return -1;
    } else if (rest == SC_TAIL_N) {
        if (u16(t + 32) != c->opt_custom_bin || u16(t + 34) != c->meta_number_size || u32(t + 36) != c->pen
            || u16(t + 40) != c->meta_number || u16(t + 52) != c->opt_end)
            return -1;
        n = u64(t + 44);
    } else {
        return -1;
    }
    t = body + tail; /* epb_flags and META_RECORD come first */
    if (u16(t) != c->opt_epb_flags || u16(t + 2) != 4 || u16(t + 8) != c->opt_custom_bin
        || u16(t + 10) != c->meta_record_size || u32(t + 12) != c->pen || u16(t + 16) != c->meta_record)
        return -1;
    uint32_t d = u32(t + 4) & c->dir_mask;
    row->offset = offset;
    row->iface = u32(body);
    row->ts = ((uint64_t)u32(body + 4) << 32) | u32(body + 8);
    row->inbound = d ? d == c->dir_inbound : (uint8_t)pre;
    row->queue = u16(t + 20);
    row->flags = u16(t + 22);
    row->head = u32(t + 24);
    row->epoch = u32(t + 28);
    row->n = n;
    row->pdu_off = 20u + pl;
    row->pdu_len = caplen - pl;
    int64_t orig = (int64_t)origlen - pl;
    if ((row->flags & c->rf_snapped) && orig == (int64_t)row->pdu_len && row->pdu_len >= 4) {
        /* Older proxies recorded the captured length as the original one: the message header says. */
        int64_t said = u32(body + row->pdu_off);
        if (said > orig)
            orig = said;
    }
    row->orig_len = orig;
    return 0;
}

size_t sc_scan(const struct sc_config *c, const uint8_t *buf, size_t len, size_t *pos, uint64_t base,
               uint32_t n_ifaces, struct sc_row *rows, size_t max)
{
    size_t p = *pos, k = 0;
    while (k < max && len - p >= 8) {
        uint32_t btype = u32(buf + p), total = u32(buf + p + 4);
        if (btype != c->bt_epb || total < 12 || total % 4 || total > c->max_block || len - p < total
            || u32(buf + p + total - 4) != total)
            break;
        struct sc_row *r = &rows[k];
        if (sc_epb(c, buf + p + 8, total - 12, base + p, r) < 0 || r->iface >= n_ifaces)
            break;
        r->pdu_off += p + 8; /* from the body to the buffer */
        if (r->has_layout)
            r->layout_off += p + 8;
        k++;
        p += total;
    }
    *pos = p;
    return k;
}

static inline uint8_t *w16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    return p + 2;
}

static inline uint8_t *w32(uint8_t *p, uint32_t v)
{
    p = w16(p, (uint16_t)v);
    return w16(p, (uint16_t)(v >> 16));
}

static inline uint8_t *w64(uint8_t *p, uint64_t v)
{
    p = w32(p, (uint32_t)v);
    return w32(p, (uint32_t)(v >> 32));
}

static inline uint64_t pad4(uint64_t n)
{
    return (4u - (n & 3u)) & 3u;
}

/* A custom binary option's head up to its body: code, length, PEN, kind, reserved. */
static inline uint8_t *meta_option(const struct sc_config *c, uint8_t *o, uint16_t size, uint16_t kind)
{
    o = w16(o, c->opt_custom_bin);
    o = w16(o, size);
    o = w32(o, c->pen);
    o = w16(o, kind);
    return w16(o, 0);
}

uint64_t sc_frame_len(const struct sc_config *c, const struct sc_packet *p)
{
    uint64_t caplen = c->prefix_len + p->len;
    uint64_t total = 28u + caplen + pad4(caplen) + SC_TAIL + (p->n ? SC_TAIL_N - SC_TAIL : 0u) + 4u
                     + (p->layout_len ? 12u + p->layout_len : 0u);
    if (p->layout_len % 8u || p->layout_len > 0xFFFFu - 8u)
        return 0;
    for (uint32_t i = 0; i < p->n_notes; i++)
        total += 4u + p->note_lens[i] + pad4(p->note_lens[i]);
    if (total > UINT32_MAX || c->prefix_len + p->orig_len > UINT32_MAX)
        return 0;
    return total;
}

void sc_frame(const struct sc_config *c, const struct sc_packet *p, uint8_t *out)
{
    uint32_t total = (uint32_t)sc_frame_len(c, p);
    uint32_t caplen = c->prefix_len + (uint32_t)p->len;
    uint8_t *o = w32(out, c->bt_epb);
    o = w32(o, total);
    o = w32(o, p->iface);
    o = w32(o, (uint32_t)(p->ts >> 32));
    o = w32(o, (uint32_t)p->ts);
    o = w32(o, caplen);
    o = w32(o, c->prefix_len + (uint32_t)p->orig_len);
    memcpy(o, c->prefix[p->inbound ? 0 : 1], c->prefix_len);
    o += c->prefix_len;
    memcpy(o, p->data, p->len);
    o += p->len;
    for (uint64_t k = pad4(caplen); k; k--)
        *o++ = 0;
    o = w16(o, c->opt_epb_flags);
    o = w16(o, 4);
    o = w32(o, p->inbound ? c->dir_inbound : c->dir_outbound);
    o = meta_option(c, o, c->meta_record_size, c->meta_record);
    o = w16(o, p->queue);
    o = w16(o, p->flags);
    o = w32(o, p->head);
    o = w32(o, p->epoch);
    if (p->layout_len) {
        o = meta_option(c, o, (uint16_t)(8u + p->layout_len), c->meta_layout);
        memcpy(o, p->layout, p->layout_len);
        o += p->layout_len;
    }
    if (p->n)
        o = w64(meta_option(c, o, c->meta_number_size, c->meta_number), p->n);
    for (uint32_t i = 0; i < p->n_notes; i++) {
        o = w16(o, c->opt_comment);
        o = w16(o, p->note_lens[i]);
        memcpy(o, p->notes[i], p->note_lens[i]);
        o += p->note_lens[i];
        for (uint64_t k = pad4(p->note_lens[i]); k; k--)
            *o++ = 0;
    }
    o = w16(o, c->opt_end);
    o = w16(o, 0);
    w32(o, total);
}
