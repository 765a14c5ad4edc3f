#!/usr/bin/env python3
"""Format 2 in one run on the same data:

* size: cairn's node-0.tar.gz against `tar cf - | gzip -6` (and pigz -6 when
  installed) of the same keyspaces, on a Cassandra-like node whose SSTables are
  half incompressible and whose blocks mix the two (small index, summary and
  statistics files between large compressed Data.db files);
* single-file restore: `restore-local -p PATHS=<one 1 MiB file>` (ranged reads of
  the blocks that hold it) against restoring the whole node, and against
  `tar xzf OBJECT PATH`, which must read the archive from its start.

    python3 benches/format_v2.py [--mib 256] [--reps 5] [--out bench-out-format]

Reports medians and ratios, and each process's peak RSS."""
import argparse, os, random, shutil, statistics, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, run  # noqa: E402

WANTED = "shop/orders-1/nb-7-big-Data.db"


def cassandra_node(node, mib):
    """Tables of SSTables: a compressed (random) Data.db of 2-9 MiB with small,
    compressible components beside it, until `mib` MiB; one Data.db is exactly
    1 MiB, the file a single-file restore fetches."""
    rnd = random.Random(7)
    words = [w.encode() for w in "id name email city order amount sensor reading ok failed".split()]
    total, n = 0, 0
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out-format"))
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT, check=True)
    cairn = os.path.join(ROOT, "target/release/cairn")
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    node = os.path.join(a.out, "src/node-0")
    cassandra_node(node, a.mib)
    data = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(node) for f in fs)
    with open(os.path.join(a.out, "src.toml"), "w") as f:
        f.write(f'name = "bench"\n[[nodes]]\nindex = 0\ndata_dir = "{node}"\n')
    env = dict(os.environ, CAIRN_HOME=os.path.join(a.out, "home"))
    store = os.path.join(a.out, "store")
    r = run([cairn, "-q", "plan", "start", "backup-local", "--cluster", os.path.join(a.out, "src.toml"),
             "-p", "SNAPSHOT_NAME=s", "-p", f"BACKUP_DIR={store}"], env=env)
    obj = f"{store}/s/node-0.tar.gz"
    sizes = {"cairn .tar.gz": os.path.getsize(obj)}
    tar = os.path.join(a.out, "node.tar")
    subprocess.run(["tar", "cf", tar, "-C", node, "shop"], check=True)
    for tool in (["gzip", "-6"], ["pigz", "-6"]):
        if shutil.which(tool[0]):
            out = subprocess.run(tool + ["-c", tar], check=True, capture_output=True).stdout
            sizes[" ".join(tool)] = len(out)
    os.remove(tar)
    print(f"data: {data / (1 << 20):.0f} MiB in one node; backup {data / (1 << 20) / r['secs']:.0f} MiB/s, "
          f"peak RSS {r['rss_kib'] // 1024} MiB")
    base = sizes["gzip -6"]
    for k, v in sizes.items():
        print(f"  {k:<16} {v / (1 << 20):8.1f} MiB  {v / base:.3f}x gzip -6")

    times = {}
    for rep in range(a.reps):
        for name, extra in (("cairn restore, whole node", []), ("cairn restore, one 1 MiB file", ["-p", f"PATHS={WANTED}"])):
            tgt = os.path.join(a.out, "tgt")
            with open(os.path.join(a.out, "tgt.toml"), "w") as f:
                f.write(f'name = "t"\n[[nodes]]\nindex = 0\ndata_dir = "{tgt}/node-0"\n')
            r = run([cairn, "-q", "plan", "start", "restore-local", "--cluster", os.path.join(a.out, "tgt.toml"),
                     "-p", "SNAPSHOT_NAME=s", "-p", f"BACKUP_DIR={store}"] + extra, env=env)
            if extra:
                with open(f"{tgt}/node-0/{WANTED}", "rb") as got, open(f"{node}/{WANTED}", "rb") as want:
                    assert got.read() == want.read(), "restored file differs"
            times.setdefault(name, []).append(r)
            shutil.rmtree(tgt)
        x = os.path.join(a.out, "x")
        os.makedirs(x)
        r = run(["tar", "xzf", obj, "-C", x, WANTED])
        times.setdefault("tar xzf OBJECT one-file", []).append(r)
        shutil.rmtree(x)
    whole = statistics.median(t["secs"] for t in times["cairn restore, whole node"])
    print(f"restore ({a.reps} reps, median):")
    for k, rs in times.items():
        m = statistics.median(t["secs"] for t in rs)
        rss = max(t["rss_kib"] for t in rs) // 1024
        print(f"  {k:<32} {m:7.3f} s  {whole / m:6.1f}x faster than the whole node  peak RSS {rss} MiB")


if __name__ == "__main__":
    main()
