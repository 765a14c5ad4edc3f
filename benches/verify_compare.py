#!/usr/bin/env python3
"""Verification, one run, same data: `cairn snapshots verify --read-data` and
`--sample 34` versus what a script does to check its tarballs (`tar xzf -O | sha256sum`
per node object, which checks gzip's CRC but knows no per-file checksum).

    python3 benches/verify_compare.py [--nodes 3] [--mib 128] [--reps 3] [--out bench-out-verify]

Reports median MiB/s of node data and the peak RSS of each."""
import argparse, json, os, shutil, statistics, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, generate, run  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out-verify"))
    a = ap.parse_args()
    a.out = os.path.abspath(a.out)
    subprocess.run(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT, check=True)
    cairn = os.path.join(ROOT, "target/release/cairn")
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    lines = ['name = "bench"']
    for i in range(a.nodes):
        node = os.path.join(a.out, f"src/node-{i}")
        generate(node, a.mib)
        lines.append(f'[[nodes]]\nindex = {i}\ndata_dir = "{node}"')
    with open(os.path.join(a.out, "src.toml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    env = dict(os.environ, CAIRN_HOME=os.path.join(a.out, "home"))
    store = os.path.join(a.out, "store")
    run([cairn, "-q", "plan", "start", "backup-local", "--cluster", os.path.join(a.out, "src.toml"),
         "-p", "SNAPSHOT_NAME=s", "-p", f"BACKUP_DIR={store}", "-p", "STRATEGY=parallel"], env=env)
    data = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(a.out, "src"))
               for f in fs) / (1 << 20)
    script = f'for f in "{store}"/s/node-*.tar.gz; do tar xzf "$f" -O | sha256sum >/dev/null || exit 1; done'
    results = {}
    for _ in range(a.reps):
        for name, cmd in [
            ("cairn verify --read-data", [cairn, "-q", "snapshots", "verify", "s", "--store", store, "--read-data"]),
            ("cairn verify --sample 34", [cairn, "-q", "snapshots", "verify", "s", "--store", store, "--sample", "34"]),
            ("cairn verify (metadata)", [cairn, "-q", "snapshots", "verify", "s", "--store", store]),
            ("tar xzf -O | sha256sum", ["sh", "-c", script]),
        ]:
            results.setdefault(name, []).append(run(cmd, env=env))
    med = {k: statistics.median(data / r["secs"] for r in v) for k, v in results.items()}
    secs = {k: statistics.median(r["secs"] for r in v) for k, v in results.items()}
    print(json.dumps({
        "data_mib": round(data, 1), "nodes": a.nodes, "reps": a.reps,
        "mib_per_s_of_all_data": {k: round(v, 1) for k, v in med.items()},
        "median_secs": {k: round(v, 2) for k, v in secs.items()},
        "ratio_read_data_to_tar": round(med["cairn verify --read-data"] / med["tar xzf -O | sha256sum"], 2),
        "peak_rss_mib": {k: max(r["rss_kib"] for r in v) // 1024 for k, v in results.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
