#!/usr/bin/env bash
# Measures a `hangar` binary as BENCHMARKS.md ("Release binary") reports it: file size, the wall time
# of `hangar version` (process start, no runtime work; mean of 200 runs), and the time from exec to
# `hangar dev --in-memory` answering `GET /pub/health` (median of 7 runs; polled every 2 ms).
#
#   scripts/measure-binary.sh target/release/hangar
set -euo pipefail

BIN="${1:?usage: scripts/measure-binary.sh PATH/TO/hangar}"
PORT="${PORT:-18480}"

size=$(stat -c %s "$BIN")
printf 'size: %d bytes (%.1f MiB)\n' "$size" "$(echo "$size / 1048576" | bc -l)"

python3 - "$BIN" "$PORT" <<'PY'
import statistics, subprocess, sys, time, urllib.request

binary, port = sys.argv[1], int(sys.argv[2])
runs = 200
start = time.perf_counter()
for _ in range(runs):
    subprocess.run([binary, "version"], stdout=subprocess.DEVNULL, check=True)
print(f"hangar version: {(time.perf_counter() - start) / runs * 1000:.2f} ms per run (mean of {runs})")

def ready_ms():
    args = [binary, "dev", "--in-memory", "--controller-port", str(port),
            "--proxy-port", str(port + 1), "--proxy-metrics-addr", f"127.0.0.1:{port + 2}",
            "--drone-metrics-addr", f"127.0.0.1:{port + 3}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/pub/health", timeout=1) as r:
                    if r.status == 200:
                        return (time.perf_counter() - t0) * 1000
            except OSError:
                pass
            if proc.poll() is not None:
                sys.exit("hangar dev exited before it answered")
            time.sleep(0.002)
    finally:
        proc.terminate()
        proc.wait()

samples = [ready_ms() for _ in range(7)]
print(f"hangar dev --in-memory to /pub/health: {statistics.median(samples):.1f} ms median "
      f"(min {min(samples):.1f}, max {max(samples):.1f}, 7 runs)")
PY
