"""Oracle (a): the C compiler, reading the installed kernel headers, checks every struct of the spec.

Every struct in /usr/include/linux/fuse.h (7.38) and virtio_ring.h is enumerated from the header
itself, so a struct the spec lacks fails the test; no hand-written list can drift.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from dissectors.spec import fuse as fspec
from dissectors.spec import virtio as vspec
from dissectors.spec.types import Registry
from dissectors.structs import pyname

STRUCT_RE = re.compile(r"^struct (\w+) \{\n(.*?)^\}[^;]*;", re.S | re.M)
FIELD_RE = re.compile(r"^\s*(?:struct\s+)?[\w ]+?\s+(\w+)(\[(\d*)\])?\s*;", re.M)

# The only structs not compared, with the reason.  Anything else in a header must be in the spec.
EXEMPT = {
    "vring": "holds host pointers (struct vring_desc *desc, ...), a driver-side helper, not a wire layout",
}


def header_structs(path: str) -> dict[str, list[tuple[str, bool]]]:
    """struct name -> [(field name, is_flexible_array)], parsed from the header text."""
    text = Path(path).read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = {}
    for m in STRUCT_RE.finditer(text):
        fields = [(f.group(1), f.group(2) == "[]") for f in FIELD_RE.finditer(m.group(2))]
        out[m.group(1)] = fields
    return out


def spec_field_offsets(reg: Registry, sname: str) -> dict[str, int]:
    """Header field name -> offset in the spec, using the 7.38 name of renamed fields (`~old`)."""
    out: dict[str, int] = {}
    off = 0
    for f in reg.structs[sname].fields:
        if f.since is None or f.since <= 38:
            out[f.name] = off
        elif f.was:
            out[f.was] = off
        off += reg.field_size(f)
    return out


def compile_and_run(tmp_path: Path, include: str, structs: dict[str, list[tuple[str, bool]]]) -> dict[str, int]:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <stdint.h>", f"#include <{include}>",
             "int main(void) {"]
    for s, fields in structs.items():
        lines.append(f'  printf("{s} %zu\\n", sizeof(struct {s}));')
        for fname, _ in fields:
            lines.append(f'  printf("{s}.{fname} %zu\\n", offsetof(struct {s}, {fname}));')
    lines += ["  return 0;", "}"]
    src = tmp_path / "oracle.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "oracle"
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize(
    ("header", "include", "reg"),
    [
        ("/usr/include/linux/fuse.h", "linux/fuse.h", fspec.REGISTRY),
        ("/usr/include/linux/virtio_ring.h", "linux/virtio_ring.h", vspec.REGISTRY),
        ("/usr/include/linux/virtio_fs.h", "linux/virtio_fs.h", vspec.REGISTRY),
    ],
)
def test_every_header_struct_matches_spec(tmp_path: Path, header: str, include: str, reg: Registry) -> None:
    structs = {k: v for k, v in header_structs(header).items() if k not in EXEMPT}
    assert structs, f"parsed no structs from {header}"
    missing = sorted(set(structs) - set(reg.structs))
    assert not missing, f"structs in {header} missing from the spec: {missing}"
    measured = compile_and_run(tmp_path, include, structs)
    problems = []
    for s, fields in structs.items():
        ours = spec_field_offsets(reg, s)
        size = reg.sizeof(s)
        sdef = reg.structs[s]
        if measured[s] != size and not sdef.header_exempt:
            problems.append(f"sizeof({s}): header {measured[s]}, spec {size}")
        for fname, flexible in fields:
            off = measured[f"{s}.{fname}"]
            if flexible:  # e.g. fuse_dirent.name[]: starts right after the fixed part
                if off != size:
                    problems.append(f"{s}.{fname}[]: header offset {off}, spec fixed size {size}")
                continue
            if fname not in ours:
                problems.append(f"{s}.{fname}: in the header, not in the spec")
            elif ours[fname] != off:
                problems.append(f"{s}.{fname}: header offset {off}, spec {ours[fname]}")
        header_names = {f for f, flex in fields if not flex}
        for f in sdef.fields:
            if (f.since is None or f.since <= 38) and f.name not in header_names and not sdef.header_exempt:
                problems.append(f"{s}.{f.name}: in the spec, not in the header")
    assert not problems, "\n".join(problems)


def test_exemptions_are_only_the_justified_ones() -> None:
    parsed = header_structs("/usr/include/linux/virtio_ring.h")
    assert set(EXEMPT) <= set(parsed)
    assert all(pyname(k) == k for k in EXEMPT)


def test_fuse_header_constants_match_spec() -> None:
    """Opcodes, notify codes and flag bits defined in the 7.38 header equal the spec's."""
    text = Path("/usr/include/linux/fuse.h").read_text()
    enum_vals = dict((n, int(v)) for n, v in re.findall(r"^\s*FUSE_(\w+)\s*=\s*(\d+),", text, re.M))
    for op in fspec.OPCODES:
        if op.name in enum_vals:
            assert enum_vals[op.name] == op.value, op.name
        elif op.value < 4096:
            assert op.since > 38, f"FUSE_{op.name} missing from the 7.38 header but not marked newer"
    for n in fspec.NOTIFIES:
        key = f"NOTIFY_{n.name}"
        if key in enum_vals:
            assert enum_vals[key] == n.value
        else:
            assert n.since > 38, key
    defines = {n: v for n, v in re.findall(r"^#define\s+(\w+)\s+\(1(?:ULL)?\s*<<\s*(\d+)\)", text, re.M)}
    checked = 0
    for fs in fspec.FLAGSETS:
        if fs is fspec.INIT_FLAGS2:  # derived: the high half of INIT_FLAGS as the flags2 word carries it
            continue
        for bname, bval in fs.bits:
            cname = fs.prefix + bname
            if cname in defines:
                assert 1 << int(defines[cname]) == bval, cname
                checked += 1
    assert checked >= 60, checked


def test_dev_ioctls_match_the_kernels_ioc_encoding(tmp_path: Path) -> None:
    """The /dev/fuse ioctl numbers of the spec as the C compiler computes them: FUSE_DEV_IOC_CLONE from the
    7.38 header itself; the 7.40+ ones (not in it) from linux/ioctl.h's _IOW/_IO with the 7.40 header's
    definitions, struct fuse_backing_map as it declares it."""
    src = tmp_path / "ioc.c"
    src.write_text("""#include <stdio.h>
#include <stdint.h>
#include <linux/ioctl.h>
#include <linux/fuse.h>
struct backing_map_7_40 { int32_t fd; uint32_t flags; uint64_t padding; };
int main(void) {
  printf("FUSE_DEV_IOC_CLONE %lu\\n", (unsigned long)FUSE_DEV_IOC_CLONE);
  printf("FUSE_DEV_IOC_BACKING_OPEN %lu\\n", (unsigned long)_IOW(FUSE_DEV_IOC_MAGIC, 1, struct backing_map_7_40));
  printf("FUSE_DEV_IOC_BACKING_CLOSE %lu\\n", (unsigned long)_IOW(FUSE_DEV_IOC_MAGIC, 2, uint32_t));
  printf("FUSE_DEV_IOC_SYNC_INIT %lu\\n", (unsigned long)_IO(FUSE_DEV_IOC_MAGIC, 3));
  return 0;
}
""")
    exe = tmp_path / "ioc"
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    measured = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    assert measured == fspec.DEV_IOC.by_name()
    assert fspec.REGISTRY.sizeof("fuse_backing_map") == 16
