"""Helpers shared by the benchmark scripts."""
import json, os, random, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **kw):
    """Run a command in a fresh wrapper process so its peak RSS is its own."""
    wrapper = (
        "import resource,subprocess,sys,time,json;"
        "t=time.perf_counter();r=subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL);"
        "d=time.perf_counter()-t;"
        "print(json.dumps({'rc':r.returncode,'secs':d,'rss_kib':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    out = subprocess.run([sys.executable, "-c", wrapper] + cmd, capture_output=True, text=True, **kw)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        sys.exit(f"command failed: {cmd}\n{out.stderr}")
    return res


def generate(node, mib):
    half = mib * (1 << 20) // 2
    rnd = random.Random(42)
    words = [w.encode() for w in "id name email city order amount sensor reading temperature status ok failed".split()]
    os.makedirs(f"{node}/app/blobs", exist_ok=True)
    os.makedirs(f"{node}/app/logs", exist_ok=True)
    chunk = 16 << 20
    for i in range(max(1, half // chunk)):
        with open(f"{node}/app/blobs/nb-{i}-Data.db", "wb") as f:
            f.write(os.urandom(chunk))
    for i in range(max(1, half // chunk)):
        with open(f"{node}/app/logs/nb-{i}-Data.db", "wb") as f:
            lines = []
            size = 0
            while size < chunk:
                line = b" ".join(rnd.choice(words) for _ in range(10)) + b" %d\n" % rnd.randrange(10**9)
                lines.append(line)
                size += len(line)
            f.write(b"".join(lines)[:chunk])


