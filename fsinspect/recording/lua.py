"""Generate recordings/fuse.lua, the Wireshark dissector, from the spec tables.

    python -m fsinspect.recording.lua > recordings/fuse.lua

Every struct, field, flag bit, enum and opcode body layout comes from dissectors/spec, so the
dissector follows the spec; a test checks that the committed file equals this output.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from dissectors.spec import fuse as fspec
from dissectors.spec import vhost_user as vspec
from dissectors.spec.types import SCALAR_SIZE, Field, Part, Registry
from dissectors.structs import pyname

from . import format as fmt

_HEADER_STRUCTS = ("fuse_in_header", "fuse_out_header")
_LUA_INT = {"u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64",
            "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64"}
_BASE = {"MODE": "base.OCT", "OCTAL": "base.OCT", "OFLAGS": "base.OCT", "HEX": "base.HEX"}


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _abbr(sname: str, fname: str) -> str:
    if sname in _HEADER_STRUCTS:
        return f"fuse.{pyname(fname)}"
    if sname in vspec.REGISTRY.structs:  # vhost-user payloads: vhost_user.memory_region.guest_address
        return f"vhost_user.{sname.removeprefix('vhost_user_').removeprefix('vhost_')}.{pyname(fname)}"
    short = sname.removeprefix("fuse_")
    return f"fuse.{short}.{pyname(fname)}"


def _valstring(name: str) -> str:
    return f"VS_{name}"


def _enum_tables() -> Iterator[str]:
    for reg in (fspec.REGISTRY, vspec.REGISTRY):
        for en in reg.enums.values():
            items = ", ".join(f"[{v}]={_q(n)}" for n, v in en.values)
            yield f"local {_valstring(en.name)} = {{{items}}}"
    neg = ", ".join(f"[{-v}]={_q(n)}" for n, v in fspec.ERRNO.values)
    yield f"local VS_NEG_ERRNO = {{[0]=\"OK\", {neg}}}"


class _Gen:
    def __init__(self) -> None:
        self.fields: list[str] = []  # Lua statements defining ProtoFields
        self.names: set[str] = set()
        self.structs: list[str] = []

    def field(self, key: str, decl: str) -> None:
        if key not in self.names:
            self.names.add(key)
            self.fields.append(f"F[{_q(key)}] = {decl}")

    def scalar_decl(self, sname: str, f: Field, reg: Registry) -> tuple[str, str]:
        abbr = _abbr(sname, f.name)
        label = pyname(f.name)
        if f.ctype == "char":
            return abbr, f"ProtoField.string({_q(abbr)}, {_q(label)})"
        if f.count != 1:
            return abbr, f"ProtoField.bytes({_q(abbr)}, {_q(label)})"
        kind = _LUA_INT[f.ctype]
        if sname == "fuse_out_header" and f.name == "error":
            return abbr, f"ProtoField.int32({_q(abbr)}, {_q('error')}, base.DEC, VS_NEG_ERRNO)"
        if f.enum:
            return abbr, f"ProtoField.{kind}({_q(abbr)}, {_q(label)}, base.DEC, {_valstring(f.enum)})"
        if f.flags in reg.flagsets:
            return abbr, f"ProtoField.{kind}({_q(abbr)}, {_q(label)}, base.HEX)"
        if f.flags in _BASE and not kind.startswith("int"):
            return abbr, f"ProtoField.{kind}({_q(abbr)}, {_q(label)}, {_BASE[f.flags]})"
        return abbr, f"ProtoField.{kind}({_q(abbr)}, {_q(label)}, base.DEC)"

    def struct(self, sname: str, reg: Registry = fspec.REGISTRY) -> None:
        sdef = reg.structs[sname]
        rows: list[str] = []
        off = 0
        for f in sdef.fields:
            size = reg.field_size(f)
            if f.ctype not in SCALAR_SIZE:
                rows.append(f"{{name={_q(pyname(f.name))}, off={off}, size={size}, struct={_q(f.ctype)}}}")
            else:
                abbr, decl = self.scalar_decl(sname, f, reg)
                self.field(abbr, decl)
                bits = ""
                fs = reg.flagsets.get(f.flags or "")
                width = SCALAR_SIZE[f.ctype] * 8
                if fs is not None and f.count == 1 and width <= 32:
                    keys = []
                    for bname, bval in fs.bits:
                        if 0 < bval < (1 << width):
                            bkey = f"{abbr}.{bname}"
                            self.field(bkey, f"ProtoField.bool({_q(bkey)}, {_q(bname)}, {width}, nil, 0x{bval:x})")
                            keys.append(_q(bkey))
                    bits = f", bits={{{', '.join(keys)}}}"
                le = "false" if f.ctype == "char" else "true"
                rows.append(f"{{name={_q(pyname(f.name))}, off={off}, size={size}, pf=F[{_q(abbr)}], le={le}{bits}}}")
            off += size
        compat = ", ".join(str(c) for c in sdef.compat_sizes)
        self.structs.append(f"S[{_q(sname)}] = {{size={off}, compat={{{compat}}}, fields={{\n    "
                            + ",\n    ".join(rows) + "}}")


def _part(p: Part) -> str:
    items = [f"kind={_q(p.kind)}", f"name={_q(p.name)}"]
    if p.ref:
        items.append(f"ref={_q(p.ref)}")
    if p.optional:
        items.append("optional=true")
    if p.count_from:
        sname_part, fname = p.count_from.split(".")
        items.append(f"count_part={_q(sname_part)}, count_field={_q(fname)}")
    return "{" + ", ".join(items) + "}"


def _parts(parts: tuple[Part, ...] | None) -> str:
    if parts is None:
        return "nil"
    return "{" + ", ".join(_part(p) for p in parts) + "}"


def generate() -> str:
    g = _Gen()
    for sname in fspec.REGISTRY.structs:
        g.struct(sname)
    for sname in vspec.REGISTRY.structs:
        g.struct(sname, vspec.REGISTRY)
    part_names = sorted({p.name for o in fspec.OPCODES for p in (*o.request, *(o.reply or ()))
                         if p.kind in ("str", "text", "data", "strs", "xattr")}
                        | {p.name for n in fspec.NOTIFIES for p in n.body if p.kind in ("str", "data")}
                        | {"value"})
    for pn in sorted({p.name for n in fspec.NOTIFIES for p in n.body if p.kind == "array" and p.ref == "u64"}):
        g.field(f"fuse.{pn}", f"ProtoField.uint64({_q('fuse.' + pn)}, {_q(pn)}, base.DEC)")
    for pn in part_names:
        kind = "string" if pn in ("name", "newname", "target", "dev_info") else "bytes"
        g.field(f"fuse.{pn}", f"ProtoField.{kind}({_q('fuse.' + pn)}, {_q(pn)})")
    ops = "\n".join(f"  [{o.value}] = {{name={_q(o.name)}, req={_parts(o.request)}, rep={_parts(o.reply)}"
                    f"{', optional_reply=true' if o.reply_optional else ''}}}," for o in fspec.OPCODES)
    notifies = "\n".join(f"  [{n.value}] = {{name={_q(n.name)}, body={_parts(n.body)}}},"
                         for n in fspec.NOTIFIES)
    vreq = ", ".join(f"[{r.value}]={_q(r.name)}" for r in vspec.FRONTEND_REQUESTS)
    vpay = ", ".join(f"[{r.value}]={{req={_q(r.payload) if r.payload else 'nil'}, "
                     f"rep={_q(r.reply) if r.reply else 'nil'}}}" for r in vspec.FRONTEND_REQUESTS)
    vflags = ", ".join(f"{_q(n)}" for n, _ in vspec.HEADER_FLAGS.bits)
    out = [
        "-- fuse.lua: Wireshark dissector for fsinspect recordings (FUSE over exported PDUs, link type 252).",
        "-- GENERATED by `python -m fsinspect.recording.lua` from dissectors/spec; do not edit by hand.",
        f"-- Recording format {fmt.FORMAT_VERSION}; FUSE {fspec.KERNEL_VERSION}.{fspec.KERNEL_MINOR_VERSION}.",
        "-- Usage: tshark -X lua_script:recordings/fuse.lua -r FILE.pcapng",
        "",
        f'local fuse = Proto({_q(fmt.DISSECTOR_FUSE)}, "FUSE (fsinspect)")',
        f'local vhu = Proto({_q(fmt.DISSECTOR_VHOST_USER)}, "vhost-user (fsinspect)")',
        "-- The protocol filters as `vhost-user` and `vhost_user` too: hidden items of these two.",
        'local vhu_dash = Proto("vhost-user", "vhost-user (filter alias)")',
        'local vhu_us = Proto("vhost_user", "vhost_user (filter alias)")',
        "local F = {}",
        "local S = {}",
        *_enum_tables(),
        f"local VS_VHOST_USER_REQUEST = {{{vreq}}}",
        f"local VHU_PAYLOAD = {{{vpay}}}",
        f"local NOTE_TO_BACKEND = {_q(fmt.NOTE_TO_BACKEND)}",
        f"local NOTE_TO_FRONTEND = {_q(fmt.NOTE_TO_FRONTEND)}",
        f"local P2P_DIR_RECV = {fmt.P2P_DIR_RECV}",
        *g.fields,
        'F["fuse.reply"] = ProtoField.bool("fuse.reply", "reply")',
        'F["fuse.request_in"] = ProtoField.framenum("fuse.request_in", "Request in", base.NONE, frametype.REQUEST)',
        'F["fuse.response_in"] = ProtoField.framenum("fuse.response_in", "Response in", base.NONE, '
        'frametype.RESPONSE)',
        'F["fuse.time"] = ProtoField.relative_time("fuse.time", "Response time")',
        'F["fuse.epoch"] = ProtoField.uint32("fuse.epoch", "INIT epoch", base.DEC)',
        'F["fuse.errno"] = ProtoField.string("fuse.errno", "errno")',
        'F["fuse.notify"] = ProtoField.uint32("fuse.notify", "notify code", base.DEC, VS_NOTIFY_CODE)',
        'F["fuse.entry_name"] = ProtoField.string("fuse.entry_name", "entry name")',
        'F["fuse.xattr_size"] = ProtoField.uint32("fuse.xattr_size", "xattr size", base.DEC)',
        'F["fuse.undecoded"] = ProtoField.bytes("fuse.undecoded", "undecoded bytes")',
        'F["fuse.debugger"] = ProtoField.string("fuse.debugger", "fsinspect debugger")',
        f"local DEBUGGER_COMMENT = {_q(fmt.DEBUGGER_COMMENT)}",
        'F["fsinspect_vhost_user.request"] = ProtoField.uint32("fsinspect_vhost_user.request", "request", '
        'base.DEC, VS_VHOST_USER_REQUEST)',
        'F["fsinspect_vhost_user.flags"] = ProtoField.uint32("fsinspect_vhost_user.flags", "flags", base.HEX)',
        'F["fsinspect_vhost_user.size"] = ProtoField.uint32("fsinspect_vhost_user.size", "size", base.DEC)',
        'F["fsinspect_vhost_user.payload"] = ProtoField.bytes("fsinspect_vhost_user.payload", "payload")',
        'F["vhost_user.direction"] = ProtoField.string("vhost_user.direction", "direction")',
        f"local VHU_FLAG_NAMES = {{{vflags}}}",
        *g.structs,
        "local OPS = {",
        ops,
        "}",
        "local NOTIFIES = {",
        notifies,
        "}",
        f"local IN_HEADER_SIZE = {fspec.IN_HEADER_SIZE}",
        f"local OUT_HEADER_SIZE = {fspec.OUT_HEADER_SIZE}",
        f"local OP_INIT = {fspec.OPCODE_BY_NAME['INIT'].value}",
        f"local SETXATTR_EXT = 0x{fspec.INIT_FLAGS.by_name()['SETXATTR_EXT']:x}",
        _RUNTIME,
    ]
    return "\n".join(out) + "\n"


# The hand-written interpreter of the generated tables.
_RUNTIME = r"""
local fuse_fields, vhu_fields = {}, {}
for k, v in pairs(F) do
  if k:sub(1, 5) == "fuse." then table.insert(fuse_fields, v) else table.insert(vhu_fields, v) end
