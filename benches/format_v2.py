#!/usr/bin/env python3
"""Formats 2 and 3 in one run on the same data: a Cassandra-like node whose SSTables are
half incompressible (compressed Data.db files of 2-9 MiB) with small, compressible
Index/Summary/Statistics files between them, so that compression blocks mix both.

* backup: cairn backup-local with COMPRESSION=gzip and zstd, against
  `tar | gzip -6`, `tar | pigz -6`, `tar | zstd -T0` and restic (apt; a local
  repository, compression auto) — time and stored size; and the size cairn's
  former store-or-deflate rule (a whole 1 MiB block judged by its first 64 KiB)
  gives on the same tar stream (simulated with Python's zlib);
* nightly: ~5 % new SSTables, then a cairn differential backup (MODE=differential,
  its parent the full backup in the same store) and restic's incremental one;
  the stored bytes after both, and a whole restore of the differential (read
  from two objects);
* restore: the whole node, and one 1 MiB file (`PATHS=`: ranged reads of the blocks
  that hold it), against `tar xzf OBJECT FILE`, `restic restore` and
  `restic restore --include FILE`.

    python3 benches/format_v2.py [--mib 256] [--reps 3] [--out bench-out-format]
    eval "$(scripts/install-test-servers)"; python3 benches/format_v2.py --s3   # cairn and restic on s3s-fs

Prints medians (seconds), ratios and each process's peak RSS."""
import argparse, json, os, random, shutil, statistics, subprocess, sys, time, zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import AK, SK, ROOT, run, start_s3s  # noqa: E402

WANTED = "shop/orders-1/nb-7-big-Data.db"


