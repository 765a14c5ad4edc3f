#!/usr/bin/env python3
"""Manager snapshots, one run, same data: `cairn manager-snapshot create` / `restore`
versus `zip -r` / `unzip` (what a shell script does; Python's zipfile if zip is not
installed) on a generated manager state dir.

    python3 benches/manager_compare.py [--mib 256] [--reps 3] [--out bench-out-manager] [--zip64]

Data: half incompressible (random) and half text. Reports median MiB/s (of the state
data) of each tool, the ratio cairn/zip, the archive sizes, and peak RSS. cairn's
figures include what the others do not do: SHA-256 of every entry, the metadata,
staging and the swap on restore.

--zip64 adds a 4.1 GiB file (sparse zeros) to the state: one create and one restore,
checking the restored file's size and SHA-256 (entries ≥ 4 GiB need ZIP64)."""
import argparse, hashlib, json, os, shutil, statistics, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, generate, run  # noqa: E402


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


def cluster(path, state, version="2.3.0"):
    with open(path, "w") as f:
        f.write(f'name = "bench"\n[[nodes]]\nindex = 0\ndata_dir = "n0"\n'
                f'[manager]\nstate_dir = "{state}"\nversion = "{version}"\n')
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out-manager"))
    ap.add_argument("--zip64", action="store_true")
    a = ap.parse_args()
    a.out = os.path.abspath(a.out)
    subprocess.run(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT, check=True)
    cairn = os.path.join(ROOT, "target/release/cairn")
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    state = os.path.join(a.out, "mgr/state")
    generate(state, a.mib)
    env = dict(os.environ, CAIRN_HOME=os.path.join(a.out, "home"))
    store = "file://" + os.path.join(a.out, "store")
    src = cluster(os.path.join(a.out, "src.toml"), state)

    if a.zip64:
        big = os.path.join(state, "big.bin")
        with open(big, "wb") as f:
            f.truncate((4 << 30) + (100 << 20))
        r = run([cairn, "-q", "manager-snapshot", "create", "zip64", "--store", store, "--cluster", src], env=env)
        tgt = cluster(os.path.join(a.out, "z.toml"), os.path.join(a.out, "zip64/state"))
        r2 = run([cairn, "-q", "manager-snapshot", "restore", "zip64", "--store", store, "--cluster", tgt], env=env)
        restored = os.path.join(a.out, "zip64/state/big.bin")
        same = os.path.getsize(restored) == os.path.getsize(big) and sha256(restored) == sha256(big)
        size = os.path.getsize(os.path.join(a.out, "store/.cairn-manager/zip64/manager.zip"))
        print(json.dumps({"zip64": {"ok": same, "entry_bytes": os.path.getsize(big), "zip_bytes": size,
                                    "create_secs": round(r["secs"], 1), "restore_secs": round(r2["secs"], 1),
                                    "create_rss_mib": r["rss_kib"] // 1024, "restore_rss_mib": r2["rss_kib"] // 1024}}))
        if not same:
            sys.exit("ZIP64 round trip differs")
        return

    data_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(state) for f in fs)
    mib = data_bytes / (1 << 20)
    have_zip = shutil.which("zip") and shutil.which("unzip")
    results = {}

    def record(name, r):
        results.setdefault(name, []).append(r)

    for rep in range(a.reps):
        record("cairn create", run([cairn, "-q", "manager-snapshot", "create", f"r{rep}", "--store", store,
                                    "--cluster", src], env=env))
        tgt = cluster(os.path.join(a.out, f"t{rep}.toml"), os.path.join(a.out, f"restored-{rep}/state"))
        record("cairn restore", run([cairn, "-q", "manager-snapshot", "restore", f"r{rep}", "--store", store,
                                     "--cluster", tgt], env=env))
        z = os.path.join(a.out, f"z{rep}.zip")
        u = os.path.join(a.out, f"unzipped-{rep}")
        if have_zip:
            record("zip -r", run(["sh", "-c", f'cd "{os.path.dirname(state)}" && zip -q -r "{z}" state']))
            record("unzip", run(["unzip", "-q", z, "-d", u]))
        else:
            record("zip -r", run([sys.executable, "-m", "zipfile", "-c", z, state]))
            record("unzip", run([sys.executable, "-m", "zipfile", "-e", z, u]))
        shutil.rmtree(os.path.join(a.out, f"restored-{rep}"))
        shutil.rmtree(u)

    med = {k: statistics.median(mib / r["secs"] for r in v) for k, v in results.items()}
    rss = {k: max(r["rss_kib"] for r in v) // 1024 for k, v in results.items()}
    zsize = os.path.getsize(os.path.join(a.out, "store/.cairn-manager/r0/manager.zip"))
    other = os.path.getsize(os.path.join(a.out, "z0.zip"))
    report = {
        "data_mib": round(mib, 1), "reps": a.reps, "tool": "zip/unzip" if have_zip else "python zipfile",
        "mib_per_s": {k: round(v, 1) for k, v in med.items()},
        "ratio_create": round(med["cairn create"] / med["zip -r"], 2),
        "ratio_restore": round(med["cairn restore"] / med["unzip"], 2),
        "size_ratio": round(zsize / other, 3),
        "peak_rss_mib": rss,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
