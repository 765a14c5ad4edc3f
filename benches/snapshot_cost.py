#!/usr/bin/env python3
"""What a point-in-time snapshot costs: one node of 10,000 files (40 tables of 250
SSTable-like files, ~4 KiB each, half random), backed up with `snapshot = "hardlink"`
(the default) and with `snapshot = "none"`, in one run, alternating.

    python3 benches/snapshot_cost.py [--files 10000] [--reps 5] [--out bench-out-snap]

Reports medians: the backup's wall time in each mode, the hard-link time and the
removal time cairn logs for the snapshot, and, for comparison, `cp -al` plus
`rm -rf` of the same tree (what a script would do)."""
import argparse, os, random, re, shutil, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT  # noqa: E402


def generate(node, files):
    rng = random.Random(7)
    tables = 40
    per = files // tables
    for t in range(tables):
        d = os.path.join(node, "shop", f"t{t}-{t:032x}")
        os.makedirs(d, exist_ok=True)
        for i in range(per):
            data = rng.randbytes(2048) + (b"row %d\n" % i) * 290
            with open(os.path.join(d, f"nb-{i}-big-Data.db"), "wb") as f:
                f.write(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-out-snap"))
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT, check=True)
    cairn = os.path.join(ROOT, "target/release/cairn")
    shutil.rmtree(a.out, ignore_errors=True)
    node = os.path.join(a.out, "node-0")
    generate(node, a.files)
    for mode in ["hardlink", "none"]:
        with open(os.path.join(a.out, f"{mode}.toml"), "w") as f:
            f.write(f'name = "bench"\nsnapshot = "{mode}"\n[[nodes]]\nindex = 0\ndata_dir = "{node}"\n')
    env = dict(os.environ, CAIRN_HOME=os.path.join(a.out, "home"))
    wall = {"hardlink": [], "none": []}
    link, removal, cp, rm = [], [], [], []
    for rep in range(a.reps):
        for mode in ["hardlink", "none"]:
            t0 = time.monotonic()
            r = subprocess.run([cairn, "-v", "plan", "start", "backup-local", "--cluster",
                                os.path.join(a.out, f"{mode}.toml"), "-p", f"SNAPSHOT_NAME={mode}-{rep}",
                                "-p", f"BACKUP_DIR={os.path.join(a.out, 'store')}"],
                               env=env, capture_output=True, text=True)
            wall[mode].append(time.monotonic() - t0)
            if r.returncode != 0:
                sys.exit(f"backup failed: {r.stderr[-2000:]}")
            if mode == "hardlink":
                taken = re.search(r"secs=([0-9.]+).*snapshot taken|snapshot taken.*secs=([0-9.]+)", r.stderr)
                gone = re.search(r"secs=([0-9.]+).*snapshot removed|snapshot removed.*secs=([0-9.]+)", r.stderr)
                if taken:
                    link.append(float(taken.group(1) or taken.group(2)))
                if gone:
                    removal.append(float(gone.group(1) or gone.group(2)))
        copy = os.path.join(a.out, "cp-al")
        t0 = time.monotonic()
        subprocess.run(["cp", "-al", os.path.join(node, "shop"), copy], check=True)
        cp.append(time.monotonic() - t0)
        t0 = time.monotonic()
        shutil.rmtree(copy)
        rm.append(time.monotonic() - t0)
    med = statistics.median
    print(f"node: {a.files} files; {a.reps} reps; medians")
    print(f"backup-local, snapshot = none:      {med(wall['none']):.2f} s")
    print(f"backup-local, snapshot = hardlink:  {med(wall['hardlink']):.2f} s "
          f"({med(wall['hardlink']) / med(wall['none']):.2f}x)")
    if link and removal:
        print(f"  hard-link snapshot: {med(link) * 1000:.0f} ms; its removal: {med(removal) * 1000:.0f} ms")
    print(f"cp -al: {med(cp) * 1000:.0f} ms; rm -rf: {med(rm) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