def sstables(node, mib, seed, start=0):
    """Tables of SSTables until `mib` MiB; generation 7 of table 1 is a 1 MiB
    Data.db, the file a single-file restore fetches."""
    rnd = random.Random(seed)
    words = [w.encode() for w in "id name email city order amount sensor reading ok failed".split()]
    total, n = 0, start
    while total < mib << 20:
        table = f"{node}/shop/orders-{n // 8}"
        os.makedirs(table, exist_ok=True)
        gen = n % 8
        size = 1 << 20 if (n // 8, gen) == (1, 7) else rnd.randrange(2 << 20, 9 << 20)
        with open(f"{table}/nb-{gen}-big-Data.db", "wb") as f:
            f.write(os.urandom(size))
        text = b"".join(
            b" ".join(rnd.choice(words) for _ in range(8)) + b" %d\n" % rnd.randrange(10**9)
            for _ in range(rnd.randrange(2000, 20000))
        )
        for comp in ("Index.db", "Summary.db", "Statistics.db"):
            with open(f"{table}/nb-{gen}-big-{comp}", "wb") as f:
                f.write(text[: rnd.randrange(len(text) // 3, len(text))])
        with open(f"{table}/nb-{gen}-big-Filter.db", "wb") as f:
            f.write(os.urandom(rnd.randrange(4 << 10, 64 << 10)))
        with open(f"{table}/nb-{gen}-big-TOC.txt", "w") as f:
            f.write("Data.db\nIndex.db\nSummary.db\nStatistics.db\nFilter.db\nTOC.txt\n")
        total += size + len(text)
        n += 1
    return n


def old_rule_size(tar_path):
    """The gzip size of cairn's former rule: each 1 MiB block stored whole when a
    level-1 deflate of its first 64 KiB shrank it by less than 3 %."""
    total = 18
    with open(tar_path, "rb") as f:
        while block := f.read(1 << 20):
            sample = block[: 64 << 10]
            probe = zlib.compressobj(1, zlib.DEFLATED, -15)
            plen = len(probe.compress(sample) + probe.flush(zlib.Z_SYNC_FLUSH))
            if plen * 100 > len(sample) * 97:
                total += len(block) + 5 * -(-len(block) // 65535)
            else:
                c = zlib.compressobj(6, zlib.DEFLATED, -15)
                total += len(c.compress(block) + c.flush(zlib.Z_SYNC_FLUSH))
    return total


def dir_size(d):
    return sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(d) for f in fs)


def med(rs):
    return statistics.median(r["secs"] for r in rs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out-format"))
    ap.add_argument("--s3", action="store_true", help="cairn and restic against s3s-fs on loopback")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT, check=True)
    cairn = os.path.join(ROOT, "target/release/cairn")
    restic = shutil.which("restic")
    if not restic:
        print("restic not found (apt-get install restic): its rows are left out")
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    node = os.path.join(a.out, "src/node-0")
    tables = sstables(node, a.mib, 7)
    with open(os.path.join(a.out, "src.toml"), "w") as f:
        f.write(f'name = "bench"\n[[nodes]]\nindex = 0\ndata_dir = "{node}"\n')
    env = dict(os.environ, CAIRN_HOME=os.path.join(a.out, "home"), RESTIC_PASSWORD="bench-password-1")
    store = os.path.join(a.out, "stores")
    where = "a local directory"
    if a.s3:
        s3data = os.path.join(a.out, "s3data")
        server, url = start_s3s(s3data, "bench")
        store = os.path.join(s3data, "bench")  # s3s-fs keeps each object as a file
        env.update(AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK, AWS_REGION="us-east-1")
        where = "s3s-fs on loopback"

    def place(kind, snap, name):
        """The plan and parameters of a backup or restore of `snap` in the store
        `name` (a directory, or a prefix of the bucket)."""
        if a.s3:
            return [f"{kind}-s3", "-p", f"SNAPSHOT_NAME={snap}", "-p", "S3_BUCKET_NAME=bench",
                    "-p", f"S3_PREFIX={name}", "-p", f"S3_ENDPOINT_URL={url}", "-p", "AWS_REGION=us-east-1"]
        return [f"{kind}-local", "-p", f"SNAPSHOT_NAME={snap}", "-p", f"BACKUP_DIR={store}/{name}"]

    def restic_repo(name):
        return (f"s3:{url}/bench/{name}", os.path.join(store, name)) if a.s3 else (os.path.join(a.out, name),) * 2

    times, sizes, rss = {}, {}, {}

    def rec(name, r, size=None):
        times.setdefault(name, []).append(r)
        rss[name] = max(rss.get(name, 0), r["rss_kib"] // 1024)
        if size is not None:
            sizes[name] = size

    def cairn_backup(name, codec, snap, where_, mode):
        """A backup into the store `where_`; its size is what the snapshot's own
        folder holds (a differential's unchanged files are in its parent's)."""
        r = run([cairn, "-q", "plan", "start", "--cluster", os.path.join(a.out, "src.toml")]
                + place("backup", snap, where_) + ["-p", f"COMPRESSION={codec}", "-p", f"MODE={mode}"], env=env)
        rec(name, r, dir_size(f"{store}/{where_}/{snap}"))

    def shell(name, cmd, out):
        r = run(["sh", "-c", cmd])
        rec(name, r, os.path.getsize(out))
        os.remove(out)

    def restic_backup(name, repo):
        r = run([restic, "-q", "-r", repo[0], "backup", "--compression", "auto", "shop"], cwd=node, env=env)
        rec(name, r, dir_size(repo[1]))

    data = dir_size(node)
    tarfile = os.path.join(a.out, "node.tar")
    subprocess.run(["tar", "cf", tarfile, "-C", node, "shop"], check=True)
    old = old_rule_size(tarfile)
    os.remove(tarfile)
    for rep in range(a.reps):
        cairn_backup("cairn gzip", "gzip", "full", f"g{rep}", "full")
        cairn_backup("cairn zstd", "zstd", "full", f"z{rep}", "full")
        o = os.path.join(a.out, "o")
        shell("tar | gzip -6", f"tar cf - -C '{node}' shop | gzip -6 > '{o}'", o)
        if shutil.which("pigz"):
            shell("tar | pigz -6", f"tar cf - -C '{node}' shop | pigz -6 > '{o}'", o)
        if shutil.which("zstd"):
            shell("tar | zstd -T0", f"tar cf - -C '{node}' shop | zstd -q -T0 > '{o}'", o)
        if restic:
            repo = restic_repo(f"restic{rep}")
            subprocess.run([restic, "-q", "-r", repo[0], "init", "--repository-version", "2"], env=env, check=True,
                           capture_output=True)
            restic_backup("restic", repo)
    mib = data / (1 << 20)
    base = sizes["tar | gzip -6"]
    print(f"data: {mib:.0f} MiB in one node; stores in {where}; full backup ({a.reps} reps, median):")
    for k, rs in times.items():
        m = med(rs)
        print(f"  {k:<16} {m:7.2f} s {mib / m:6.0f} MiB/s  stored {sizes[k] / (1 << 20):7.1f} MiB "
              f"({sizes[k] / base:.3f}x gzip -6)  peak RSS {rss[k]} MiB")
    print(f"  former rule (simulated) stored {old / (1 << 20):7.1f} MiB ({old / base:.3f}x gzip -6)")
    full = {k: med(v) for k, v in times.items()}

    # Nightly: ~5 % new SSTables, then each tool again.
    sstables(node, max(1, a.mib // 20), 11, start=tables)
    night = {}
    after = {}
    for rep in range(a.reps):
        times.clear()
        # Each rep's differential builds on that rep's full backup (its own store).
        cairn_backup("cairn gzip", "gzip", "night", f"g{rep}", "differential")
        cairn_backup("cairn zstd", "zstd", "night", f"z{rep}", "differential")
        after["cairn gzip"] = dir_size(f"{store}/g{rep}")
        after["cairn zstd"] = dir_size(f"{store}/z{rep}")
        if restic:
            repo = restic_repo(f"restic{rep}")
            before = dir_size(repo[1])
            restic_backup("restic", repo)
            sizes["restic"] = dir_size(repo[1]) - before
            after["restic"] = dir_size(repo[1])
        for k, v in times.items():
            night.setdefault(k, []).extend(v)
    for codec, ext in (("gzip", "tar.gz"), ("zstd", "tar.zst")):
        m = json.load(open(f"{store}/{codec[0]}0/night/manifest.json"))
        assert m.get("parent") == "full", f"{codec}: the nightly is a differential of the full backup"
    print(f"nightly backup after ~5 % new SSTables ({a.reps} reps, median; stored = what the nightly added):")
    for k, rs in night.items():
        m = med(rs)
        vs = f"  {med(night['restic']) / m:.2f}x restic's speed" if "restic" in night and k != "restic" else ""
        print(f"  {k:<16} {m:7.2f} s  ({full[k] / m:.1f}x the full backup's speed){vs}  stored {sizes[k] / (1 << 20):7.1f} MiB")
    print("stored after the full backup and the nightly:")
    for k, v in after.items():
        vs = f"  ({v / after['restic']:.3f}x restic's)" if "restic" in after else ""
        print(f"  {k:<16} {v / (1 << 20):7.1f} MiB{vs}")

    # Restores from the first full backup.
    res = {}
    for rep in range(a.reps):
        for name, (snap, where_), extra in (
                ("cairn gzip, node", ("full", "g0"), []),
                ("cairn gzip, 1 file", ("full", "g0"), ["-p", f"PATHS={WANTED}"]),
                ("cairn zstd, node", ("full", "z0"), []),
                ("cairn zstd, 1 file", ("full", "z0"), ["-p", f"PATHS={WANTED}"]),
                ("cairn gzip differential, node", ("night", "g0"), []),
                ("cairn zstd differential, node", ("night", "z0"), [])):
            tgt = os.path.join(a.out, "tgt")
            with open(os.path.join(a.out, "tgt.toml"), "w") as f:
                f.write(f'name = "t"\n[[nodes]]\nindex = 0\ndata_dir = "{tgt}/node-0"\n')
            r = run([cairn, "-q", "plan", "start", "--cluster", os.path.join(a.out, "tgt.toml")]
                    + place("restore", snap, where_) + extra, env=env)
            with open(f"{tgt}/node-0/{WANTED}", "rb") as got, open(f"{node}/{WANTED}", "rb") as want:
                assert got.read() == want.read(), f"{name}: restored file differs"
            res.setdefault(name, []).append(r)
            shutil.rmtree(tgt)
        x = os.path.join(a.out, "x")
        os.makedirs(x)
        res.setdefault("tar xzf, 1 file", []).append(
            run(["tar", "xzf", f"{store}/g0/full/node-0.tar.gz", "-C", x, WANTED]))
        shutil.rmtree(x)
        if restic:
            # The full backup's snapshot (the repository also holds the nightly).
            repo = restic_repo("restic0")[0]
            first = json.loads(subprocess.run([restic, "-r", repo, "snapshots", "--json"], env=env, check=True,
                                              capture_output=True, text=True).stdout)[0]["id"]
            os.makedirs(x)
            res.setdefault("restic, node", []).append(run([restic, "-q", "-r", repo, "restore", first, "--target", x], env=env))
            shutil.rmtree(x)
            os.makedirs(x)
            res.setdefault("restic, 1 file", []).append(
                run([restic, "-q", "-r", repo, "restore", first, "--target", x, "--include", f"/{WANTED}"], env=env))
            assert os.path.getsize(f"{x}/{WANTED}") == 1 << 20, "restic restored the file"
            shutil.rmtree(x)
    print(f"restore ({a.reps} reps, median):")
    for k, rs in res.items():
        m = med(rs)
        node_time = med(res[k.split(",")[0] + ", node"]) if k.split(",")[0] + ", node" in res else None
        ratio = f"  {node_time / m:5.1f}x faster than its whole node" if node_time and "1 file" in k else ""
        print(f"  {k:<30} {m:7.3f} s{ratio}  peak RSS {max(r['rss_kib'] for r in rs) // 1024} MiB")

    if a.s3:
        server.kill()


if __name__ == "__main__":
    main()