end
fuse.fields = fuse_fields
vhu.fields = vhu_fields
local ef_malformed = ProtoExpert.new("fuse.malformed", "Malformed FUSE message", expert.group.MALFORMED,
                                     expert.severity.ERROR)
local ef_error = ProtoExpert.new("fuse.error_reply", "FUSE error reply", expert.group.RESPONSE_CODE,
                                 expert.severity.NOTE)
local ef_debugger = ProtoExpert.new("fuse.debugger.changed", "Held, answered or rewritten by the fsinspect "
                                    .. "debugger", expert.group.COMMENTS_GROUP, expert.severity.WARN)
fuse.experts = {ef_malformed, ef_error, ef_debugger}
-- The record flags HELD/INJECTED/REWRITTEN reach Lua as the opt_comment that mirrors them (format 2).
local frame_comment = Field.new("frame.comment")

local function mark_debugger(pinfo, root)
  for _, c in ipairs({frame_comment()}) do
    local s = c.value
    if s and s:sub(1, #DEBUGGER_COMMENT) == DEBUGGER_COMMENT then
      local what = s:sub(#DEBUGGER_COMMENT + 1)
      root:add(F["fuse.debugger"], what):set_generated()
      root:add_proto_expert_info(ef_debugger, "fsinspect debugger: " .. what)
      return " [" .. what .. "]"
    end
  end
  return ""
end

-- Pairing state, filled on the first pass: INIT epochs, requests by epoch:unique, per-frame results.
local state = {epoch = 0, pending = {}, frames = {}, setxattr_ext = {}}
function fuse.init()
  state = {epoch = 0, pending = {}, frames = {}, setxattr_ext = {}}
end

local function struct_size(sname) return S[sname].size end

-- Add a struct at off; returns the new offset, the subtree and a table of its scalar values.
local function add_struct(sname, tvb, off, tree, label, avail, proto)
  local s = S[sname]
  local size = s.size
  if avail < size then
    local ok = false
    for _, c in ipairs(s.compat) do if c == avail then ok = true end end
    if not ok then return nil end
    size = avail
  end
  local sub = tree:add(proto or fuse, tvb(off, size), label .. ": " .. sname)
  local vals = {}
  for _, fd in ipairs(s.fields) do
    if fd.off + fd.size <= size then
      local r = tvb(off + fd.off, fd.size)
      if fd.struct then
        local _, _, inner = add_struct(fd.struct, tvb, off + fd.off, sub, fd.name, fd.size, proto)
        vals[fd.name] = inner
      else
        local item
        if fd.le then item = sub:add_le(fd.pf, r) else item = sub:add(fd.pf, r) end
        if fd.size <= 4 then vals[fd.name] = r:le_uint() elseif fd.size == 8 then vals[fd.name] = r:le_uint64() end
        if fd.bits then for _, b in ipairs(fd.bits) do item:add_le(F[b], r) end end
      end
    end
  end
  return off + size, sub, vals
end

local function add_name(tvb, off, stop, tree, key)
  local len = 0
  while off + len < stop and tvb(off + len, 1):uint() ~= 0 do len = len + 1 end
  if off + len >= stop then return nil end
  local pf = F["fuse." .. key] or F["fuse.name"]
  if len > 0 then tree:add_packet_field(pf, tvb(off, len), ENC_UTF_8) else tree:add(pf, tvb(off, 1), "") end
  return off + len + 1, len > 0 and tvb(off, len):string(ENC_UTF_8) or ""
end

local function add_dirents(tvb, off, stop, tree, plus)
  local sname = plus and "fuse_direntplus" or "fuse_dirent"
  local head = struct_size(sname)
  local n, names = 0, {}
  while off + head <= stop do
    local nl_off = plus and (off + struct_size("fuse_entry_out") + 16) or (off + 16)
    local namelen = tvb(nl_off, 4):le_uint()
    if namelen == 0 or off + head + namelen > stop then return nil end
    local name = tvb(off + head, namelen):string(ENC_UTF_8)
    local _, sub, vals = add_struct(sname, tvb, off, tree, "entry " .. n .. " \"" .. name .. "\"", stop - off)
    sub:add_packet_field(F["fuse.entry_name"], tvb(off + head, namelen), ENC_UTF_8)
    if plus and vals.entry_out and vals.entry_out.attr and vals.entry_out.attr.flags and
       bit.band(vals.entry_out.attr.flags, 1) ~= 0 then
      sub:append_text(" [SUBMOUNT]")
    end
    table.insert(names, name)
    n = n + 1
    local rec = head + namelen
    off = off + rec + ((8 - rec % 8) % 8)
    if off > stop then off = stop end
  end
  return off, names
end

-- Dissect the parts of a body; returns (ok, summary text, values of struct parts).
-- Bytes of the message past the capture's end (a snapped record): a payload's wire length is what was
-- captured plus these.
local wire_extra = 0

local function add_parts(parts, tvb, off, stop, tree, info)
  local vals, summary = {}, {}
  for _, p in ipairs(parts) do
    local k = p.kind
    if k == "struct" then
      if stop - off == 0 and p.optional then
        -- absent
      else
        local avail = stop - off
        -- Without FUSE_SETXATTR_EXT the kernel sends the 8-byte fuse_setxattr_in of old.
        if p.name == "setxattr" and not (info and info.setxattr_ext) and avail >= 8 then avail = 8 end
        local nxt, _, v = add_struct(p.ref, tvb, off, tree, p.name, avail)
        if not nxt then return false, summary, vals end
        vals[p.name] = v
        off = nxt
      end
    elseif k == "str" then
      if off >= stop and p.optional then
      else
        local nxt, s = add_name(tvb, off, stop, tree, p.name)
        if not nxt then return false, summary, vals end
        table.insert(summary, p.name .. "=" .. s)
        off = nxt
      end
    elseif k == "text" or k == "data" or k == "strs" then
      if stop > off then
        local pf = F["fuse." .. p.name]
        if k == "data" then tree:add(pf, tvb(off, stop - off))
        else tree:add_packet_field(pf, tvb(off, stop - off), ENC_UTF_8) end
        if k == "text" then table.insert(summary, p.name .. "=" .. tvb(off, stop - off):string(ENC_UTF_8)) end
        if k == "data" then
          table.insert(summary, (stop - off + wire_extra) .. " bytes"
            .. (wire_extra > 0 and (" (" .. (stop - off) .. " captured)") or ""))
        end
      end
      off = stop
    elseif k == "xattr" then
      if info and info.xattr_size0 then
        if stop - off ~= 8 then return false, summary, vals end
        tree:add_le(F["fuse.xattr_size"], tvb(off, 4))
      elseif stop > off then
        tree:add(F["fuse.value"], tvb(off, stop - off))
      end
      off = stop
    elseif k == "array" then
      local size = 8
      if p.ref ~= "u64" then size = struct_size(p.ref) end
      local count
      if p.count_part then
        count = vals[p.count_part] and vals[p.count_part][p.count_field]
        if count == nil then return false, summary, vals end
      else
        count = math.floor((stop - off) / size)
      end
      for i = 0, count - 1 do
        if off + size > stop then return false, summary, vals end
        if p.ref == "u64" then tree:add_le(F["fuse." .. p.name], tvb(off, 8))
        else add_struct(p.ref, tvb, off, tree, p.name .. "[" .. i .. "]", size) end
        off = off + size
      end
      table.insert(summary, p.name .. "=" .. count)
    elseif k == "dirents" or k == "direntplus" then
      local nxt, names = add_dirents(tvb, off, stop, tree, k == "direntplus")
      if not nxt then return false, summary, vals end
      table.insert(summary, #names .. " entries")
      off = nxt
    end
  end
  return off == stop, summary, vals
end

local function looks_like_request(tvb)
  if tvb:len() < IN_HEADER_SIZE then return false end
  local op = tvb(4, 4):le_uint()
  return OPS[op] ~= nil and tvb(8, 8):le_uint64() ~= UInt64(0, 0)
end

function fuse.dissector(tvb, pinfo, tree)
  pinfo.cols.protocol = "FUSE"
  local n = tvb:len()
  local is_request
  if pinfo.p2p_dir == 1 then is_request = true
  elseif pinfo.p2p_dir == 0 then is_request = false
  else is_request = looks_like_request(tvb) end
  local root = tree:add(fuse, tvb(), "FUSE " .. (is_request and "request" or "reply"))
  root:add(F["fuse.reply"], not is_request):set_generated()
  local dbg = mark_debugger(pinfo, root)
  local declared = n >= 4 and tvb(0, 4):le_uint() or 0
  local stop = n
  if declared < n then stop = declared end
  local snapped = declared > n
  wire_extra = snapped and (declared - n) or 0
  local cut_note = snapped and (" [captured " .. n .. " of " .. declared .. " bytes]") or ""
  if is_request then
    if n < IN_HEADER_SIZE then root:add_proto_expert_info(ef_malformed, "short request"); return end
    local _, hdr, h = add_struct("fuse_in_header", tvb, 0, root, "fuse_in_header", IN_HEADER_SIZE)
    local op = OPS[h.opcode]
    local unique = h.unique
    local opname = op and op.name or tostring(h.opcode)
    local fr = state.frames[pinfo.number]
    if not pinfo.visited and not fr then
      if h.opcode == OP_INIT then state.epoch = state.epoch + 1 end
      fr = {epoch = state.epoch, opcode = h.opcode, nodeid = h.nodeid, ts = pinfo.abs_ts}
      state.frames[pinfo.number] = fr
      if op and op.rep then
        state.pending[state.epoch .. ":" .. tostring(unique)] = pinfo.number
      end
    end
    if fr then
      root:add(F["fuse.epoch"], fr.epoch):set_generated()
      if fr.response_in then root:add(F["fuse.response_in"], fr.response_in):set_generated() end
    end
    local ext = h.total_extlen * 8
    local body_stop = stop - ext
    local ok, summary = true, {}
    if op then
      local info = {setxattr_ext = fr and state.setxattr_ext[fr.epoch]}
      local vals
      ok, summary, vals = add_parts(op.req, tvb, IN_HEADER_SIZE, body_stop, root, info)
      if fr and h.opcode == OP_INIT and vals.init then fr.init_flags = vals.init.flags end
      if fr and op.name == "GETXATTR" or fr and op.name == "LISTXATTR" then
        fr.xattr_size0 = (body_stop >= IN_HEADER_SIZE + 4 and tvb(IN_HEADER_SIZE, 4):le_uint() == 0)
      end
    end
    if ext > 0 and body_stop >= IN_HEADER_SIZE then root:add(F["fuse.undecoded"], tvb(body_stop, ext)) end
    if not ok and not snapped then root:add_proto_expert_info(ef_malformed, "body does not match " .. opname) end
    pinfo.cols.info = opname .. " request unique=" .. tostring(unique) .. " nodeid=" .. tostring(h.nodeid)
      .. (#summary > 0 and (" " .. table.concat(summary, " ")) or "") .. cut_note .. dbg
    root:append_text(", " .. opname .. ", unique " .. tostring(unique))
    return
  end
  if n < OUT_HEADER_SIZE then root:add_proto_expert_info(ef_malformed, "short reply"); return end
  local _, hdr, h = add_struct("fuse_out_header", tvb, 0, root, "fuse_out_header", OUT_HEADER_SIZE)
  local unique = h.unique
  local err = tvb(4, 4):le_int()
  if unique == UInt64(0, 0) then
    local nt = NOTIFIES[err]
    root:add(F["fuse.notify"], err):set_generated()
    local name = nt and nt.name or tostring(err)
    if nt then add_parts(nt.body, tvb, OUT_HEADER_SIZE, stop, root, nil) end
    pinfo.cols.info = "NOTIFY_" .. name
    return
  end
  local fr = state.frames[pinfo.number]
  if not pinfo.visited and not fr then
    fr = {}
    for _, ep in ipairs({state.epoch, state.epoch - 1}) do
      local key = ep .. ":" .. tostring(unique)
      local reqno = state.pending[key]
      if reqno then
        state.pending[key] = nil
        local rq = state.frames[reqno]
        fr = {request_in = reqno, opcode = rq.opcode, nodeid = rq.nodeid, xattr_size0 = rq.xattr_size0,
              delta = pinfo.abs_ts - rq.ts, epoch = ep, init_flags = rq.init_flags}
        rq.response_in = pinfo.number
        break
      end
    end
    state.frames[pinfo.number] = fr
  end
  local op = fr and fr.opcode and OPS[fr.opcode]
  local opname = op and op.name or "?"
  if fr and fr.request_in then
    root:add(F["fuse.opcode"], fr.opcode):set_generated()
    root:add(F["fuse.nodeid"], fr.nodeid):set_generated()
    root:add(F["fuse.request_in"], fr.request_in):set_generated()
    local secs = math.floor(fr.delta)
    root:add(F["fuse.time"], NSTime.new(secs, math.floor((fr.delta - secs) * 1e9 + 0.5))):set_generated()
    root:add(F["fuse.epoch"], fr.epoch):set_generated()
  end
  local summary = {}
  if err ~= 0 then
    local ename = VS_NEG_ERRNO[err] or tostring(-err)
    root:add(F["fuse.errno"], ename):set_generated()
    root:add_proto_expert_info(ef_error, opname .. " -> " .. ename)
    table.insert(summary, ename)
  elseif op and op.rep then
    local ok, vals
    ok, summary, vals = add_parts(op.rep, tvb, OUT_HEADER_SIZE, stop, root, fr)
    if not pinfo.visited and fr.opcode == OP_INIT and fr.init_flags and vals.init_out and vals.init_out.flags then
      state.setxattr_ext[fr.epoch] = bit.band(fr.init_flags, vals.init_out.flags, SETXATTR_EXT) ~= 0
    end
    if not ok and not snapped then root:add_proto_expert_info(ef_malformed, "body does not match " .. opname) end
  elseif stop > OUT_HEADER_SIZE then
    root:add(F["fuse.undecoded"], tvb(OUT_HEADER_SIZE, stop - OUT_HEADER_SIZE))
  end
  pinfo.cols.info = opname .. " reply unique=" .. tostring(unique)
    .. (#summary > 0 and (" " .. table.concat(summary, " ")) or "") .. cut_note .. dbg
  root:append_text(", " .. opname .. ", unique " .. tostring(unique))
end

local comment_field = Field.new("frame.comment")

-- Who sent a vhost-user message to whom: the P2P direction, and the proxy's own copies by their note.
local function vhu_direction(pinfo)
  for _, c in ipairs({comment_field()}) do
    local v = tostring(c.value)
    if v == NOTE_TO_BACKEND then return "proxy", "back-end" end
    if v == NOTE_TO_FRONTEND then return "proxy", "QEMU" end
  end
  if pinfo.p2p_dir == P2P_DIR_RECV then return "QEMU", "back-end" end
  return "back-end", "QEMU"
end

local function hex(v)
  if type(v) == "number" then return string.format("0x%x", v) end
  local h = v:tohex():gsub("^0+", "")
  return "0x" .. (h == "" and "0" or h)
end

local function region_text(r)
  return "gpa=" .. hex(r.guest_address) .. " size=" .. hex(r.size) .. " uva=" .. hex(r.user_address)
    .. " off=" .. hex(r.mmap_offset)
end

-- The payload as the spec lays it out: SET_MEM_TABLE's table of regions, ADD/REM_MEM_REG's region, structs.
local function vhu_payload(tvb, root, sname, summary)
  local n = tvb:len() - 12
  if sname == "memory" then
    local nxt, sub, vals = add_struct("vhost_user_memory", tvb, 12, root, "payload", n, vhu)
    if not nxt then return false end
    local rsize = S["vhost_user_memory_region"].size
    local count = vals.num_regions
    table.insert(summary, count .. (count == 1 and " region:" or " regions:"))
    for i = 0, count - 1 do
      if nxt + rsize > tvb:len() then return false end
      local _, _, r = add_struct("vhost_user_memory_region", tvb, nxt, sub, "regions[" .. i .. "]", rsize, vhu)
      table.insert(summary, region_text(r) .. (i < count - 1 and ";" or ""))
      nxt = nxt + rsize
    end
    return true
  end
  if sname == nil or S[sname] == nil or n < S[sname].size then return false end
  local _, _, vals = add_struct(sname, tvb, 12, root, "payload", n, vhu)
  if vals.region then
    table.insert(summary, region_text(vals.region))
  else
    for _, fd in ipairs(S[sname].fields) do
      local v = vals[fd.name]
      if v ~= nil and fd.name ~= "padding" and type(v) ~= "table" then
        table.insert(summary, fd.name .. "=" .. (fd.size == 8 and hex(v) or tostring(v)))
      end
    end
  end
  return true
end

function vhu.dissector(tvb, pinfo, tree)
  pinfo.cols.protocol = "vhost-user"
  local src, dst = vhu_direction(pinfo)
  pinfo.cols.src = src
  pinfo.cols.dst = dst
  if tvb:len() < 12 then return end
  local root = tree:add(vhu, tvb())
  root:add(vhu_dash, tvb()):set_hidden()
  root:add(vhu_us, tvb()):set_hidden()
  root:add(F["vhost_user.direction"], src .. " -> " .. dst):set_generated()
  local req = tvb(0, 4):le_uint()
  local flags = tvb(4, 4):le_uint()
  root:add_le(F["fsinspect_vhost_user.request"], tvb(0, 4))
  root:add_le(F["fsinspect_vhost_user.flags"], tvb(4, 4))
  root:add_le(F["fsinspect_vhost_user.size"], tvb(8, 4))
  local names = {}
  for i, nm in ipairs(VHU_FLAG_NAMES) do
    if bit.band(flags, bit.lshift(1, i + 1)) ~= 0 then table.insert(names, nm) end
  end
  local summary = {}
  if tvb:len() > 12 then
    local layout = VHU_PAYLOAD[req]
    local sname = nil
    if bit.band(flags, 4) == 0 then sname = layout and layout.req
    else sname = (layout and layout.rep) or (tvb:len() == 20 and "vhost_user_u64" or nil) end  -- REPLY_ACK: u64
    if not vhu_payload(tvb, root, sname, summary) then
      summary = {}
      root:add(F["fsinspect_vhost_user.payload"], tvb(12))
    end
  end
  local name = VS_VHOST_USER_REQUEST[req] or tostring(req)
  root:append_text(", " .. src .. " -> " .. dst .. ", " .. name)
  pinfo.cols.info = src .. " → " .. dst .. "  " .. name .. (#names > 0 and (" " .. table.concat(names, "|")) or "")
    .. (#summary > 0 and (" " .. table.concat(summary, " ")) or "")
end
"""


def main() -> int:
    sys.stdout.write(generate())
    return 0


if __name__ == "__main__":
    sys.exit(main())
