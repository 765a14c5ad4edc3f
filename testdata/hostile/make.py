#!/usr/bin/env python3
"""Regenerate the hostile node archives and cases.json (kept in git; run by hand).

Each case is a node-<i>.tar.gz that cairn must refuse (or, for setuid, accept with
the setuid bit dropped), plus what the manifest declares for it."""
import gzip, hashlib, io, json, tarfile

CONTENT = b"hello from a hostile archive\n"
SHA = hashlib.sha256(CONTENT).hexdigest()
DECLARED = [{"path": "ks/a", "size": len(CONTENT), "sha256": SHA}]


def member(name, kind=tarfile.REGTYPE, data=b"", link="", mode=0o644):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = 1_700_000_000
    ti.linkname = link
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    return ti, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write(name, members):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as t:
        for ti, f in members:
            t.addfile(ti, f)
    data = gzip.compress(raw.getvalue(), mtime=0)
    with open(name, "wb") as f:
        f.write(data)
    return {"object": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


ks = member("ks/", tarfile.DIRTYPE, mode=0o755)
def a():
    return member("ks/a", data=CONTENT)
cases = []


def case(name, members, refuse, declared=DECLARED):
    c = write(name, members)
    c.update({"declared": declared, "refuse": refuse})
    cases.append(c)


case("slip.tar.gz", [ks, member("ks/../../cairn-slip.txt", data=CONTENT)], "unsafe entry path")
case("absolute.tar.gz", [ks, member("/tmp/cairn-hostile-absolute.txt", data=CONTENT)], "unsafe entry path")
case("symlink-escape.tar.gz", [ks, member("ks/link", tarfile.SYMTYPE, link="../../outside")], "points outside")
case("symlink-absolute.tar.gz", [ks, member("ks/link", tarfile.SYMTYPE, link="/etc")], "points outside")
case("write-through-symlink.tar.gz",
     [ks, member("ks/link", tarfile.SYMTYPE, link="."), member("ks/link/a", data=CONTENT)],
     "through the symlink", [{"path": "ks/link/a", "size": len(CONTENT), "sha256": SHA}])
case("hardlink.tar.gz", [ks, member("ks/h", tarfile.LNKTYPE, link="/etc/passwd")], "hard link")
case("device.tar.gz", [ks, member("ks/dev", tarfile.CHRTYPE)], "device or FIFO")
case("fifo.tar.gz", [ks, member("ks/fifo", tarfile.FIFOTYPE)], "device or FIFO")
case("duplicate.tar.gz", [ks, a(), member("ks/a", data=CONTENT)], "duplicate entry")
case("oversize.tar.gz", [ks, member("ks/a", data=CONTENT * 1000)], "in the manifest")
case("undeclared.tar.gz", [ks, a(), member("ks/zzz", data=CONTENT)], "not declared by the manifest")
case("outside-keyspace.tar.gz", [ks, member("other/a", data=CONTENT)], "outside the keyspaces")
case("wrong-checksum.tar.gz", [ks, member("ks/a", data=CONTENT.upper())], "does not match its checksum")
case("missing-file.tar.gz", [ks], "missing from the archive")
case("setuid.tar.gz", [ks, member("ks/a", data=CONTENT, mode=0o4755)], "")

with open("cases.json", "w") as f:
    json.dump(cases, f, indent=1)
    f.write("\n")
